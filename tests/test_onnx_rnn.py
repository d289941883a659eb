"""ONNX recurrent operators, constant If conditions and unimportable operators.

The unrolled LSTM/GRU/RNN graphs are checked against ONNX Runtime's own operators (no build:
fast, every attribute combination); which nodes take the fused kernel and which are unrolled
is checked per variant, and both forms are built and compared with ONNX Runtime to 1e-5;
torch-exported and quantize_dynamic models are built and run with qcompile and compared with
ONNX Runtime on the same file.  Results agree to 1e-4 absolute, the quantized LSTM's too
(hidden states are tanh-bounded, so absolute error is the meaningful measure).
"""
from __future__ import annotations

import copy
import itertools
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qcompile
from qcompile.errors import ModelImportError
from qcompile.frontend import onnx_shapes
from qcompile.frontend.onnx_rnn import FUSED_OP, lower_recurrent, unroll_recurrent

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SEQ, BATCH, INPUT, HIDDEN = 4, 2, 3, 5



def _sequence_lens(seq_lens, batch: int, graph_inputs: list, inits: list) -> str:
    """The recurrent node's sequence_lens input: a graph input ("input"), a constant
    (a list), or none (the empty name)."""
    from onnx import TensorProto, helper, numpy_helper

    if seq_lens == "input":
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [batch]))
        return "lens"
    if seq_lens is not None:
        inits.append(numpy_helper.from_array(np.array(seq_lens, np.int32), "lens"))
        return "lens"
    return ""

def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int = 0) -> list[np.ndarray]:
    """ONNX Runtime's outputs; ``threads`` intra-op threads (0: its default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rnn_model(kind: str, direction: str = "forward", layout: int = 0, bias: bool = True,
               states: bool = False, seq_lens: str | list[int] | None = None, peepholes: bool = False,
               opset: int = 14, seed: int = 0, **attrs) -> onnx.ModelProto:
    """One recurrent node; the optional inputs present as asked (states and 'input' lengths as graph inputs)."""
    rng = np.random.default_rng(seed)
    g, dirs = GATES[kind], 2 if direction == "bidirectional" else 1

    def init(name: str, shape: tuple[int, ...]) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name))
        return name

    inits: list = []
    x_shape = [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT]
    state_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["x", init("W", (dirs, g * HIDDEN, INPUT)), init("R", (dirs, g * HIDDEN, HIDDEN))]
    names.append(init("B", (dirs, 2 * g * HIDDEN)) if bias else "")
    names.append(_sequence_lens(seq_lens, BATCH, graph_inputs, inits))
    for state in ["h0", "c0"][: 2 if kind == "LSTM" else 1]:
        if states:
            graph_inputs.append(helper.make_tensor_value_info(state, TensorProto.FLOAT, state_shape))
        names.append(state if states else "")
    if peepholes:
        names.append(init("P", (dirs, 3 * HIDDEN)))
    while names[-1] == "":
        names.pop()
    outputs = ["y", "y_h"] + (["y_c"] if kind == "LSTM" else [])
    if layout:
        attrs["layout"] = 1
    node = helper.make_node(kind, names, outputs, name="rnn0", hidden_size=HIDDEN, direction=direction, **attrs)
    graph = helper.make_graph([node], "rnn", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type == TensorProto.INT32:
            feeds[inp.name] = rng.integers(1, SEQ + 1, shape).astype(np.int32)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's result; layout 1 (which it does not implement) through the layout-0 node."""
    node = model.graph.node[0]
    if not any(a.name == "layout" and a.i for a in node.attribute):
        return _ort(model, feeds)
    seq_first = copy.deepcopy(model)
    attrs = [a for a in seq_first.graph.node[0].attribute if a.name != "layout"]
    del seq_first.graph.node[0].attribute[:]
    seq_first.graph.node[0].attribute.extend(attrs)
    swapped = dict(feeds)
    for inp in seq_first.graph.input:
        if inp.name in ("x", "h0", "c0"):
            dims = inp.type.tensor_type.shape.dim
            dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
            swapped[inp.name] = feeds[inp.name].transpose(1, 0, 2)
    return [r.transpose(2, 0, 1, 3) if r.ndim == 4 else r.transpose(1, 0, 2) for r in _ort(seq_first, swapped)]


def _check_unrolled(model: onnx.ModelProto) -> None:
    feeds = _feeds(model)
    expected = _reference(model, feeds)
    unrolled = unroll_recurrent(copy.deepcopy(model), "m.onnx")
    assert {n.op_type for n in unrolled.graph.node}.isdisjoint(GATES)
    for want, got in zip(expected, _ort(unrolled, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # Relu states are unbounded


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_unrolled_matches_onnxruntime(kind):
    """Every direction x layout x bias x initial state (x GRU linear_before_reset)."""
    for direction, layout, bias, states in itertools.product(
        ["forward", "reverse", "bidirectional"], [0, 1], [False, True], [False, True]
    ):
        for lbr in [0, 1] if kind == "GRU" else [None]:
            extra = {} if lbr is None else {"linear_before_reset": lbr}
            _check_unrolled(_rnn_model(kind, direction, layout, bias, states, **extra))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_unrolled_sequence_lens_clip(kind, direction):
    """Full and shorter constant lengths, lengths as a graph input, and clip."""
    _check_unrolled(_rnn_model(kind, direction, states=True, seq_lens=[SEQ, SEQ]))
    _check_unrolled(_rnn_model(kind, direction, layout=1, seq_lens=[SEQ, 2]))
    _check_unrolled(_rnn_model(kind, direction, states=True, seq_lens="input"))
    _check_unrolled(_rnn_model(kind, direction, states=True, clip=0.7))


def test_unrolled_peepholes_activations_opsets():
    _check_unrolled(_rnn_model("LSTM", "bidirectional", states=True, peepholes=True))
    _check_unrolled(_rnn_model("LSTM", peepholes=True))
    _check_unrolled(_rnn_model("GRU", activations=["Relu", "Tanh"], states=True))
    for opset in (11, 18):  # Split and Unsqueeze take their sizes/axes as attributes before 13
        _check_unrolled(_rnn_model("LSTM", "bidirectional", states=True, opset=opset))


@pytest.mark.parametrize(("model", "fragment"), [
    (_rnn_model("LSTM", activations=["HardSigmoid", "Tanh", "Tanh"]), "activation 'HardSigmoid' is not supported"),
    (_rnn_model("LSTM", input_forget=1), "input_forget=1"),
])
def test_unsupported_attributes_are_refused(model, fragment):
    with pytest.raises(ModelImportError, match=fragment) as info:
        unroll_recurrent(model, "m.onnx")
    assert "m.onnx: LSTM node 'rnn0'" in str(info.value) and "\n" not in str(info.value)


def test_run_time_weights_are_refused():
    model = _rnn_model("GRU")
    weight = next(i for i in model.graph.initializer if i.name == "W")
    model.graph.initializer.remove(weight)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(weight.dims)))
    with pytest.raises(ModelImportError, match="W .'W'. is computed at run time"):
        unroll_recurrent(model, "m.onnx")


# -- fused or unrolled --------------------------------------------------------------------------

# (model, fused?): what the fused kernel covers, and what is unrolled instead
FUSION_CASES = {
    "lstm-bidirectional-states": (lambda: _rnn_model("LSTM", "bidirectional", states=True), True),
    "lstm-reverse-layout1": (lambda: _rnn_model("LSTM", "reverse", layout=1, states=True), True),
    "lstm-no-bias-no-states": (lambda: _rnn_model("LSTM", bias=False), True),
    "lstm-full-sequence-lens": (lambda: _rnn_model("LSTM", states=True, seq_lens=[SEQ, SEQ]), True),
    "lstm-named-default-activations": (lambda: _rnn_model("LSTM", activations=["sigmoid", "Tanh", "tanh"]), True),
    "gru-bidirectional-lbr1": (lambda: _rnn_model("GRU", "bidirectional", states=True, linear_before_reset=1), True),
    "gru-reverse-lbr0-layout1": (lambda: _rnn_model("GRU", "reverse", layout=1, states=True), True),
    "lstm-peepholes": (lambda: _rnn_model("LSTM", "bidirectional", states=True, peepholes=True), False),
    "lstm-clip": (lambda: _rnn_model("LSTM", states=True, clip=0.7), False),
    "gru-shorter-sequence-lens": (lambda: _rnn_model("GRU", states=True, seq_lens=[SEQ, 2]), False),
    "gru-lens-input": (lambda: _rnn_model("GRU", states=True, seq_lens="input"), False),
    "gru-relu": (lambda: _rnn_model("GRU", activations=["Relu", "Tanh"], states=True), False),
    "rnn": (lambda: _rnn_model("RNN", "bidirectional", states=True), False),
}


@pytest.mark.parametrize("case", list(FUSION_CASES))
def test_fused_or_unrolled(case):
    """A fused node becomes the input projection and one RecurrentSequence node; the others
    are unrolled exactly as unroll_recurrent unrolls them."""
    make, fused = FUSION_CASES[case]
    lowered = lower_recurrent(make(), "m.onnx")
    ops = [n.op_type for n in lowered.graph.node]
    assert set(ops).isdisjoint(GATES)
    if fused:
        assert ops.count(FUSED_OP) == 1 and "MatMul" in ops and "Split" not in ops, ops
    else:
        assert FUSED_OP not in ops
        assert ops == [n.op_type for n in unroll_recurrent(make(), "m.onnx").graph.node]


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its outputs' shapes inferred (the ONNX checker wants them)."""
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("case", [
    "lstm-bidirectional-states", "lstm-reverse-layout1", "lstm-no-bias-no-states", "lstm-full-sequence-lens",
    "gru-bidirectional-lbr1", "gru-reverse-lbr0-layout1", "lstm-peepholes", "lstm-clip", "gru-shorter-sequence-lens",
])
def test_fused_and_unrolled_builds_match_onnxruntime(tmp_path, case):
    model = _typed(FUSION_CASES[case][0]())
    path = tmp_path / "rnn.onnx"
    onnx.save(model, str(path))
    feeds = _feeds(model)
    artifact = qcompile.compile(path, "x86-avx2", out_dir=tmp_path / "out", tuning_logs=False)
    compiled = qcompile.load(artifact.library)
    got = list(compiled.run(feeds).values())
    want = _reference(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    kernels = {k.name: k.calls for k in compiled.profile(feeds, runs=1, warmup=0)}
    fused = [name for name in kernels if name.endswith("_sequence")]
    assert fused == ([f"qc_{model.graph.node[0].op_type.lower()}_sequence"] if FUSION_CASES[case][1] else []), kernels


# -- torch-exported models, built and run ------------------------------------------------------

class _Recurrent(nn.Module):
    """An LSTM and a GRU on the same input, their initial states as model inputs."""

    def __init__(self, layers: int, bidirectional: bool, batch_first: bool) -> None:
        super().__init__()
        kw = {"num_layers": layers, "bidirectional": bidirectional, "batch_first": batch_first}
        self.lstm = nn.LSTM(INPUT, HIDDEN, **kw)
        self.gru = nn.GRU(INPUT, HIDDEN, **kw)

    def forward(self, x, h0, c0, g0):
        y, (h, c) = self.lstm(x, (h0, c0))
        z, g = self.gru(x, g0)
        return y, h, c, z, g


def _export(tmp_path, module: nn.Module, args: tuple, names: list[str], dynamo: bool):
    path = tmp_path / f"{type(module).__name__.lower()}-{'dynamo' if dynamo else 'ts'}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=names, dynamo=dynamo)
    return path


def _build_and_compare(tmp_path, path, feeds: dict[str, np.ndarray], threads: int = 0):
    """(max abs difference between the qcompile build and ONNX Runtime on the same file, the
    build's manifest quantization)."""
    artifact = qcompile.compile(path, "x86-avx2", out_dir=tmp_path / "out", tuning_logs=False)
    got = list(qcompile.load(artifact.library).run(feeds).values())
    want = _ort(onnx.load(str(path)), feeds, threads)
    assert len(got) == len(want)
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want)), artifact.manifest.quantization


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize(("layers", "bidirectional", "batch_first"), [(2, True, True), (1, False, False)])
def test_torch_lstm_gru_build(tmp_path, dynamo, layers, bidirectional, batch_first):
    torch.manual_seed(0)
    module = _Recurrent(layers, bidirectional, batch_first)
    dirs = 2 if bidirectional else 1
    x = torch.randn((BATCH, SEQ, INPUT) if batch_first else (SEQ, BATCH, INPUT))
    states = [torch.randn(layers * dirs, BATCH, HIDDEN) for _ in range(3)]
    path = _export(tmp_path, module, (x, *states), ["x", "h0", "c0", "g0"], dynamo)
    feeds = {n: t.numpy() for n, t in zip(["x", "h0", "c0", "g0"], [x, *states])}
    assert _build_and_compare(tmp_path, path, feeds)[0] <= ATOL


# -- ONNX Runtime's DynamicQuantizeLSTM ---------------------------------------------------------
#
# Its GEMMs quantize X (all steps at once) and, per step, H_{t-1} at run time.  ONNX Runtime
# splits the batch rows across its intra-op threads and quantizes each thread's rows apart, so
# the references run with a thread per row, the split the unrolled graph reproduces.

def _quantized_lstm_model(direction: str = "forward", batch: int = BATCH, hidden: int = HIDDEN,
                          per_channel: bool = False, states: bool = True, seq_lens: str | list[int] | None = None,
                          seed: int = 0) -> onnx.ModelProto:
    """One com.microsoft DynamicQuantizeLSTM node, its int8 weights symmetric as quantize_dynamic writes them."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    inits, graph_inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, batch, INPUT])]

    def weight(name: str, k: int) -> list[str]:
        w = (rng.standard_normal((dirs, k, 4 * hidden)) * 0.5).astype(np.float32)
        amax = np.abs(w).max(axis=1) if per_channel else np.abs(w).max(axis=(1, 2))
        scale = (amax / 127).astype(np.float32)
        q = np.round(w / (scale[:, None, :] if per_channel else scale[:, None, None])).astype(np.int8)
        for suffix, value in (("", q), ("_scale", scale), ("_zp", np.zeros(scale.shape, np.int8))):
            inits.append(numpy_helper.from_array(value, name + suffix))
        return [name, name + "_scale", name + "_zp"]

    w, r = weight("W", INPUT), weight("R", hidden)
    inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 8 * hidden)) * 0.5).astype(np.float32), "B"))
    names = ["x", w[0], r[0], "B"]
    names.append(_sequence_lens(seq_lens, batch, graph_inputs, inits))
    for state in ("h0", "c0"):
        if states:
            graph_inputs.append(helper.make_tensor_value_info(state, TensorProto.FLOAT, [dirs, batch, hidden]))
        names.append(state if states else "")
    names += ["", w[1], w[2], r[1], r[2]]
    node = helper.make_node("DynamicQuantizeLSTM", names, ["y", "y_h", "y_c"], name="qlstm0", domain="com.microsoft",
                            hidden_size=hidden, direction=direction)
    graph = helper.make_graph([node], "qlstm", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "y_h", "y_c")],
                              inits)
    opsets = [helper.make_opsetid("", 14), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize(("direction", "batch", "hidden", "per_channel", "states", "seq_lens"), [
    ("forward", 1, HIDDEN, False, False, None),
    ("reverse", BATCH, HIDDEN, True, True, None),
    ("bidirectional", 3, HIDDEN, False, True, [3, 2, 1]),
    ("bidirectional", BATCH, HIDDEN, True, True, "input"),
    ("forward", 3, 260, True, True, None),  # above 256 hidden units ONNX Runtime quantizes the whole batch
])
def test_unrolled_dynamic_quantize_lstm_matches_onnxruntime(direction, batch, hidden, per_channel, states, seq_lens):
    """The unrolled graph (run by ONNX Runtime too) quantizes what ONNX Runtime's kernel quantizes."""
    model = _quantized_lstm_model(direction, batch, hidden, per_channel, states, seq_lens)
    feeds = _feeds(model)
    if seq_lens == "input":
        feeds["lens"] = np.array([3, 1][:batch], np.int32)  # the longest shorter than the sequence
    unrolled = unroll_recurrent(copy.deepcopy(model), "m.onnx")
    ops = {n.op_type for n in unrolled.graph.node}
    assert "DynamicQuantizeLSTM" not in ops and {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert not any(n.domain == "com.microsoft" for n in unrolled.graph.node)
    for want, got in zip(_ort(model, feeds, threads=batch), _ort(unrolled, feeds, threads=batch)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("bidirectional", "per_channel", "batch", "hidden"), [
    (False, False, BATCH, 16), (True, True, BATCH, 16),
    (False, True, 3, 260),  # ONNX Runtime quantizes the whole batch's state together: unrolled
], ids=["forward-per-tensor", "bidirectional-per-channel", "whole-batch-unrolled"])
def test_quantize_dynamic_lstm_build(tmp_path, bidirectional, per_channel, batch, hidden):
    """ORT's DynamicQuantizeLSTM builds to integer GEMMs that agree with ONNX Runtime: fused
    into one recurrent kernel where each batch row's state is quantized apart, else unrolled."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    dirs = 2 if bidirectional else 1
    module = nn.LSTM(INPUT, hidden, num_layers=1, bidirectional=bidirectional)
    x, h0, c0 = torch.randn(SEQ, batch, INPUT), torch.randn(dirs, batch, hidden), torch.randn(dirs, batch, hidden)
    float_path = _export(tmp_path, module, (x, (h0, c0)), ["x", "h0", "c0"], dynamo=False)
    quant_path = tmp_path / "lstm-int8.onnx"
    quantize_dynamic(str(float_path), str(quant_path), weight_type=QuantType.QInt8, per_channel=per_channel)
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in onnx.load(str(quant_path)).graph.node)
    feeds = {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()}
    diff, quant = _build_and_compare(tmp_path, quant_path, feeds, threads=batch)
    print(f"DynamicQuantizeLSTM: max |qcompile - ONNX Runtime| = {diff:.3g}")
    assert diff <= ATOL
    matmuls = [layer for layer in quant["layers"] if layer["op"] == "matmul"]
    lstms = [layer for layer in quant["layers"] if layer["op"] == "lstm"]
    if hidden <= 256:
        # Per direction the input projection; the recurrence one kernel, its GEMM integer
        assert (len(matmuls), len(lstms)) == (dirs, 1), quant["layers"]
    else:
        # Per direction the input projection, and per step (the first on h0) one recurrent matmul
        assert (len(matmuls), len(lstms)) == (dirs * (1 + SEQ), 0), quant["layers"]
    assert all(layer["dtype"] == "uint8 x int8 -> int32 -> float32" for layer in matmuls + lstms)
    assert not quant.get("float_ops", {}).get("relax.matmul") and not quant.get("float_nodes")


# -- If on a condition known once the inputs are fixed ------------------------------------------

def _if_model(cond_from_shape: bool) -> onnx.ModelProto:
    """y = x * 2 + bias (then) or x - bias (else); a nested If in the then branch."""
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "bias")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    inner = helper.make_node(
        "If", ["inner_cond"], ["t1"], name="inner_if",
        then_branch=helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t0"])], "it", [],
                                      [helper.make_tensor_value_info("t0", TensorProto.FLOAT, None)]),
        else_branch=helper.make_graph([helper.make_node("Neg", ["x"], ["t0"])], "ie", [],
                                      [helper.make_tensor_value_info("t0", TensorProto.FLOAT, None)]),
    )
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["inner_cond"], value=numpy_helper.from_array(np.array(True))),
         inner, helper.make_node("Add", ["t1", "bias"], ["out"])],
        "then", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Sub", ["x", "bias"], ["out"])], "else", [],
                                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    if cond_from_shape:  # x.shape[0] == 1: a Shape -> Gather -> Equal chain
        nodes = [helper.make_node("Shape", ["x"], ["s"]),
                 helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
                 helper.make_node("Equal", ["b", "one"], ["cond"])]
        inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 numpy_helper.from_array(np.array(1, np.int64), "one")]
    else:
        nodes = [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array([False])))]
        inits = []
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="top_if", then_branch=then_branch,
                                  else_branch=else_branch))
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              inits + [bias, two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("cond_from_shape", [True, False], ids=["shape", "constant"])
def test_constant_if_is_inlined(cond_from_shape):
    model = _if_model(cond_from_shape)
    fixed, _, _ = onnx_shapes.fix_input_shapes(copy.deepcopy(model), {"x": (1, 4)}, "m.onnx")
    folded = onnx_shapes.fold_shape_computations(fixed)
    assert [n.op_type for n in folded.graph.node if n.op_type == "If"] == []
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    np.testing.assert_allclose(_ort(folded, {"x": x})[0], _ort(fixed, {"x": x})[0], rtol=0, atol=1e-6)


def test_lstm_in_constant_if_branch():
    """Folding runs before unrolling: the taken branch's LSTM (weights local to it) unrolls."""
    def branch(direction: str, seed: int):
        inner = _rnn_model("LSTM", direction, states=True, seed=seed).graph
        return helper.make_graph(inner.node, direction, [], inner.output, inner.initializer)

    top = _rnn_model("LSTM", states=True)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["b"], axis=0),
             helper.make_node("Equal", ["b", "batch"], ["cond"]),
             helper.make_node("If", ["cond"], ["y", "y_h", "y_c"], name="by_batch",
                              then_branch=branch("reverse", 1), else_branch=branch("forward", 2))]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(BATCH, np.int64), "batch")]
    graph = helper.make_graph(nodes, "vad", top.graph.input, top.graph.output, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    feeds = _feeds(model)
    folded = unroll_recurrent(onnx_shapes.fold_shape_computations(copy.deepcopy(model)), "m.onnx")
    assert {n.op_type for n in folded.graph.node}.isdisjoint({"If", "LSTM"})
    for want, got in zip(_ort(model, feeds), _ort(folded, feeds)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_constant_if_builds(tmp_path):
    path = tmp_path / "if.onnx"
    onnx.save(_if_model(cond_from_shape=True), str(path))
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    artifact = qcompile.compile(path, "x86-avx2", out_dir=tmp_path / "out", tuning_logs=False,
                                input_shapes={"x": (1, 4)})
    got = qcompile.load(artifact.library).run({"x": x})["y"]
    np.testing.assert_allclose(got, x * 2 + np.arange(4, dtype=np.float32), rtol=0, atol=1e-6)


# -- an operator nothing imports ----------------------------------------------------------------

def test_unimportable_operator_is_named(tmp_path, cli):
    node = helper.make_node("Det", ["x"], ["y"], name="det0")
    graph = helper.make_graph([node], "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelImportError) as info:
        qcompile.import_model(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("operator Det", "node 'det0'", "--input-shape", str(path)):
        assert fragment in message, message
    result = cli("build", path, "-o", tmp_path / "out", "--quiet")
    assert result.code == 3 and "error: " in result.err and "operator Det" in result.err, result.err
