"""The one-call Python API: qcompile.compile / quantize / load and the typed configs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qcompile
from qcompile.errors import ConfigError


def test_import_qcompile_loads_neither_tvm_nor_torch():
    """The API's names, the CLI's parser and the configs load without TVM or torch (an installed
    runtime without torch is tested in test_wheel)."""
    code = ("import sys, qcompile, qcompile.cli.main; qcompile.Int8Config(calibration='mse'); "
            "print('tvm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_public_names_resolve():
    for name in qcompile.__all__:
        assert getattr(qcompile, name) is not None, name
    assert callable(qcompile.compile) and callable(qcompile.quantize) and callable(qcompile.tune)
    assert qcompile.resolve_target("x86-avx2").name == "x86-avx2"
    assert issubclass(qcompile.CalibrationError, qcompile.QcompileError)


@pytest.mark.parametrize("kwargs, parameter", [
    ({"calibration": "bogus"}, "calibration"),
    ({"percentile": 20.0}, "percentile"),
    ({"num_samples": 0}, "num_samples"),
    ({"weights": "per_row"}, "weights"),
    ({"keep_float": ("",)}, "keep_float"),
    ({"reduce_range": "yes"}, "reduce_range"),
])
def test_int8_config_names_the_bad_parameter(kwargs, parameter):
    with pytest.raises(ConfigError, match=rf"^Int8Config\.{parameter}: expected .*, but got ") as info:
        qcompile.Int8Config(**kwargs)
    assert info.value.parameter == parameter


def test_int8_config_types_and_round_trip():
    config = qcompile.Int8Config(calibration="entropy", weights=qcompile.PerTensor(), keep_float=["first"])
    assert config.calibration is qcompile.Calibration.ENTROPY and not config.per_channel
    assert config.keep_float == ("first",)
    assert qcompile.Int8Config.from_json(config.to_json()) == config
    with pytest.raises(Exception):
        config.num_samples = 3  # frozen


def test_cli_names_the_flag_for_a_bad_config_value(cli, tiny_pt2, tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((2, 3, 32, 32), np.float32))
    result = cli("build", tiny_pt2, "--quantize", "int8", "--calib-data", tmp_path / "calib.npy",
                 "--percentile", "10", "-o", tmp_path / "out")
    assert result.code == ConfigError.exit_code
    assert "error: --percentile: expected a value in (50, 100], but got 10.0" in result.err
    assert not (tmp_path / "out").exists()


def test_compile_and_load_onnx_fp32_and_int8(tiny_onnx, tiny_net, tmp_path):
    """compile() from a path, with calibration data as an array; the int8 model carries its
    quantization into the manifest, and both artifacts track ONNX Runtime's output."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    fp32 = qcompile.compile(tiny_onnx, "x86-avx2", out_dir=tmp_path)
    assert fp32.manifest.quantization == {"scheme": "none"}
    got = qcompile.load(fp32.library).run({"input": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    calib = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    int8 = qcompile.compile(tiny_onnx, "x86-avx2", quantization=qcompile.Int8Config(num_samples=8),
                            calibration_data=calib, out_dir=tmp_path)
    assert int8.library.name == "tiny-int8.so"
    quant = int8.manifest.quantization
    assert quant["scheme"] == "int8" and quant["source"] == "qcompile-ptq" and quant["config"]["num_samples"] == 8
    assert len(quant["layers"]) >= 4
    got8 = qcompile.load(int8.library).run({"input": x})["logits"]
    assert np.abs(got8 - want).max() < 0.1 * np.abs(want).max()


def test_quantize_then_build_carries_the_quantization(tiny_pt2, tmp_path):
    model = qcompile.import_model(tiny_pt2)
    assert model.quantization is None
    batches = [{"x": np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)} for i in range(4)]
    quantized = qcompile.quantize(model, batches, qcompile.Int8Config(num_samples=4), target="x86-avx2")
    assert quantized.quantization.source == "qcompile-ptq" and quantized.quantization.config.num_samples == 4
    assert model.quantization is None  # the float model is left as it was
    artifact = qcompile.build(quantized, "x86-avx2", tmp_path, tuning_logs=False)
    assert artifact.manifest.quantization == quantized.quantization.to_json()
    with pytest.raises(ConfigError, match="already quantized"):
        qcompile.quantize(quantized, batches, qcompile.Int8Config(num_samples=4), target="x86-avx2")


def test_compile_rejects_inconsistent_quantization_arguments(tiny_pt2, tmp_path):
    with pytest.raises(ConfigError, match="needs calibration_data"):
        qcompile.compile(tiny_pt2, quantization=qcompile.Int8Config(), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="applies with quantization"):
        qcompile.compile(tiny_pt2, calibration_data=np.zeros((1, 3, 32, 32), np.float32), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="expected an Int8Config"):
        qcompile.quantize(qcompile.import_model(tiny_pt2), [], {"calibration": "minmax"})
    assert not any(tmp_path.iterdir())


def test_compile_matches_pytorch_for_pt2(tiny_pt2, tiny_net, tiny_input, tmp_path):
    artifact = qcompile.compile(str(tiny_pt2), qcompile.resolve_target("x86-avx2"), out_dir=tmp_path, name="t")
    got = qcompile.load(artifact.library).run(tiny_input)["output0"]
    want = tiny_net(torch.from_numpy(tiny_input)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
