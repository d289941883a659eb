"""qcompile's PTQ end to end on small models: integer IR, accuracy, options, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from qcompile.errors import CalibrationError, ConfigError
from qcompile.frontend import import_model
from qcompile.quantize import Calibration, Int8Config, PerTensor, quantize_model
from qcompile.quantize.observers import HistogramObserver, MinMaxObserver
from qcompile.quantize.ptq import activation_qparams, weight_qparams
from qcompile.target import resolve_target

TARGET = resolve_target("native")


def calib(n: int = 24, shape=(1, 3, 32, 32), seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype("float32")} for _ in range(n)]


def float_anchor_ops(mod) -> list[str]:
    """conv2d/matmul calls whose inputs are still float after realize."""
    from qcompile.passes.bindings import Graph, dtype_of, op_name

    graph = Graph.from_main(mod["main"])
    return [f"{op_name(v)}({v.args[0].ty.dtype})" for _, v in graph.bindings
            if op_name(v) in ("relax.nn.conv2d", "relax.matmul") and dtype_of(v.args[0]) == "float32"]


@pytest.fixture(scope="module")
def quantized(tiny_pt2):
    model = import_model(str(tiny_pt2))
    qmodel = quantize_model(model, calib(), Int8Config(), TARGET.to_tvm())
    return model, qmodel, qmodel.quantization


def test_no_float_conv_or_dense_left(quantized):
    _, qmodel, info = quantized
    assert float_anchor_ops(qmodel.mod) == []
    ops = [layer["op"] for layer in info.layers]
    assert ops.count("conv2d") == 3 and ops.count("matmul") == 1 and "add" in ops and "mean" in ops
    assert info.activation_dtype == "uint8" and info.float_layers == ()


def test_int8_build_tracks_float(quantized, tmp_path, tiny_net):
    from qcompile.build import build
    from qcompile.runtime import CompiledModel

    _, qmodel, info = quantized
    art = build(qmodel, TARGET, tmp_path, name="tiny-int8")
    runner = CompiledModel.load(art.library)
    xs = [d["x"] for d in calib(32, seed=11)]
    got = np.concatenate([runner.run({"x": x})["output0"] for x in xs])
    ref = np.concatenate([tiny_net(torch.from_numpy(x)).detach().numpy() for x in xs])
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9
    assert art.manifest.quantization["scheme"] == "int8"
    assert art.manifest.quantization["layers"][0]["input_zero_point"] >= 0


def test_keep_float_leaves_named_layer(tiny_pt2):
    model = import_model(str(tiny_pt2))
    qmodel = quantize_model(model, calib(8), Int8Config(keep_float=("conv2d_0",)), TARGET.to_tvm())
    info = qmodel.quantization
    assert info.float_layers == ("conv2d_0",)
    assert float_anchor_ops(qmodel.mod) == ["relax.nn.conv2d(float32)"]
    # the integer layers keep PTQ's names: conv2d_0 is not among them
    names = [layer["name"] for layer in info.layers]
    assert "conv2d_0" not in names and names[0] == "conv2d_1"
    with pytest.raises(ConfigError, match="no layer named conv2d_99"):
        quantize_model(model, calib(2), Int8Config(keep_float=("conv2d_99",)), TARGET.to_tvm())


def test_symmetric_per_tensor_percentile(tiny_pt2):
    config = Int8Config(activation_symmetric=True, weights=PerTensor(), calibration=Calibration.PERCENTILE)
    qmodel = quantize_model(import_model(str(tiny_pt2)), calib(8), config, TARGET.to_tvm())
    info = qmodel.quantization
    assert info.activation_dtype == "int8" and float_anchor_ops(qmodel.mod) == []
    convs = [layer for layer in info.layers if layer["op"] == "conv2d"]
    assert all(layer["input_zero_point"] == 0 for layer in convs)
    assert all(layer["weight_scale_min"] == layer["weight_scale_max"] for layer in convs)


class SiluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(torch.sigmoid(y).mean(dim=(2, 3)))


def test_op_without_int8_lowering_stays_float_and_is_reported(tmp_path):
    path = tmp_path / "silu.pt2"
    torch.export.save(torch.export.export(SiluNet().eval(), (torch.zeros(1, 3, 8, 8),)), str(path))
    model = import_model(str(path))
    qmodel = quantize_model(model, calib(4, (1, 3, 8, 8)), Int8Config(), TARGET.to_tvm())
    info = qmodel.quantization
    assert info.float_ops.get("relax.sigmoid") == 1
    assert float_anchor_ops(qmodel.mod) == []


def test_calibration_errors(tiny_pt2):
    model = import_model(str(tiny_pt2))
    with pytest.raises(CalibrationError, match="empty"):
        quantize_model(model, [], Int8Config(), TARGET.to_tvm())
    bad = calib(2)
    bad[1]["x"][0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="sample 1 contains NaN or Inf"):
        quantize_model(model, bad, Int8Config(), TARGET.to_tvm())


def test_cli_quantized_build_and_errors(cli, tiny_pt2, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, images=np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype("float32"))
    out = tmp_path / "out"
    result = cli("build", tiny_pt2, "--quantize", "int8", "--calib-data", data, "--calib-samples", "8", "-o", out)
    assert result.code == 0, result.err
    assert (out / "tiny-int8.so").is_file()
    manifest = json.loads((out / "tiny-int8.manifest.json").read_text())
    assert manifest["quantization"]["config"]["num_samples"] == 8
    layers = cli("info", out / "tiny-int8.so", "--layers")
    assert layers.code == 0 and "conv2d_0" in layers.out and "uint8 x int8 -> int32 -> uint8" in layers.out

    bad_shape = tmp_path / "bad.npz"
    np.savez(bad_shape, x=np.zeros((4, 3, 16, 16), "float32"))
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 3, 32, 32), "float32"))
    fresh = tmp_path / "fresh"
    for args, fragment in [
        (("--calib-data", bad_shape), "input 'x' has shape [4, 3, 16, 16]; expected [N, 3, 32, 32]"),
        (("--calib-data", empty), "is empty"),
        (("--calib-data", tmp_path / "nope"), "does not exist"),
        ((), "--quantize int8 needs --calib-data"),
        (("--calib-data", data, "--calib-method", "minmax", "--percentile", "20"), "--percentile"),
    ]:
        result = cli("build", tiny_pt2, "--quantize", "int8", *args, "-o", fresh)
        assert result.code != 0 and fragment in result.err, result.err
        assert "Traceback" not in result.err and not fresh.exists()


def test_observers_and_qparams():
    mm = MinMaxObserver()
    for chunk in (np.array([-1.0, 2.0]), np.array([3.0, -0.5])):
        mm.update(chunk)
    assert mm.range() == (-1.0, 3.0)
    obs = HistogramObserver("percentile", 99.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        obs.update(rng.standard_normal(10000))
    obs.update(np.array([1000.0]))  # one outlier grows the histogram range 2x per step
    lo, hi = obs.range()
    assert -3.5 < lo < -2.0 and 2.0 < hi < 3.5 and obs.hist.size == 2 * obs.BINS
    for method in ("entropy", "mse"):  # clip a 12-sigma outlier, keep the bulk of N(0, 1)
        other = HistogramObserver(method)
        for _ in range(5):
            other.update(rng.standard_normal(10000))
        other.update(np.array([12.0]))
        lo, hi = other.range()
        assert 2.0 < hi < 11.0 and -11.0 < lo < -2.0, (method, lo, hi)
    params = activation_qparams(-1.0, 3.0, Int8Config())
    assert params.dtype == "uint8" and params.zero_point == 64 and np.isclose(params.scale, 4 / 255)
    sym = activation_qparams(-1.0, 3.0, Int8Config(activation_symmetric=True))
    assert sym.dtype == "int8" and sym.zero_point == 0 and np.isclose(sym.scale, 3 / 127)
    w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    q, s = weight_qparams(w, 0, per_channel=True)
    np.testing.assert_allclose(s, [2 / 127, 0.5 / 127], rtol=1e-6)
    assert q.dtype == np.int8 and q[0, 1] == -127 and q[1, 0] == 127


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_histogram_calibration_methods(tiny_pt2, method):
    qmodel = quantize_model(import_model(str(tiny_pt2)), calib(8), Int8Config(calibration=method), TARGET.to_tvm())
    info = qmodel.quantization
    assert info.config.calibration == method and float_anchor_ops(qmodel.mod) == []


def test_first_last_policy(tiny_pt2):
    info = quantize_model(import_model(str(tiny_pt2)), calib(4), Int8Config(keep_float=("first", "last")),
                          TARGET.to_tvm()).quantization
    assert sorted(info.float_layers) == ["conv2d_0", "matmul_0"]


def test_image_folder_calibration(tmp_path):
    from PIL import Image

    from qcompile.model import TensorInfo
    from qcompile.quantize.data import ImagePreprocess, calibration_batches

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):  # ImageFolder layout
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    info = [TensorInfo("x", (2, 3, 32, 32), "float32")]
    batches = list(calibration_batches(tmp_path, info, ImagePreprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))))
    assert len(batches) == 3 and batches[0]["x"].shape == (2, 3, 32, 32)
    assert -1.0 <= batches[0]["x"].min() and batches[0]["x"].max() <= 1.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="holds no images"):
        calibration_batches(tmp_path / "empty", info)


@pytest.mark.parametrize("preset, reduce_range", [("x86-avx2", True), ("x86-avx512", False), ("rpi4", False)])
def test_quantize_for_another_target_calibrates_here_and_picks_weight_bits(tiny_pt2, preset, reduce_range):
    # rpi4 code cannot run here and x86-avx512 code would fault on this AVX2 CPU: calibration
    # must run a build for this machine; the target only decides the weight range.
    from qcompile.target import resolve_target

    info = quantize_model(import_model(str(tiny_pt2)), calib(4), Int8Config(), resolve_target(preset).to_tvm()).quantization
    assert info.config.reduce_range is reduce_range
    assert info.weight_range == ((-63, 63) if reduce_range else (-127, 127))


def test_kernels_do_not_depend_on_the_calibration(tiny_pt2):
    """Tuning records are keyed by the kernels' TIR: recalibrating (other scales, other zero
    points) must give the same kernels -- including the input's quantize and the output's
    dequantize -- or every build from user data misses the committed records."""
    import tvm_ffi
    from tvm import tirx

    from qcompile.build.pipeline import phases_through, run_phases

    model = import_model(str(tiny_pt2))
    kernels = []
    for seed, spread in ((3, 1.0), (5, 3.0)):
        data = [{"x": d["x"] * spread + 0.5 * seed} for d in calib(4, seed=seed)]
        qmodel = quantize_model(model, data, Int8Config(num_samples=4), TARGET.to_tvm())
        mod = run_phases(qmodel.mod, TARGET.to_tvm(), phases=phases_through("legalize"))
        kernels.append({tvm_ffi.structural_hash(f): gv.name_hint for gv, f in mod.functions.items()
                        if isinstance(f, tirx.PrimFunc)})
    assert any("quantize" in name for name in kernels[0].values())
    assert set(kernels[0]) == set(kernels[1]), [k[h] for k in kernels for h in set(k) - set(kernels[0]).intersection(kernels[1])]


@pytest.mark.parametrize("last", ["conv_relu", "linear"])
def test_onnx_model_ending_in_a_quantized_layer_builds_int8(cli, tmp_path, last):
    """The last op is a quantized layer: calibration must observe it and realize quantize it."""
    import onnxruntime as ort

    torch.manual_seed(0)
    net = (nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()) if last == "conv_relu"
           else nn.Sequential(nn.Flatten(), nn.Linear(64, 10))).eval()
    path = tmp_path / f"{last}.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["input"], output_names=["y"],
                      dynamo=False)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((8, 1, 8, 8)).astype(np.float32))
    result = cli("build", path, "--target", "x86-avx2", "--quantize", "int8", "--calib-data",
                 tmp_path / "calib.npy", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    from qcompile.runtime import CompiledModel

    # a calibration sample: within the calibrated output range, so only rounding differs
    x = np.load(tmp_path / "calib.npy")[:1]
    got = CompiledModel.load(tmp_path / "out" / f"{last}-int8.so").run({"input": x})["y"]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
