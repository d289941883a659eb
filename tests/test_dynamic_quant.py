"""Dynamic int8 quantization (``--quantize int8-dynamic`` / ``DynamicInt8Config``): int8
weights, activations quantized at run time, no calibration data; and ONNX Runtime's
``quantize_dynamic`` graphs (DynamicQuantizeLinear + MatMulInteger / ConvInteger) built to
the same integer kernels and compared with ONNX Runtime on the same file.

Models are tiny and built in-process: an MLP, a small CNN and a BERT-shaped encoder from
``transformers`` (2 layers, hidden 64), exported with the TorchScript exporter.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

import qcompile
from qcompile.errors import ConfigError
from qcompile.passes.bindings import Graph, dtype_of, op_name

TARGET = "native"
SEQ = 16


class _Encoder(nn.Module):
    """A BertModel's last hidden state from (input_ids, attention_mask)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                            vocab_size=100)
        self.bert = BertModel(config).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _export(module: nn.Module, examples: tuple, names: list[str], path) -> None:
    torch.onnx.export(module.eval(), examples, str(path), input_names=names, output_names=["out"],
                      opset_version=17, dynamo=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """name -> (float .onnx, ONNX Runtime quantize_dynamic .onnx, feeds)."""
    root = tmp_path_factory.mktemp("dynamic")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    mask = np.ones((1, SEQ), np.int64)
    mask[0, -3:] = 0  # padding tokens: the attention mask is used
    cases = {
        "mlp": (nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)),
                {"x": rng.standard_normal((4, 32)).astype(np.float32)}),
        "cnn": (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(16 * 7 * 7, 10)),
                {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}),
        "encoder": (_Encoder(), {"input_ids": rng.integers(0, 100, (1, SEQ)).astype(np.int64),
                                 "attention_mask": mask}),
    }
    out = {}
    for name, (module, feeds) in cases.items():
        path, dyn = root / f"{name}.onnx", root / f"{name}-ort-dynamic.onnx"
        _export(module, tuple(torch.from_numpy(v) for v in feeds.values()), list(feeds), path)
        quantize_dynamic(str(path), str(dyn), weight_type=QuantType.QInt8, per_channel=True)
        out[name] = (path, dyn, feeds)
    return out


def _ort(path, feeds, optimized: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimized:  # the graph as written: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _run(artifact, feeds) -> np.ndarray:
    return next(iter(qcompile.load(artifact.library).run(feeds).values()))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _integer_anchors(mod) -> list[tuple[str, str, str]]:
    """(op, input dtype, weight dtype) of every int32-accumulating conv2d/matmul."""
    return [(op_name(v), dtype_of(v.args[0]), dtype_of(v.args[1])) for _, v in Graph.from_main(mod["main"]).bindings
            if op_name(v) in ("relax.matmul", "relax.nn.conv2d") and str(v.attrs.out_dtype) == "int32"]


# -- the config -----------------------------------------------------------------------------------

def test_config_validates_and_round_trips():
    config = qcompile.DynamicInt8Config(activations="per_row", weights="per_tensor", keep_float="first")
    assert config.activations == qcompile.PerRow() and config.weights == qcompile.PerTensor()
    assert config.keep_float == ("first",) and config.scheme == "int8-dynamic"
    assert qcompile.DynamicInt8Config.from_json(config.to_json()) == config
    for kwargs, parameter in [({"activations": qcompile.PerChannel()}, "activations"),
                              ({"weights": "per_row"}, "weights"), ({"activation_symmetric": 1}, "activation_symmetric"),
                              ({"reduce_range": "no"}, "reduce_range"), ({"keep_float": ("",)}, "keep_float")]:
        with pytest.raises(ConfigError, match=f"DynamicInt8Config.{parameter}: expected") as info:
            qcompile.DynamicInt8Config(**kwargs)
        assert info.value.parameter == parameter


# -- one dynamic matmul, bit for bit --------------------------------------------------------------

def _reference_matmul(x: np.ndarray, w: np.ndarray, per_row: bool, symmetric: bool) -> np.ndarray:
    """The arithmetic DynamicInt8Config specifies, in numpy: int8 weights per output channel,
    x quantized from its own range (round half to even), int32 accumulation, float rescale."""
    ws = (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)
    wq = np.clip(np.round(w / ws), -127, 127).astype(np.int32)
    axis = -1 if per_row else None
    if symmetric:
        s = (np.abs(x).max(axis=axis, keepdims=per_row) / np.float32(127)).astype(np.float32)
        s = np.where(s == 0, np.float32(1), s)
        acc = np.clip(np.round(x / s), -127, 127).astype(np.int32) @ wq
    else:
        hi = np.maximum(x.max(axis=axis, keepdims=per_row), np.float32(0))
        lo = np.minimum(x.min(axis=axis, keepdims=per_row), np.float32(0))
        s = ((hi - lo) / np.float32(255)).astype(np.float32)
        s = np.where(s == 0, np.float32(1), s)
        zp = np.round(np.clip(-(lo / s), 0, 255))
        xq = np.clip(np.round(x / s) + zp, 0, 255).astype(np.int32)
        acc = (xq - zp.astype(np.int32)) @ wq
    assert np.abs(acc).max() < 2 ** 24  # exact in float32 too: the comparison below is of the integers
    return acc.astype(np.float32) * (s * ws).astype(np.float32)


@pytest.mark.parametrize(("per_row", "symmetric"), [(False, False), (True, False), (False, True)],
                         ids=["per-tensor", "per-row", "symmetric"])
def test_dynamic_matmul_matches_numpy_exactly(tmp_path, per_row, symmetric):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 12)).astype(np.float32)
    x = (rng.standard_normal((2, 5, 24)) * np.linspace(0.1, 3, 24)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 12])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    config = qcompile.DynamicInt8Config(activations=qcompile.PerRow() if per_row else qcompile.PerTensor(),
                                        activation_symmetric=symmetric)
    prepared = qcompile.prepare(path, TARGET, quantization=config)
    assert _integer_anchors(prepared.mod) == [("relax.matmul", "int8" if symmetric else "uint8", "int8")]
    ours = _run(qcompile.build(prepared, TARGET, tmp_path, tuning_logs=False), {"x": x})
    np.testing.assert_array_equal(ours, _reference_matmul(x, w, per_row, symmetric))


# -- the float models: CLI and API ----------------------------------------------------------------

def test_cli_builds_int8_dynamic(cli, models, tmp_path):
    path, _, feeds = models["mlp"]
    result = cli("build", path, "--quantize", "int8-dynamic", "-o", tmp_path, "--quiet")
    assert result.code == 0, result.err
    library = tmp_path / "mlp-int8-dynamic.so"
    quant = json.loads((tmp_path / "mlp-int8-dynamic.manifest.json").read_text())["quantization"]
    assert quant["scheme"] == "int8-dynamic" and quant["source"] == "qcompile-dynamic"
    assert quant["activation_dtype"] == "uint8" and quant["config"]["activations"] == "per_tensor"
    assert [(layer["name"], layer["dtype"]) for layer in quant["layers"]] == [
        ("matmul_0", "uint8 x int8 -> int32 -> float32"), ("matmul_1", "uint8 x int8 -> int32 -> float32")]
    info = cli("info", library)
    assert "quantization: int8-dynamic (uint8 activations x int8 weights, 2 integer layers" in info.out
    ours = next(iter(qcompile.load(library).run(feeds).values()))
    assert _cosine(ours, _ort(path, feeds)) >= 0.999


@pytest.mark.parametrize("activations", [qcompile.PerTensor(), qcompile.PerRow()], ids=["per-tensor", "per-row"])
def test_encoder_int8_dynamic_close_to_float(models, tmp_path, activations):
    path, _, feeds = models["encoder"]
    artifact = qcompile.compile(path, TARGET, quantization=qcompile.DynamicInt8Config(activations=activations),
                                out_dir=tmp_path, tuning_logs=False)
    quant = artifact.manifest.quantization
    assert quant["scheme"] == "int8-dynamic" and artifact.library.name == "encoder-int8-dynamic.so"
    # the 12 dense layers with constant weights (Q/K/V, attention output, FFN x2, per layer);
    # attention's activation x activation matmuls stay float
    assert len(quant["layers"]) == 12 and quant["float_ops"] == {"relax.matmul": 4}
    cosine = _cosine(_run(artifact, feeds), _ort(path, feeds))
    print(f"encoder int8-dynamic ({activations.to_json()}) vs float32: cosine {cosine:.9f}")
    assert cosine >= 0.99


def test_cnn_convs_quantize_dynamically(models, tmp_path):
    path, _, feeds = models["cnn"]
    prepared = qcompile.prepare(path, TARGET, quantization=qcompile.DynamicInt8Config())
    assert sorted(_integer_anchors(prepared.mod)) == [("relax.matmul", "uint8", "int8")] + \
        [("relax.nn.conv2d", "uint8", "int8")] * 2
    cosine = _cosine(_run(qcompile.build(prepared, TARGET, tmp_path, tuning_logs=False), feeds), _ort(path, feeds))
    assert cosine >= 0.999


def test_float_mlp_matches_onnxruntime_quantize_dynamic(models, tmp_path):
    """The default config is ONNX Runtime's quantize_dynamic (per-channel int8 weights, uint8
    activations per tensor): building the float model with it gives ONNX Runtime's result
    on the file quantize_dynamic writes from the same model."""
    path, ort_path, feeds = models["mlp"]
    artifact = qcompile.compile(path, TARGET, quantization=qcompile.DynamicInt8Config(), out_dir=tmp_path,
                                tuning_logs=False)
    np.testing.assert_allclose(_run(artifact, feeds), _ort(ort_path, feeds), rtol=0, atol=1e-6)


def test_keep_float_names_layers(models):
    path, _, _ = models["mlp"]
    prepared = qcompile.prepare(path, TARGET, quantization=qcompile.DynamicInt8Config(keep_float=("last",)))
    assert [layer["name"] for layer in prepared.quantization.layers] == ["matmul_0"]
    assert prepared.quantization.float_layers == ("matmul_1",)
    with pytest.raises(ConfigError, match="no layer named conv2d_7"):
        qcompile.prepare(path, TARGET, quantization=qcompile.DynamicInt8Config(keep_float=("conv2d_7",)))


# -- ONNX Runtime's quantize_dynamic graphs -------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder"])
def test_ort_quantize_dynamic_agrees_with_onnxruntime(models, tmp_path, name):
    _, path, feeds = models[name]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    artifact = qcompile.compile(path, TARGET, out_dir=tmp_path, tuning_logs=False)
    quant = artifact.manifest.quantization
    assert quant["scheme"] == "int8-dynamic" and quant["source"] == "onnx-qdq"
    assert not quant.get("float_nodes")  # every MatMulInteger/ConvInteger runs on an integer kernel
    expected_ops = {"mlp": {"matmul"}, "cnn": {"matmul", "conv2d"}, "encoder": {"matmul"}}[name]
    assert {layer["op"] for layer in quant["layers"]} == expected_ops
    ours = _run(artifact, feeds)
    diffs = {optimized: float(np.abs(ours - _ort(path, feeds, optimized)).max()) for optimized in (True, False)}
    scale = float(np.abs(_ort(path, feeds)).max())
    print(f"{name} quantize_dynamic: max |qcompile - ONNX Runtime| = {diffs[True]:.3g} (optimized), "
          f"{diffs[False]:.3g} (graph as written); outputs up to {scale:.3g}")
    assert max(diffs.values()) <= 1e-5 * max(scale, 1.0)
    if name != "encoder":  # an all-zero input: scale 1, not a division by zero
        zeros = {k: np.zeros_like(v) for k, v in feeds.items()}
        np.testing.assert_allclose(_run(artifact, zeros), _ort(path, zeros), rtol=0, atol=1e-6)


# -- errors ----------------------------------------------------------------------------------------

def test_calibration_data_is_an_error(cli, models, tmp_path):
    path, _, feeds = models["mlp"]
    with pytest.raises(ConfigError, match="takes no calibration_data"):
        qcompile.compile(path, quantization=qcompile.DynamicInt8Config(), calibration_data=feeds["x"],
                         out_dir=tmp_path)
    with pytest.raises(ConfigError, match="takes no calibration_data"):
        qcompile.quantize(qcompile.import_model(path), feeds["x"], qcompile.DynamicInt8Config())
    np.savez(tmp_path / "calib.npz", x=feeds["x"])
    result = cli("build", path, "--quantize", "int8-dynamic", "--calib-data", tmp_path / "calib.npz", "-o", tmp_path)
    assert result.code == 2 and "int8-dynamic quantizes activations at run time" in result.err
    result = cli("build", path, "--per-row", "-o", tmp_path)
    assert result.code == 2 and "--per-row applies with --quantize int8-dynamic" in result.err
    assert not list(tmp_path.glob("*.so"))


def test_prequantized_model_rejects_dynamic_quantization(models, tmp_path):
    _, path, _ = models["mlp"]
    with pytest.raises(ConfigError, match="pre-quantized"):
        qcompile.compile(path, quantization=qcompile.DynamicInt8Config(), out_dir=tmp_path)


@pytest.mark.parametrize("shape, pad, stride, dil, k", [
    ((1, 3, 96, 96), [1, 1, 1, 1], [2, 2], [1, 1], 3),
    ((1, 8, 13, 11), [2, 1, 0, 3], [1, 2], [2, 1], 5),
])
def test_conv_correction_is_stored_by_its_distinct_values(shape, pad, stride, dil, k):
    """The zero point's share of a padded conv (a conv of ones with zero padding) is kept as
    [1, O, R, C] distinct values and two index maps, and spreads out to the exact tensor."""
    import torch

    from qcompile.quantize.dynamic import Correction, conv_correction

    wq = np.random.default_rng(0).integers(-127, 128, (6, shape[1], k, k)).astype(np.int8)
    correction = conv_correction(wq, shape, pad, stride, dil)
    ones = torch.nn.functional.pad(torch.ones(shape, dtype=torch.float64), (pad[1], pad[3], pad[0], pad[2]))
    expected = torch.nn.functional.conv2d(ones, torch.from_numpy(wq.astype(np.float64)), stride=stride,
                                          dilation=dil).numpy()
    assert isinstance(correction, Correction)
    assert np.array_equal(correction.dense(), expected)
    if expected.size > 10_000:  # the wide early layer: far smaller than the tensor it stands for
        assert correction.table.size * 16 < expected.size
