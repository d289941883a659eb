"""int8 beyond CNNs: linear layers on 3-D activations, attention's two-activation matmuls,
1-D and transposed convs, and a BERT-shaped encoder through PTQ and as an ONNX Runtime
QDQ model.

The kernel tests write a QDQ module by hand, realize it and compare with numpy's model of
the same integer arithmetic (bit-exact, or at most 1 LSB where float32 summation order can
move a value across a rounding tie), as tests/test_realize_exact.py does for CNN layers.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_realize_exact import (
    _run,
    assert_within_one_lsb,
    dq,
    f32,
    q,
    quantize_np,
    requantize_np,
)
from tvm import relax

from qcompile.passes.bindings import Graph, dtype_of, op_name
from qcompile.quantize.canonicalize import canonicalize_qdq
from qcompile.quantize.realize import realize

RNG = np.random.default_rng(11)


def float_matmuls(mod) -> list[str]:
    """The matmuls of ``main`` still on float32 inputs."""
    return [var.name for var, value in Graph.from_main(mod["main"]).bindings
            if op_name(value) == "relax.matmul" and dtype_of(value.args[0]) == "float32"]


# ----------------------------------------------------------------------------- linear layers


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("act_dtype, zx", [("uint8", 121), ("int8", 0)])
def test_linear_on_3d_activations(act_dtype, zx, transposed):
    """``x[B, S, H] @ W[H, N] + b`` (W behind ``permute_dims`` as torch's Linear exports it)
    runs as one integer ``[B*S, H] x [H, N]`` product."""
    b, s, h, n = 2, 5, 24, 12
    x = RNG.standard_normal((b, s, h)).astype("float32")
    wq = RNG.integers(-127, 128, (h, n)).astype("int8")
    sw = RNG.uniform(0.002, 0.01, n).astype("float32")
    sx, sy, zy = 0.03, 0.05, (9 if act_dtype == "uint8" else 0)
    bias_q = RNG.integers(-4000, 4000, n).astype("int32")

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], sx, zx, act_dtype), sx, zx)
        if transposed:  # torch/ONNX: weight stored [N, H], transposed in the graph
            wd = bb.emit(relax.op.permute_dims(dq(bb, relax.const(np.ascontiguousarray(wq.T)), sw, np.zeros(n, "int32"),
                                                  axis=0)))
        else:
            wd = dq(bb, relax.const(wq), sw, np.zeros(n, "int32"), axis=1)
        m = bb.emit(relax.op.matmul(xd, wd))
        bd = dq(bb, relax.const(bias_q), (f32(sx) * sw).astype("float32"), np.zeros(n, "int32"), axis=0)
        return q(bb, bb.emit(relax.op.add(m, bd)), sy, zy, act_dtype)

    bb_mod = _module(body, {"x": x})
    mod, report = realize(canonicalize_qdq(bb_mod))
    assert float_matmuls(mod) == [] and "R.dequantize(" not in mod["main"].script()
    matmuls = [v for _, v in Graph.from_main(mod["main"]).bindings if op_name(v) == "relax.matmul"]
    assert [tuple(int(d) for d in m.args[0].ty.shape) for m in matmuls] == [(b * s, h)]  # one 2-D product
    assert report.layers[0]["name"] == "matmul_0" and report.layers[0]["op"] == "matmul"
    got = _build_run(mod, [x])
    xq = quantize_np(x, sx, zx, act_dtype).astype(np.int64)
    acc = (xq - zx) @ wq.astype(np.int64) + bias_q
    assert_within_one_lsb(got, requantize_np(acc, f32(sx) * sw / f32(sy), zy, act_dtype))


def _module(build_body, inputs: dict[str, np.ndarray]) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(a.shape, str(a.dtype))) for n, a in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build_body(bb, params))
        bb.emit_func_output(out)
    return bb.get()


def _build_run(mod: tvm.IRModule, arrays: list[np.ndarray]) -> np.ndarray:
    from test_realize_exact import TARGET

    from qcompile.build.pipeline import compile_module

    vm = relax.VirtualMachine(compile_module(mod, TARGET), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


# ----------------------------------------------------------------------------- attention


ATTENTION = {
    # Q.K^T: both asymmetric uint8 activations
    "qk_uint8": {"a": (2, 2, 8, 16), "b": (2, 2, 16, 8), "da": "uint8", "za": 131, "db": "uint8", "zb": 97},
    # P.V: softmax output (zero point 0) times an asymmetric V
    "pv_uint8": {"a": (1, 2, 8, 8), "b": (1, 2, 8, 16), "da": "uint8", "za": 0, "db": "uint8", "zb": 118},
    # symmetric int8 activations; the batch dims broadcast
    "qk_int8": {"a": (2, 3, 8, 16), "b": (1, 3, 16, 8), "da": "int8", "za": 0, "db": "int8", "zb": 0},
    # 3-D batched matmul (as .pt2 exports attention)
    "bmm_3d": {"a": (4, 8, 16), "b": (4, 16, 8), "da": "uint8", "za": 140, "db": "uint8", "zb": 60},
}


@pytest.mark.parametrize("case", sorted(ATTENTION))
@pytest.mark.parametrize("float_out", [False, True])
def test_matmul_of_two_activations(case, float_out):
    """``matmul(dq(a), dq(b))`` -> an integer matmul with zero-point row/column sums,
    requantized (or scaled to float32 where nothing re-quantizes it)."""
    p = ATTENTION[case]
    a = RNG.standard_normal(p["a"]).astype("float32")
    b = RNG.standard_normal(p["b"]).astype("float32")
    if p["za"] == 0 and p["da"] == "uint8":
        a = np.abs(a)  # a softmax output
    sa, sb, sy, zy = 0.02, 0.015, 0.11, (128 if p["da"] == "uint8" else 0)

    def body(bb, params):
        ad = dq(bb, q(bb, params[0], sa, p["za"], p["da"]), sa, p["za"])
        bd = dq(bb, q(bb, params[1], sb, p["zb"], p["db"]), sb, p["zb"])
        m = bb.emit(relax.op.matmul(ad, bd))
        return m if float_out else q(bb, m, sy, zy, p["da"])

    got, mod, report = _run(body, {"a": a, "b": b})
    assert float_matmuls(mod) == []
    assert "R.dequantize(" not in mod["main"].script()
    layer = report.layers[0]
    assert layer["op"] == "matmul" and layer["dtype"].startswith(f"{p['da']} x {p['db']} -> int32")
    assert (layer["input_scale"], layer["rhs_scale"]) == (f32(sa), f32(sb))
    aq = quantize_np(a, sa, p["za"], p["da"]).astype(np.int64) - p["za"]
    bq = quantize_np(b, sb, p["zb"], p["db"]).astype(np.int64) - p["zb"]
    acc = np.matmul(aq, bq)
    if float_out:
        np.testing.assert_allclose(got, acc.astype(np.float32) * f32(f32(sa) * f32(sb)), rtol=1e-6)
    else:
        assert_within_one_lsb(got, requantize_np(acc, np.float32(f32(sa) * f32(sb) / f32(sy)), zy, p["da"]))


def test_attention_scale_moves_into_the_quantization_scale():
    """``quantize(multiply(dq(x, s), c), s * c)`` -- PTQ's form of Q * 1/sqrt(d) -- is the
    int8 tensor itself."""
    s, z, c = 0.02, 100, 0.42044821
    x = relax.Var("x", relax.TensorType((1, 2, 4, 8), "float32"))

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            xq = q(bb, x, s, z, "uint8")
            y = bb.emit(relax.op.multiply(dq(bb, xq, s, z), relax.const(c, "float32")))
            out = bb.emit_output(dq(bb, q(bb, y, float(np.float32(s * c)), z, "uint8"), float(np.float32(s * c)), z))
        bb.emit_func_output(out)
    before = bb.get()

    def one(v, dtype):
        return relax.const(np.array([v], dtype))

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            xq = bb.emit(relax.op.quantize(x, one(s, "float32"), one(z, "int32"), axis=-1, out_dtype="uint8"))
            out = bb.emit_output(relax.op.dequantize(xq, one(np.float32(s * c), "float32"), one(z, "int32"), axis=-1))
        bb.emit_func_output(out)
    expected = bb.get()

    realized, _ = realize(before)
    realized = relax.transform.CanonicalizeBindings()(realized)  # the output's alias of the last var
    tvm.ir.assert_structural_equal(realized["main"], expected["main"])


# ----------------------------------------------------------------------------- 1-D and transposed convs


def conv1d_int(x: np.ndarray, w: np.ndarray, stride: int, pad: int, pad_value: int) -> np.ndarray:
    """Direct NCW/OIW integer convolution in int64."""
    n, c, length = x.shape
    k = w.shape[2]
    xp = np.full((n, c, length + 2 * pad), pad_value, np.int64)
    xp[:, :, pad:pad + length] = x
    ol = (length + 2 * pad - k) // stride + 1
    return sum(np.einsum("ncl,oc->nol", xp[:, :, i:i + stride * ol:stride], w[:, :, i].astype(np.int64)) for i in range(k))


def conv2d_transpose_int(x: np.ndarray, w: np.ndarray, stride: int, pad: int, output_padding: int) -> np.ndarray:
    """NCHW/IOHW integer transposed convolution in int64, by scattering each input tap."""
    n, _, h, wd = x.shape
    _, o, kh, kw = w.shape
    full = np.zeros((n, o, (h - 1) * stride + kh + output_padding, (wd - 1) * stride + kw + output_padding), np.int64)
    for i in range(kh):
        for j in range(kw):
            full[:, :, i:i + (h - 1) * stride + 1:stride, j:j + (wd - 1) * stride + 1:stride] += np.einsum(
                "nchw,co->nohw", x, w[:, :, i, j].astype(np.int64))
    oh, ow = (h - 1) * stride - 2 * pad + kh + output_padding, (wd - 1) * stride - 2 * pad + kw + output_padding
    return full[:, :, pad:pad + oh, pad:pad + ow]


@pytest.mark.parametrize("act_dtype, zx", [("uint8", 125), ("int8", 0)])
def test_conv1d(act_dtype, zx):
    c, o, k, stride, pad = 6, 10, 3, 2, 1
    x = RNG.standard_normal((2, c, 17)).astype("float32")
    wq = RNG.integers(-127, 128, (o, c, k)).astype("int8")
    sw = RNG.uniform(0.002, 0.01, o).astype("float32")
    sx, sy, zy = 0.025, 0.04, (5 if act_dtype == "uint8" else 0)
    bias_q = RNG.integers(-3000, 3000, o).astype("int32")

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], sx, zx, act_dtype), sx, zx)
        wd = dq(bb, relax.const(wq), sw, np.zeros(o, "int32"), axis=0)
        y = bb.emit(relax.op.nn.conv1d(xd, wd, strides=stride, padding=pad))
        bd = dq(bb, relax.const(bias_q.reshape(1, -1, 1)), (f32(sx) * sw).astype("float32"), np.zeros(o, "int32"), axis=1)
        return q(bb, bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, bd)))), sy, zy, act_dtype)

    got, mod, report = _run(body, {"x": x})
    assert report.layers[0]["op"] == "conv1d" and "R.dequantize(" not in mod["main"].script()
    xq = quantize_np(x, sx, zx, act_dtype).astype(np.int64)
    acc = conv1d_int(xq - zx, wq, stride, pad, 0) + bias_q.reshape(1, -1, 1)
    assert_within_one_lsb(got, requantize_np(acc, (f32(sx) * sw / f32(sy)).reshape(1, -1, 1), zy, act_dtype, relu=True))


@pytest.mark.parametrize("stride, pad, output_padding", [(2, 1, 1), (2, 0, 0), (1, 1, 0)])
def test_conv2d_transpose(stride, pad, output_padding):
    """The input zero point reaches each output through a different set of taps: the
    correction is ``zx * conv2d_transpose(ones, W)``, a constant."""
    c, o, k, zx = 4, 6, 3, 119
    x = RNG.standard_normal((1, c, 5, 6)).astype("float32")
    wq = RNG.integers(-127, 128, (c, o, k, k)).astype("int8")
    sw = RNG.uniform(0.002, 0.01, o).astype("float32")
    sx, sy, zy = 0.02, 0.06, 120

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], sx, zx, "uint8"), sx, zx)
        wd = dq(bb, relax.const(wq), sw, np.zeros(o, "int32"), axis=1)
        y = bb.emit(relax.op.nn.conv2d_transpose(xd, wd, strides=stride, padding=pad, output_padding=output_padding))
        return q(bb, y, sy, zy, "uint8")

    got, mod, report = _run(body, {"x": x})
    assert report.layers[0]["op"] == "conv2d_transpose" and "R.dequantize(" not in mod["main"].script()
    xq = quantize_np(x, sx, zx, "uint8").astype(np.int64)
    acc = conv2d_transpose_int(xq - zx, wq, stride, pad, output_padding)
    assert got.shape == acc.shape
    assert_within_one_lsb(got, requantize_np(acc, (f32(sx) * sw / f32(sy)).reshape(1, -1, 1, 1), zy, "uint8"))


# ----------------------------------------------------------------------------- PTQ on attention


def attention_block() -> tuple[tvm.IRModule, dict[str, relax.Var]]:
    """One self-attention block as the ONNX importer writes BERT's: projections with bias,
    heads split by reshape/permute_dims, Q and K^T scaled by 1/d^(1/4), a float mask added to
    the scores, softmax, P.V, output projection, residual add and LayerNorm."""
    s, h, heads = 8, 16, 2
    d = h // heads
    rng = np.random.default_rng(2)
    const = lambda *shape: relax.const(rng.standard_normal(shape).astype("float32") * 0.3)
    x = relax.Var("x", relax.TensorType((1, s, h), "float32"))
    mask = relax.Var("mask", relax.TensorType((1, 1, 1, s), "float32"))
    bb = relax.BlockBuilder()
    names = {}
    with bb.function("main", [x, mask]):
        with bb.dataflow():
            def proj(name, inp):
                m = bb.emit(relax.op.matmul(inp, const(h, h)), name)
                names[name] = m
                return bb.emit(relax.op.add(const(h), m), name + "_bias")

            def heads_of(t, axes):
                return bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(t, (1, s, heads, d))), axes))

            scale = relax.const(np.float32(d ** -0.25))
            qh = bb.emit(relax.op.multiply(heads_of(proj("q", x), [0, 2, 1, 3]), scale), "q_scaled")
            kh = bb.emit(relax.op.multiply(heads_of(proj("k", x), [0, 2, 3, 1]), scale), "k_scaled")
            vh = heads_of(proj("v", x), [0, 2, 1, 3])
            scores = names["scores"] = bb.emit(relax.op.matmul(qh, kh), "scores")
            probs = names["probs"] = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.add(scores, mask)), axis=-1), "probs")
            ctx = names["ctx"] = bb.emit(relax.op.matmul(probs, vh), "ctx")
            merged = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(ctx, [0, 2, 1, 3])), (1, s, h)))
            o = proj("o", merged)
            res = bb.emit(relax.op.add(o, x))
            ln = bb.emit(relax.op.nn.layer_norm(res, relax.const(np.ones(h, "float32")),
                                                relax.const(np.zeros(h, "float32")), axes=[-1]))
            out = bb.emit_output(ln)
        bb.emit_func_output(out)
    names.update(x=x, q_scaled=qh, k_scaled=kh)
    return bb.get(), names


def test_ptq_plan_for_attention():
    """Every matmul is a layer; Q.K^T (read by the float mask add) and the output projection
    (read by the residual add before LayerNorm) are not requantized; the attention scale is
    an alias of the projection's range; the float ops left are the mask add, softmax,
    residual add and LayerNorm."""
    from qcompile.quantize import Int8Config
    from qcompile.quantize.ptq import annotate

    mod, v = attention_block()
    plan = annotate(mod["main"], Int8Config())
    assert [(r.name, r.weight is None) for r in plan.regions] == [
        ("matmul_0", False), ("matmul_1", False), ("matmul_2", False), ("matmul_3", True), ("matmul_4", True),
        ("matmul_5", False)]
    scores = plan.regions[3]
    assert scores.data.same_as(v["q_scaled"]) and scores.rhs.same_as(v["k_scaled"])
    observed = {var.name for var in plan.observed}
    assert {"x", "q_bias", "k_bias", "v_bias", "probs", "ctx"} <= observed
    assert not observed & {"scores", "o_bias", "q_scaled", "k_scaled"}
    root, factor = plan.alias[v["q_scaled"]]
    assert root.name == "q_bias" and factor == pytest.approx(8 ** -0.25)
    assert plan.skipped == {"relax.add": 2, "relax.nn.softmax": 1, "relax.nn.layer_norm": 1}


def test_ptq_attention_block_is_integer_and_close_to_float():
    from test_realize_exact import TARGET

    from qcompile.build.pipeline import compile_module
    from qcompile.passes.bindings import with_main
    from qcompile.quantize import Int8Config
    from qcompile.quantize.ptq import annotate, calibrate, emit_qdq

    mod, _ = attention_block()
    config = Int8Config()
    rng = np.random.default_rng(4)
    mask = np.zeros((1, 1, 1, 8), "float32")
    mask[..., -2:] = -1e4
    batches = [{"x": rng.standard_normal((1, 8, 16)).astype("float32"), "mask": mask} for _ in range(8)]
    plan = annotate(mod["main"], config)
    ranges = calibrate(mod, plan, batches, config, TARGET)
    qdq, _, _ = emit_qdq(mod["main"], plan, ranges, config)
    realized, report = realize(with_main(mod, qdq))
    assert float_matmuls(realized) == []
    assert [layer["name"] for layer in report.layers] == [f"matmul_{i}" for i in range(6)]
    assert report.layers[3]["dtype"] == "uint8 x uint8 -> int32 -> float32"  # Q.K^T: float into the mask add
    assert report.layers[4]["dtype"] == "uint8 x uint8 -> int32 -> uint8"  # P.V: requantized for the projection
    ref = relax.VirtualMachine(compile_module(mod, TARGET), tvm.cpu())
    ours = relax.VirtualMachine(compile_module(realized, TARGET), tvm.cpu())
    for batch in batches[:4]:
        args = [tvm.runtime.tensor(batch["x"]), tvm.runtime.tensor(mask)]
        a, b = ref["main"](*args).numpy().ravel(), ours["main"](*args).numpy().ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.995


# ----------------------------------------------------------------------------- a BERT-shaped encoder

SEQ = 16


def bert_feeds(rng: np.random.Generator, padded: int = 0) -> dict[str, np.ndarray]:
    mask = np.ones((1, SEQ), "int64")
    mask[:, SEQ - padded:] = 0
    return {"input_ids": rng.integers(0, 100, (1, SEQ)).astype("int64"), "attention_mask": mask}


def export_bert(path, dynamic_batch: bool = False):
    """A random-weight 2-layer BERT (hidden 64, 2 heads, vocabulary 100) exported by the
    TorchScript exporter, its last hidden state the output."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                vocab_size=100)).eval()

    class LastHidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]

    example = bert_feeds(np.random.default_rng(0))
    dynamic = {name: {0: "batch"} for name in example} if dynamic_batch else None
    torch.onnx.export(LastHidden(), tuple(torch.from_numpy(a) for a in example.values()), str(path),
                      input_names=list(example), output_names=["last_hidden_state"], opset_version=17,
                      dynamic_axes=dynamic, dynamo=False)
    return path


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    return export_bert(tmp_path_factory.mktemp("bert") / "bert.onnx")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bert_encoder_ptq(bert_onnx, tmp_path):
    """All 16 matmuls (12 linear layers, 4 attention products) integer; the float ops left
    are the embeddings, LayerNorm, the mask add, softmax and GELU; cosine to float32 >= 0.99."""
    import qcompile

    rng = np.random.default_rng(1)
    calib = [bert_feeds(rng, padded=i % 3) for i in range(8)]
    data = {k: np.concatenate([c[k] for c in calib]) for k in calib[0]}
    fp32 = qcompile.compile(bert_onnx, "native", out_dir=tmp_path, tuning_logs=False)
    int8 = qcompile.compile(bert_onnx, "native", quantization=qcompile.Int8Config(num_samples=8), calibration_data=data,
                            out_dir=tmp_path, tuning_logs=False)
    quant = int8.manifest.quantization
    matmuls = [layer for layer in quant["layers"] if layer["op"] == "matmul"]
    assert len(matmuls) == 16 and sum("rhs_scale" in layer for layer in matmuls) == 4
    assert "relax.matmul" not in quant["float_ops"]
    assert set(quant["float_ops"]) <= {"relax.take", "relax.add", "relax.nn.layer_norm", "relax.where",
                                       "relax.nn.softmax", "relax.divide", "relax.erf", "relax.multiply"}
    a, b = qcompile.load(fp32.library), qcompile.load(int8.library)
    worst = min(cosine(a.run(x)["last_hidden_state"], b.run(x)["last_hidden_state"])
                for x in (bert_feeds(rng, padded=i % 4) for i in range(8)))
    assert worst >= 0.99, worst


def test_bert_encoder_onnxruntime_qdq(tmp_path):
    """ONNX Runtime's quantize_static QDQ form (per-channel weights on axis 1, QDQ around
    both activations of the attention MatMuls, Add, Softmax, LayerNorm; the batch symbolic,
    fixed by the input shapes): every matmul integer, and the output agrees with ONNX
    Runtime executing the same file far closer than ONNX Runtime's int8 agrees with float32."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from test_prequantized import qdq_reference

    import qcompile

    rng = np.random.default_rng(2)
    fp32, pre, qdq = tmp_path / "bert.onnx", tmp_path / "bert-pre.onnx", tmp_path / "bert-qdq.onnx"
    export_bert(fp32, dynamic_batch=True)
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # unpadded: a padded mask adds finfo.min to the scores, and ONNX Runtime's
            # calibration then writes an infinite scale
            self.items = iter([bert_feeds(rng) for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(pre), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    shapes = {name: a.shape for name, a in bert_feeds(rng).items()}
    art = qcompile.compile(qdq, "native", out_dir=tmp_path, tuning_logs=False, input_shapes=shapes)
    quant = art.manifest.quantization
    assert quant["source"] == "onnx-qdq" and quant["float_ops"] == {} and "float_nodes" not in quant
    matmuls = [layer for layer in quant["layers"] if layer["op"] == "matmul"]
    assert len(matmuls) == 16 and sum("rhs_scale" in layer for layer in matmuls) == 4
    ours, ref, fp32 = qcompile.load(art.library), qdq_reference(qdq), qdq_reference(fp32, optimized=True)
    diff, ort_int8 = 0.0, 0.0
    for x in (bert_feeds(rng, padded=i % 4) for i in range(8)):
        expected = ref.run(None, x)[0]
        diff = max(diff, float(np.abs(ours.run(x)["last_hidden_state"] - expected).max()))
        ort_int8 = max(ort_int8, float(np.abs(expected - fp32.run(None, x)[0]).max()))
    assert diff <= 0.1 * ort_int8, (diff, ort_int8)


def test_float_readers_of_an_observed_float_tensor_read_it_unquantized():
    """``ln = layer_norm(x)`` feeds a linear layer and the residual add: the layer reads
    ``dq(q(ln))``, the (float) residual add still reads ``ln`` -- 8-bit noise stays out of the
    residual stream.  The layer's output is read only by that float add: not requantized."""
    from qcompile.quantize import Int8Config
    from qcompile.quantize.ptq import (
        activation_qparams,
        annotate,
        emit_qdq,
        weight_qparams,
    )

    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 16)).astype("float32")
    gamma, beta = relax.const(np.ones(16, "float32")), relax.const(np.zeros(16, "float32"))
    x = relax.Var("x", relax.TensorType((1, 4, 16), "float32"))

    def block(bb, make_linear):
        ln = bb.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1]))
        m = make_linear(ln)
        y = bb.emit(relax.op.add(m, ln))
        return bb.emit_output(relax.op.nn.layer_norm(y, gamma, beta, axes=[-1]))

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = block(bb, lambda ln: bb.emit(relax.op.matmul(ln, relax.const(w))))
        bb.emit_func_output(out)
    before = bb.get()["main"]

    config = Int8Config()
    plan = annotate(before, config)
    assert [v.name for v in plan.observed] == ["lv"] and plan.skipped == {"relax.nn.layer_norm": 2, "relax.add": 1}
    after, _, _ = emit_qdq(before, plan, {plan.observed[0]: (-2.0, 2.0)}, config)
    p = activation_qparams(-2.0, 2.0, config)
    wq, ws = weight_qparams(w, 1, True)

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            def linear(ln):
                scale, zp = relax.const(p.scale, "float32"), relax.const(p.zero_point, "int32")
                q8 = bb.emit(relax.op.quantize(ln, scale, zp, axis=-1, out_dtype="uint8"))
                xd = bb.emit(relax.op.dequantize(q8, scale, zp, axis=-1))
                wd = bb.emit(relax.op.dequantize(relax.const(wq), relax.const(ws), relax.const(np.zeros(16, "int32")),
                                                 axis=1))
                return bb.emit(relax.op.matmul(xd, wd))

            out = block(bb, linear)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get()["main"])
