"""Build: numerics against the source framework, manifest, cross-compile, CUDA, atomic failure."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import skip_unless
from torch import nn

from qcompile.build import build
from qcompile.errors import BuildError
from qcompile.frontend import import_model
from qcompile.manifest import load_manifest, manifest_path, sha256_file
from qcompile.runtime import CompiledModel
from qcompile.target import resolve_target

HAS_CROSS = shutil.which("aarch64-linux-gnu-g++") is not None


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_pt2):
    out = tmp_path_factory.mktemp("build")
    return build(import_model(str(tiny_pt2)), resolve_target("native"), out)


def test_pt2_build_matches_pytorch(tiny_artifact, tiny_net, tiny_input):
    outputs = CompiledModel.load(tiny_artifact.library).run({"x": tiny_input})
    expected = tiny_net(torch.from_numpy(tiny_input)).detach().numpy()
    np.testing.assert_allclose(outputs["output0"], expected, atol=1e-4, rtol=0)


def test_onnx_build_matches_onnxruntime(tmp_path, tiny_onnx, tiny_input):
    artifact = build(import_model(str(tiny_onnx)), resolve_target("native"), tmp_path)
    ours = CompiledModel.load(artifact.library).run({"input": tiny_input})["logits"]
    theirs = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": tiny_input})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_dynamic_onnx_with_input_shape_matches_onnxruntime(tmp_path, dynamic_onnx):
    shape = (3, 3, 20, 12)
    artifact = build(import_model(str(dynamic_onnx), {"input": shape}), resolve_target("native"), tmp_path)
    x = np.random.default_rng(2).standard_normal(shape).astype("float32")
    ours = CompiledModel.load(artifact.library).run({"input": x})["logits"]
    theirs = ort.InferenceSession(str(dynamic_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert ours.shape == (3, 5)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_manifest_describes_the_build(tiny_artifact, tiny_pt2, tiny_net):
    lib = tiny_artifact.library
    assert lib.name == "tiny.so" and manifest_path(lib).name == "tiny.manifest.json"
    data = json.loads(manifest_path(lib).read_text())
    assert data["format"] == "qcompile-manifest/1"
    assert data["model"]["kind"] == "pt2" and data["model"]["sha256"] == sha256_file(tiny_pt2)
    assert data["inputs"] == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert data["outputs"] == [{"name": "output0", "shape": [1, 10], "dtype": "float32"}]
    assert data["target"]["name"] == "native" and data["target"]["target"]["kind"] == "llvm"
    assert data["quantization"] == {"scheme": "none"}
    assert data["library"] == {"file": "tiny.so", "sha256": sha256_file(lib), "bytes": lib.stat().st_size}
    assert {"qcompile", "tvm", "python"} <= set(data["versions"])
    assert "avx2" in data["cpu_features"] or data["target"]["target"].get("mcpu") not in ("haswell", "cascadelake")
    assert load_manifest(lib) == tiny_artifact.manifest
    # Every conv of the model runs on qcompile's NHWC float kernels (x86 or ARM CPU): the dense
    # kernel for the ordinary convs, the depthwise one for groups == channels.
    convs = [m for m in tiny_net.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = sum(m.groups == m.in_channels == m.out_channels for m in convs)
    kernels = data["build"]["conv_kernels"]
    assert kernels["float"] == len(convs) - depthwise and kernels["float_depthwise"] == depthwise, kernels
    assert all(count == 0 for kind, count in kernels.items() if kind.startswith("int8")), kernels


def test_weights_are_inside_the_library(tiny_artifact):
    # Only the .so and its manifest are written: no separate params file.
    assert sorted(p.name for p in tiny_artifact.library.parent.iterdir()) == ["tiny.manifest.json", "tiny.so"]


def test_batchnorm_is_folded(tmp_path, tiny_pt2):
    dump = tmp_path / "ir"
    build(import_model(str(tiny_pt2)), resolve_target("native"), tmp_path / "o", dump_ir=dump)
    assert "batch_norm" in (dump / "00-imported.py").read_text()
    assert "batch_norm" not in (dump / "01-inference.py").read_text()
    assert {p.name for p in dump.iterdir()} >= {"02-kernels.py", "03-legalize.py", "04-lower.py"}


def test_cross_compile_aarch64(tmp_path, tiny_pt2):
    skip_unless(HAS_CROSS, "cross", "aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")
    artifact = build(import_model(str(tiny_pt2)), resolve_target("llvm -mcpu=cortex-a72"), tmp_path)
    described = subprocess.run(["file", str(artifact.library)], capture_output=True, text=True).stdout
    assert "ARM aarch64" in described
    assert artifact.manifest.target["target"]["mtriple"] == "aarch64-linux-gnu"
    assert "neon" in artifact.manifest.cpu_features


def test_cuda_build_compiles_kernels_at_build_time(tmp_path, tiny_pt2):
    artifact = build(import_model(str(tiny_pt2)), resolve_target("cuda-sm80"), tmp_path)
    assert artifact.manifest.target["target"] == {"kind": "cuda", "arch": "sm_80"}
    blob = artifact.library.read_bytes()
    # An nvcc fatbin (magic 0xBA55ED50) holding sm_80 code, and no CUDA source left for
    # the loading machine to compile.
    assert b"\x50\xed\x55\xba" in blob and b"fatbin" in blob
    assert b"__global__" not in blob and b"extern \"C\"" not in blob


def test_cuda_artifact_runs_on_gpu(tmp_path, tiny_pt2, tiny_net, tiny_input):
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine: the CUDA build is compile-checked only")
    cuda = build(import_model(str(tiny_pt2)), resolve_target("cuda-sm80"), tmp_path / "cuda")
    got = CompiledModel.load(cuda.library).run(tiny_input)["output0"]
    with torch.no_grad():
        want = tiny_net(torch.from_numpy(tiny_input)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_missing_cross_compiler_leaves_nothing(tmp_path, tiny_pt2):
    preset = tmp_path / "board.json"
    preset.write_text(json.dumps({"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"},
                                  "cross_compiler": "no-such-aarch64-g++"}))
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="cross-compiler no-such-aarch64-g\\+\\+ .* is not installed"):
        build(import_model(str(tiny_pt2)), resolve_target(str(preset)), out)
    assert not out.exists()


def test_failed_export_leaves_no_partial_files(tmp_path, tiny_pt2, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")

    def broken_export(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half")
        raise RuntimeError("disk full")

    import tvm

    monkeypatch.setattr(tvm.runtime.Executable, "export_library", broken_export)
    with pytest.raises(BuildError, match="disk full"):
        build(import_model(str(tiny_pt2)), resolve_target("native"), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]



def test_untuned_conv_and_matmul_get_a_default_schedule(tmp_path, tiny_pt2, tiny_net, tiny_input):
    dump = tmp_path / "ir"
    artifact = build(import_model(str(tiny_pt2)), resolve_target("native"), tmp_path / "out", dump_ir=dump,
                     tuning_logs=False)
    legalized = (dump / "03-legalize.py").read_text()
    kernels = legalized.split("@T.prim_func")[1:]
    anchored = [k for k in kernels if 'T.sblock("conv2d' in k or 'T.sblock("matmul' in k]
    assert anchored and all('"tirx.is_scheduled": True' in k for k in anchored)
    assert all("T.parallel" in k and "T.vectorized" in k for k in anchored)
    out = CompiledModel.load(artifact.library).run({"x": tiny_input})["output0"]
    with torch.no_grad():
        ref = tiny_net(torch.from_numpy(tiny_input)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


class SplitHead(nn.Module):
    """Channel split + ReLU6 + concat, as ShuffleNet's blocks and YOLO-style heads have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        return torch.cat([a, nn.functional.relu6(self.branch(b))], dim=1)


def test_split_and_relu6_build_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    net = SplitHead().eval()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "split.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    artifact = build(import_model(str(path)), resolve_target("x86-avx2"), tmp_path / "out", tuning_logs=False)
    got = CompiledModel.load(artifact.library).run(x.numpy())["output0"]
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-4)
