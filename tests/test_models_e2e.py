"""Full-size torchvision models through the CLI, against PyTorch and ONNX Runtime (slow)."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import skip_unless

from qcompile.frontend.from_torch import torchvision_module
from qcompile.target.hostcpu import cpu_flags

pytestmark = pytest.mark.slow

IMAGE = np.random.default_rng(42).standard_normal((1, 3, 224, 224)).astype("float32")


def _build_and_run(cli, model: str, out, target: str = "native", *extra: str) -> dict:
    result = cli("build", model, "--target", target, "-o", out, "--quiet", *extra)
    assert result.code == 0, result.err
    lib = result.out.split()[0]
    np.savez(out / "in.npz", IMAGE)  # one input: any key works
    result = cli("run", lib, "--inputs", out / "in.npz", "--outputs", out / "y.npz")
    assert result.code == 0, result.err
    with np.load(out / "y.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_matches_pytorch(cli, tmp_path, name):
    outputs = _build_and_run(cli, name, tmp_path)
    expected = torchvision_module(name)(torch.from_numpy(IMAGE)).detach().numpy()
    assert np.max(np.abs(outputs["output0"] - expected)) <= 1e-4
    bench = cli("bench", tmp_path / f"{name}.so", "--repeat", "3", "--warmup", "1", "--json")
    assert bench.code == 0 and json.loads(bench.out)["median_ms"] > 0


def test_resnet18_onnx_matches_onnxruntime(cli, tmp_path):
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(torchvision_module("resnet18"), (torch.from_numpy(IMAGE),), str(path),
                      input_names=["input"], output_names=["logits"], dynamo=False)
    outputs = _build_and_run(cli, str(path), tmp_path / "o")
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": IMAGE})[0]
    assert np.max(np.abs(outputs["logits"] - expected)) <= 1e-4


@pytest.mark.skipif(not {"avx512f", "avx512_vnni"} <= cpu_flags(), reason="this CPU lacks AVX-512 VNNI")
def test_resnet18_x86_avx512_preset_matches_pytorch(cli, tmp_path):
    outputs = _build_and_run(cli, "resnet18", tmp_path, "x86-avx512")
    expected = torchvision_module("resnet18")(torch.from_numpy(IMAGE)).detach().numpy()
    assert np.max(np.abs(outputs["output0"] - expected)) <= 1e-4


def test_resnet18_cross_compiled_for_cortex_a72(cli, tmp_path):
    skip_unless(shutil.which("aarch64-linux-gnu-g++") is not None, "cross", "no aarch64 cross-compiler")
    result = cli("build", "resnet18", "--target", "llvm", "-mcpu=cortex-a72", "-o", tmp_path, "--quiet")
    assert result.code == 0, result.err
    described = subprocess.run(["file", str(tmp_path / "resnet18.so")], capture_output=True, text=True).stdout
    assert "ARM aarch64" in described
    info = json.loads(cli("info", tmp_path / "resnet18.so", "--json").out)
    assert info["target"]["target"]["mtriple"] == "aarch64-linux-gnu"
    assert info["target"]["target"]["mcpu"] == "cortex-a72"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_int8_build_is_integer_and_small(cli, tmp_path, name):
    from test_quantize import float_anchor_ops

    from qcompile.build import build
    from qcompile.frontend import import_model
    from qcompile.quantize import Int8Config, quantize_model
    from qcompile.runtime import CompiledModel
    from qcompile.target import resolve_target

    target = resolve_target("native")
    model = import_model(name)
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((1, 3, 224, 224)).astype("float32")} for _ in range(4)]
    qmodel = quantize_model(model, calib, Int8Config(num_samples=4), target.to_tvm())
    info = qmodel.quantization
    assert float_anchor_ops(qmodel.mod) == []  # the IR after realize: every conv2d/dense is integer
    assert info.float_layers == () and info.float_ops == {}
    int8 = build(qmodel, target, tmp_path, name=f"{name}-int8")
    fp32 = build(model, target, tmp_path)
    ratio = int8.library.stat().st_size / fp32.library.stat().st_size
    assert ratio <= 0.3, f"int8 .so is {ratio:.2f}x the float build"
    # Random-weight models: agreement with float is only a sanity check here (accuracy on real
    # data is tests/test_accuracy_digits.py).
    out = CompiledModel.load(int8.library).run({"x": IMAGE})["output0"]
    ref = CompiledModel.load(fp32.library).run({"x": IMAGE})["output0"]
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.9
