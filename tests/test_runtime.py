"""Runtime: running, benchmarking, and refusing bad inputs or artifacts clearly."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import skip_unless

from qcompile.build import build
from qcompile.errors import ArtifactError, RuntimeInputError
from qcompile.frontend import import_model
from qcompile.manifest import manifest_path
from qcompile.runtime import CompiledModel
from qcompile.target import resolve_target
from qcompile.target.hostcpu import cpu_flags


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_pt2):
    return build(import_model(str(tiny_pt2)), resolve_target("native"), tmp_path_factory.mktemp("rt"))


@pytest.fixture(scope="module")
def loaded(artifact):
    return CompiledModel.load(artifact.library)


def test_run_accepts_dict_list_and_array(loaded, tiny_input):
    a = loaded.run({"x": tiny_input})["output0"]
    b = loaded.run([tiny_input])["output0"]
    c = loaded.run(tiny_input)["output0"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_default_inputs_are_deterministic(loaded):
    np.testing.assert_array_equal(loaded.run()["output0"], loaded.run()["output0"])


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"x": np.zeros((1, 3, 31, 32), "float32")}, r"input 'x' has shape \[1, 3, 31, 32\], the model expects \[1, 3, 32, 32\]"),
        ({"x": np.zeros((1, 3, 32, 32), "float64")}, r"input 'x' has dtype float64, the model expects float32"),
        ({"y": np.zeros((1, 3, 32, 32), "float32")}, r"\['y'\] are unknown; missing \['x'\]"),
        ([], r"got 0 inputs, the model takes 1"),
    ],
)
def test_bad_inputs(loaded, inputs, message):
    with pytest.raises(RuntimeInputError, match=message):
        loaded.run(inputs)


def test_benchmark_statistics(loaded):
    stats = loaded.benchmark(repeat=7, warmup=1).to_json()
    assert stats["repeat"] == 7 and stats["warmup"] == 1
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["throughput_per_s"] > 0


def test_modified_library_is_refused(artifact, tmp_path):
    lib = tmp_path / "m.so"
    shutil.copy(artifact.library, lib)
    shutil.copy(manifest_path(artifact.library), manifest_path(lib))
    with open(lib, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        CompiledModel.load(lib)


def test_missing_or_corrupt_manifest(artifact, tmp_path):
    lib = tmp_path / "m.so"
    shutil.copy(artifact.library, lib)
    with pytest.raises(ArtifactError, match="no manifest m.manifest.json"):
        CompiledModel.load(lib)
    manifest_path(lib).write_text("{ not json")
    with pytest.raises(ArtifactError, match="is corrupt"):
        CompiledModel.load(lib)


def test_missing_library():
    with pytest.raises(ArtifactError, match="does not exist"):
        CompiledModel.load("/nonexistent/model.so")


def test_foreign_architecture_is_refused(tmp_path, tiny_pt2):
    skip_unless(shutil.which("aarch64-linux-gnu-g++") is not None, "cross",
                "no aarch64 cross-compiler (apt-get install g++-aarch64-linux-gnu)")
    arm = build(import_model(str(tiny_pt2)), resolve_target("rpi4"), tmp_path)
    with pytest.raises(ArtifactError, match="built for aarch64-linux-gnu.*run it on the device"):
        CompiledModel.load(arm.library)


@pytest.mark.skipif("avx512f" in cpu_flags(), reason="this CPU runs AVX-512 code")
def test_avx512_artifact_refused_on_cpu_without_it(tmp_path, tiny_pt2):
    art = build(import_model(str(tiny_pt2)), resolve_target("x86-avx512"), tmp_path)
    assert "avx512f" in art.manifest.cpu_features
    with pytest.raises(ArtifactError, match="uses avx512.*which this CPU lacks: rebuild with --target native"):
        CompiledModel.load(art.library)


_BLOCK_FRAMEWORKS = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "onnx", "onnxruntime"}:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def test_runtime_works_without_torch_or_onnx(artifact):
    # tvm_ffi imports torch opportunistically when it is installed; the runtime must not need it.
    code = _BLOCK_FRAMEWORKS + (
        "from qcompile.runtime import CompiledModel\n"
        f"m = CompiledModel.load({str(artifact.library)!r})\n"
        "out = m.run()['output0']; stats = m.benchmark(repeat=2, warmup=0).to_json()\n"
        "assert 'torch' not in sys.modules\n"
        "print(out.shape, stats['repeat'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "(1, 10) 2"
