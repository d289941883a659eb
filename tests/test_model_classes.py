"""Model classes beyond image classifiers build, and match their reference.

Each class is a small model in the form real ones take: a U-Net-style decoder
(ConvTranspose2d, nearest and bilinear Resize, skip concat), a 1-D conv sequence
classifier (int64 or int32 tokens -> Embedding -> Conv1d -> BatchNorm1d -> ReLU -> max /
mean pooling -> Linear), a YOLO-style head (channel split/chunk, SiLU, concat, Resize, two
outputs), a CRNN-style stack (convs, ``squeeze(-2)`` into a sequence), and models with a
top-level ``If`` (on a constant, which the importer folds, and on the data, which stays an
``If`` between dataflow blocks).  Float32 builds are compared
with ONNX Runtime (both ONNX exporters) or PyTorch (``.pt2``) to 1e-4; int8 builds with
the float32 build (relative L2 error and cosine similarity).  Every qcompile pass also
runs over each model's module after the inference phase.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import tvm
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import qcompile
from qcompile.build.pipeline import compile_module, phases_through, run_phases
from qcompile.target import resolve_target

TARGET = "x86-avx2"
ATOL = RTOL = 1e-4


class UNet(nn.Module):
    """Two conv levels down, a ConvTranspose2d up, a skip concat, nearest and bilinear upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, 8, 3, padding=1)
        self.enc2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.enc1(x))
        y = F.relu(self.dec(torch.cat([self.up(F.relu(self.enc2(skip))), skip], 1)))
        nearest = F.interpolate(y, scale_factor=2, mode="nearest")
        bilinear = F.interpolate(self.head(y), scale_factor=2, mode="bilinear", align_corners=False)
        return bilinear + nearest[:, :2]


class SeqNet(nn.Module):
    """A token classifier on 1-D convs; ``adaptive``: AdaptiveMaxPool1d, else ``max(dim)``
    (the .pt2 importer has no adaptive max pool)."""

    def __init__(self, adaptive: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.conv = nn.Conv1d(16, 32, 5, padding=2)
        self.norm = nn.BatchNorm1d(32)
        self.pool = nn.AdaptiveMaxPool1d(1) if adaptive else None
        self.fc = nn.Linear(64, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(self.embed(tokens).transpose(1, 2))))
        peak = self.pool(x).flatten(1) if self.pool is not None else x.max(2).values
        return self.fc(torch.cat([peak, x.mean(2)], 1))


class YoloHead(nn.Module):
    """A CSP-style split/concat block with SiLU, and a detection and an upsampled output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.detect = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.silu(self.stem(x))
        kept, passed = torch.split(y, 8, dim=1)
        y = F.silu(self.mix(torch.cat([kept, F.silu(self.inner(passed))], 1)))
        low, high = y.chunk(2, 1)
        return self.detect(y), F.interpolate(torch.cat([high, low], 1), scale_factor=2, mode="nearest")


class CRNN(nn.Module):
    """Convs down to a height of 1, ``squeeze(-2)`` into a sequence, a Linear per step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, (4, 3), padding=(0, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(y.squeeze(-2).transpose(1, 2))


@dataclass(frozen=True)
class Case:
    """A model class: the module, an example input, and calibration data (samples first)."""

    make: Callable[[], nn.Module]
    example: Callable[[np.random.Generator], np.ndarray]
    calibration: Callable[[np.random.Generator], np.ndarray]


def _images(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    return rng.standard_normal((n, 3, 16, 16)).astype(np.float32)


def _tokens(dtype: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    return lambda rng, n=2: rng.integers(0, 256, (n, 32)).astype(dtype)


CASES = {
    "unet": Case(UNet, _images, lambda rng: _images(rng, 4)),
    "seq-int64": Case(SeqNet, _tokens("int64"), lambda rng: _tokens("int64")(rng, 8)),
    "seq-int32": Case(SeqNet, _tokens("int32"), lambda rng: _tokens("int32")(rng, 8)),
    "yolo": Case(YoloHead, _images, lambda rng: _images(rng, 4)),
    "crnn": Case(CRNN, lambda rng, n=1: rng.standard_normal((n, 1, 4, 16)).astype(np.float32),
                 lambda rng: rng.standard_normal((4, 1, 4, 16)).astype(np.float32)),
}


def _module(name: str, pt2: bool = False) -> nn.Module:
    torch.manual_seed(0)
    module = SeqNet(adaptive=False) if pt2 and name.startswith("seq") else CASES[name].make()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that folding them is tested
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


def _export_onnx(name: str, folder: Path, dynamo: bool) -> tuple[Path, np.ndarray]:
    example = CASES[name].example(np.random.default_rng(1))
    path = folder / f"{name}.onnx"
    torch.onnx.export(_module(name), (torch.from_numpy(example),), str(path), input_names=["input"], dynamo=dynamo)
    return path, example


def _build(model, folder: Path, **options) -> qcompile.CompiledModel:
    artifact = qcompile.compile(model, TARGET, out_dir=folder, tuning_logs=False, **options)
    return qcompile.load(artifact.library)


def _ort(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)


def _assert_outputs(got: dict[str, np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for out, ref in zip(got.values(), expected):
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


# -- float32 against the reference ------------------------------------------------------------


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-export", "dynamo-export"])
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_export_builds_and_matches_onnxruntime(name, dynamo, tmp_path):
    path, example = _export_onnx(name, tmp_path, dynamo)
    model = _build(path, tmp_path / "out")
    inputs = {model.inputs[0].name: example}
    _assert_outputs(model.run(inputs), _ort(path, inputs))


@pytest.mark.parametrize("name", list(CASES))
def test_pt2_builds_and_matches_pytorch(name, tmp_path):
    module = _module(name, pt2=True)
    example = torch.from_numpy(CASES[name].example(np.random.default_rng(1)))
    path = tmp_path / f"{name}.pt2"
    torch.export.save(torch.export.export(module, (example,)), str(path))
    with torch.no_grad():
        expected = module(example)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    model = _build(path, tmp_path / "out")
    _assert_outputs(model.run({model.inputs[0].name: example.numpy()}), [t.numpy() for t in expected])


# -- int8 against float32 ---------------------------------------------------------------------


def _agreement(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of ``got`` to ``ref``."""
    got, ref = got.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))


@pytest.mark.parametrize("name", list(CASES))
def test_int8_builds_and_agrees_with_float32(name, tmp_path):
    # Calibration data: samples first, as the model's input dtype (tokens stay integers).
    path, _ = _export_onnx(name, tmp_path, dynamo=False)
    calibration = CASES[name].calibration(np.random.default_rng(2))
    float_model = _build(path, tmp_path / "f32")
    int8_model = _build(path, tmp_path / "int8", quantization=qcompile.Int8Config(num_samples=4),
                        calibration_data={float_model.inputs[0].name: calibration})
    assert int8_model.manifest.quantization["layers"], "no layer was quantized"
    rng = np.random.default_rng(3)
    for _ in range(2):
        inputs = {float_model.inputs[0].name: CASES[name].example(rng)}
        for got, ref in zip(int8_model.run(inputs).values(), float_model.run(inputs).values()):
            error, cosine = _agreement(got, ref)
            assert error < 0.05 and cosine > 0.998, (error, cosine)


# -- If ---------------------------------------------------------------------------------------


def _if_onnx(path: Path, condition: str) -> None:
    """conv -> If (Relu / Sigmoid branch) -> conv + skip; ``condition``: "constant" (a
    Constant node, True) or "data" (mean(x) > 0)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
               for name, shape in (("w1", (8, 4, 3, 3)), ("w2", (8, 8, 3, 3)))]
    branch = {name: helper.make_graph([helper.make_node(op, ["c"], [name])], name, [],
                                      [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, 8, 8])])
              for name, op in (("then", "Relu"), ("else", "Sigmoid"))}
    if condition == "constant":
        cond = [helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))]
    else:
        weights.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        cond = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0), helper.make_node("Greater", ["m", "zero"], ["cond"])]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), *cond,
             helper.make_node("If", ["cond"], ["i"], then_branch=branch["then"], else_branch=branch["else"]),
             helper.make_node("Conv", ["i", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c2", "c"], ["y"])]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.parametrize("condition", ["constant", "data"])
def test_onnx_if_builds_and_matches_onnxruntime(condition, tmp_path):
    path = tmp_path / "if.onnx"
    _if_onnx(path, condition)
    model = _build(path, tmp_path / "out")
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    for shift in (2.0, -2.0):  # mean(x) > 0 and < 0: both branches of the data If
        inputs = {"x": x + shift}
        _assert_outputs(model.run(inputs), _ort(path, inputs))


def test_onnx_data_if_is_an_if_between_blocks_after_the_inference_phase():
    # what the next tests' TVMScript modules stand for
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "if.onnx"
        _if_onnx(path, "data")
        mod = qcompile.import_model(path).mod
    mod = run_phases(mod, resolve_target(TARGET).to_tvm(), phases=phases_through("inference"))
    blocks = mod["main"].body.blocks
    assert [type(b).__name__ for b in blocks] == ["DataflowBlock", "BindingBlock", "DataflowBlock"]
    assert isinstance(blocks[1].bindings[0].value, relax.If)


def _weight(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)


def _bind_weights(mod: tvm.IRModule, seed: int) -> tvm.IRModule:
    """``mod`` with ``main``'s parameter ``w`` bound as a constant, as an imported model holds it."""
    return relax.transform.BindParams("main", {"w": tvm.runtime.tensor(_weight(seed))})(mod)


@I.ir_module
class _TopLevelIf:
    @R.function
    def main(x: R.Tensor((1, 8, 8, 8), "float32"), flag: R.Tensor((), "bool"),
             w: R.Tensor((8, 8, 3, 3), "float32")) -> R.Tensor((1, 8, 8, 8), "float32"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=(1, 1))
            a = R.nn.relu(c)
            R.output(c, a)
        if flag:
            with R.dataflow():
                inner = R.nn.conv2d(a, w, padding=(1, 1))
                t = R.nn.relu(inner)
                R.output(t)
            r = t
        else:
            r = R.sigmoid(c)
        with R.dataflow():
            d = R.nn.conv2d(r, w, padding=(1, 1))
            gv = R.add(d, c)
            R.output(gv)
        return gv


@I.ir_module
class _TwoBlocks:
    @R.function
    def main(x: R.Tensor((1, 8, 8, 8), "float32"), w: R.Tensor((8, 8, 3, 3), "float32")
             ) -> R.Tuple(R.Tensor((1, 8, 8, 8), "float32"), R.Tensor((1, 8, 8, 8), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=(1, 1))
            b = R.add(c, R.const(0.5, "float32"))
            R.output(b)
        s = R.multiply(b, R.const(2.0, "float32"))
        with R.dataflow():
            d = R.nn.conv2d(s, w, padding=(1, 1))
            e = R.nn.relu(R.add(d, b))
            gv = (e, b)
            R.output(gv)
        return gv


TopLevelIf = _bind_weights(_TopLevelIf, 0)
TwoBlocks = _bind_weights(_TwoBlocks, 1)


def _top_level_if_reference(x: torch.Tensor, flag: bool) -> list[torch.Tensor]:
    w = torch.from_numpy(_weight(0))
    c = F.conv2d(x, w, padding=1)
    r = F.relu(F.conv2d(F.relu(c), w, padding=1)) if flag else torch.sigmoid(c)
    return [F.conv2d(r, w, padding=1) + c]


def _two_blocks_reference(x: torch.Tensor) -> list[torch.Tensor]:
    w = torch.from_numpy(_weight(1))
    b = F.conv2d(x, w, padding=1) + 0.5
    return [F.relu(F.conv2d(b * 2.0, w, padding=1) + b), b]


def _run_vm(executable, *args: np.ndarray) -> list[np.ndarray]:
    result = relax.VirtualMachine(executable, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return [result.numpy()] if hasattr(result, "numpy") else [t.numpy() for t in result]


def test_multi_block_modules_build_and_match_pytorch():
    # (TVM 0.27's own pipelines do not run the If: "zero" fails in VM code generation,
    # "default" builds one that crashes in memory allocation.)
    x = np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float32)
    target = resolve_target(TARGET).to_tvm()
    counts: dict = {}
    executable = compile_module(TopLevelIf, target, kernel_counts=counts)
    assert counts["float"] == 2, counts  # the convs of the top-level blocks run on qcompile's kernel
    for flag in (True, False):
        expected = _top_level_if_reference(torch.from_numpy(x), flag)
        for got, ref in zip(_run_vm(executable, x, np.array(flag)), expected):
            np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=ATOL)
    counts = {}
    executable = compile_module(TwoBlocks, target, kernel_counts=counts)
    assert counts["float"] == 2, counts
    for got, ref in zip(_run_vm(executable, x), _two_blocks_reference(torch.from_numpy(x))):
        np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=ATOL)


# -- every pass over every model class --------------------------------------------------------


MODULES = [*CASES, *(f"{name}-pt2" for name in CASES), "onnx-if", "top-level-if", "two-dataflow-blocks"]


@pytest.fixture(scope="module")
def inference_modules(tmp_path_factory) -> dict[str, tvm.IRModule]:
    """Each model class's module after the inference phase (what the later passes meet)."""
    folder = tmp_path_factory.mktemp("classes")
    target = resolve_target(TARGET).to_tvm()
    mods = {}
    for name in CASES:
        path, example = _export_onnx(name, folder, dynamo=False)
        mods[name] = qcompile.import_model(path).mod
        pt2 = folder / f"{name}.pt2"  # (torch.export keeps negative axes: the CRNN's squeeze(-2))
        torch.export.save(torch.export.export(_module(name, pt2=True), (torch.from_numpy(example),)), str(pt2))
        mods[f"{name}-pt2"] = qcompile.import_model(pt2).mod
    _if_onnx(folder / "if.onnx", "data")
    mods["onnx-if"] = qcompile.import_model(folder / "if.onnx").mod
    mods["top-level-if"], mods["two-dataflow-blocks"] = TopLevelIf, TwoBlocks
    assert sorted(mods) == sorted(MODULES)
    return {name: run_phases(mod, target, phases=phases_through("inference")) for name, mod in mods.items()}


def _tir(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The kernels of ``mod`` through all Relax phases and TVM's TIR lowering: what
    StackTiles and BalanceParallel run on."""
    from qcompile.build.pipeline import PHASES, default_schedule_passes, with_tuning

    lowered = run_phases(mod, target, phases=with_tuning(default_schedule_passes(target)))
    prims = tvm.IRModule({gv: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
    lower, _, _ = tvm.tirx.get_tir_pipeline("default")
    assert PHASES  # (all phases ran)
    return lower(tvm.tirx.transform.BindTarget(target.with_host(target) if target.host is None else target)(prims))


@pytest.mark.parametrize("name", MODULES)
def test_every_pass_handles_every_model_class(name, inference_modules):
    from qcompile.passes.balance_parallel import BalanceParallel
    from qcompile.passes.bindings import Graph, rebuild, with_main
    from qcompile.passes.fold_channel_affine import FoldChannelAffine
    from qcompile.passes.pack_conv import pack_conv, to_nhwc
    from qcompile.passes.stack_tiles import StackTiles
    from qcompile.quantize.canonicalize import canonicalize_qdq
    from qcompile.quantize.ptq import annotate, emit_qdq
    from qcompile.quantize.realize import realize

    target = resolve_target(TARGET).to_tvm()
    config = qcompile.Int8Config().for_target(target)
    mod = inference_modules[name]
    main = mod["main"]
    # (relax.analysis.well_formed raises on a malformed module)
    tvm.ir.assert_structural_equal(rebuild(main, lambda em, var, value: None), main)  # nothing rewritten
    relax.analysis.well_formed(FoldChannelAffine(mod))
    with target:
        relax.analysis.well_formed(pack_conv(mod, target)[0])
        converted, reason = to_nhwc(mod)
    assert reason is None, reason
    relax.analysis.well_formed(converted)
    plan = annotate(main, config)
    observed = rebuild(main, lambda em, var, value: None, extra_outputs=plan.observed)  # calibration's module
    relax.analysis.well_formed(with_main(mod, observed))
    qdq, _, _ = emit_qdq(main, plan, {var: (-1.0, 1.0) for var in plan.observed}, config)
    relax.analysis.well_formed(with_main(mod, qdq))
    realized, _ = realize(canonicalize_qdq(with_main(mod, qdq)))
    relax.analysis.well_formed(realized)
    assert Graph.from_main(realized["main"]).bindings
    BalanceParallel(StackTiles(_tir(mod, target)))


# -- the layout conversion keeps ops without a kernel in their layout ---------------------------


def test_conv2d_transpose_keeps_its_layout():
    from qcompile.passes.pack_conv import to_nhwc

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
                 wt: R.Tensor((8, 4, 2, 2), "float32")) -> R.Tensor((1, 4, 16, 16), "float32"):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=(1, 1))
                r = R.nn.relu(y)
                u = R.nn.conv2d_transpose(r, wt, strides=(2, 2))
                gv = R.nn.relu(u)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
                 wt: R.Tensor((8, 4, 2, 2), "float32")) -> R.Tensor((1, 4, 16, 16), "float32"):
            with R.dataflow():
                lv = R.permute_dims(x, axes=[0, 2, 3, 1])
                lv1 = R.permute_dims(w, axes=[0, 2, 3, 1])
                y = R.nn.conv2d(lv, lv1, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI",
                                out_layout="NHWC")
                r = R.nn.relu(y)
                lv2 = R.permute_dims(r, axes=[0, 3, 1, 2])  # back to NCHW: TVM lowers conv2d_transpose only there
                u = R.nn.conv2d_transpose(lv2, wt, strides=[2, 2])
                gv = R.nn.relu(u)
                R.output(gv)
            return gv

    with tvm.target.Target("llvm"):
        after, reason = to_nhwc(Before)
    assert reason is None
    tvm.ir.assert_structural_equal(after, Expected)


def test_conv1d_keeps_its_layout():
    from qcompile.passes.pack_conv import to_nhwc

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 1, 16), "float32"), w: R.Tensor((8, 4, 1, 3), "float32"),
                 w1: R.Tensor((8, 8, 3), "float32")) -> R.Tensor((1, 8, 16), "float32"):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=(0, 1))
                s = R.squeeze(y, axis=[2])
                gv = R.nn.conv1d(s, w1, padding=(1, 1))
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 1, 16), "float32"), w: R.Tensor((8, 4, 1, 3), "float32"),
                 w1: R.Tensor((8, 8, 3), "float32")) -> R.Tensor((1, 8, 16), "float32"):
            with R.dataflow():
                lv = R.permute_dims(x, axes=[0, 2, 3, 1])
                lv1 = R.permute_dims(w, axes=[0, 2, 3, 1])
                y = R.nn.conv2d(lv, lv1, padding=[0, 1, 0, 1], data_layout="NHWC", kernel_layout="OHWI",
                                out_layout="NHWC")
                s = R.squeeze(y, axis=[1])
                lv2 = R.permute_dims(s, axes=[0, 2, 1])  # NWC -> NCW: conv1d stays as the model has it
                gv = R.nn.conv1d(lv2, w1, padding=[1, 1])
                R.output(gv)
            return gv

    with tvm.target.Target("llvm"):
        after, reason = to_nhwc(Before)
    assert reason is None
    tvm.ir.assert_structural_equal(after, Expected)


def test_negative_squeeze_axes_count_from_the_front_before_the_conversion():
    # TVM 0.27's layout rule for squeeze fails on a negative axis (see pack_conv)
    from qcompile.passes.pack_conv import _before_conversion

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 16, 1, 8), "float32")) -> R.Tensor((1, 16, 8), "float32"):
            with R.dataflow():
                r = R.nn.relu(x)
                gv = R.squeeze(r, axis=[-2])
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 16, 1, 8), "float32")) -> R.Tensor((1, 16, 8), "float32"):
            with R.dataflow():
                r = R.nn.relu(x)
                gv = R.squeeze(r, axis=[2])
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(_before_conversion(Before), Expected)


def test_failed_layout_conversion_leaves_the_layout_and_says_so(monkeypatch):
    from qcompile.passes import pack_conv as pc

    def failing(_desired):
        def run(_mod):
            raise tvm.error.InternalError("Invalid SLayout: can't find S in source layout ABC")
        return run

    monkeypatch.setattr(pc.relax.transform, "ConvertLayout", failing)
    notes: list[str] = []
    target = resolve_target(TARGET).to_tvm()
    with target:
        after, counts = pc.pack_conv(TwoBlocks, target, notes)
    assert not any(counts.values()), counts
    assert [c.attrs.data_layout for c in pc._layout_calls(after)["relax.nn.conv2d"]] == ["NCHW", "NCHW"]
    assert len(notes) == 1 and "TVM's layout conversion failed (Invalid SLayout" in notes[0], notes
    # and the build goes on with TVM's convs
    notes.clear()
    executable = compile_module(TwoBlocks, target, kernel_notes=notes)
    assert len(notes) == 1 and notes[0].startswith("convs stay in the model's layout"), notes
    x = np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float32)
    for got, ref in zip(_run_vm(executable, x), _two_blocks_reference(torch.from_numpy(x))):
        np.testing.assert_allclose(got, ref.numpy(), rtol=RTOL, atol=ATOL)
