"""Runtime: running, benchmarking, and refusing bad inputs or artifacts clearly."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
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


def reference(net, x: np.ndarray) -> np.ndarray:
    """The PyTorch module's output for ``x``."""
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def test_run_accepts_dict_list_and_array(loaded, tiny_net, tiny_input):
    expected = reference(tiny_net, tiny_input)
    for inputs in ({"x": tiny_input}, [tiny_input], tiny_input):
        np.testing.assert_allclose(loaded.run(inputs)["output0"], expected, atol=1e-4, rtol=0)


def test_successive_runs_see_their_own_inputs_and_keep_their_outputs(artifact, tiny_net, tiny_input):
    # run() copies each call's inputs into the tensors the VM holds and copies the outputs out:
    # every run must match PyTorch on its own input, and an earlier result must not change
    model = CompiledModel.load(artifact.library)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal(tiny_input.shape).astype(np.float32) for _ in range(3)]
    results = [model.run(x)["output0"] for x in inputs]
    for x, got in zip(inputs, results):
        np.testing.assert_allclose(got, reference(tiny_net, x), atol=1e-4, rtol=0)
    source = inputs[0].copy()
    first = model.run(source)["output0"].copy()
    source[...] = 0  # the caller's array is not read after run() returns
    model.run(inputs[1])
    np.testing.assert_array_equal(model.run(inputs[0])["output0"], first)


def test_default_inputs_are_seeded_standard_normal(loaded, tiny_net):
    # Documented default: numpy's default_rng(0) standard normal, in the input's shape and dtype.
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    np.testing.assert_array_equal(loaded.default_inputs()["x"], x)
    np.testing.assert_allclose(loaded.run()["output0"], reference(tiny_net, x), atol=1e-4, rtol=0)


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
    loaded.run({"x": np.zeros((1, 3, 32, 32), "float32")})  # held inputs: run()'s fast path is on
    with pytest.raises(RuntimeInputError, match=message):
        loaded.run(inputs)


def test_inputs_the_fast_path_does_not_take_are_converted(loaded, tiny_net, tiny_input):
    """After a first run, arrays of the model's shape and dtype go straight to the held input
    tensors; a strided view or a Fortran-ordered copy still goes through the checks and is copied in."""
    loaded.run(tiny_input)
    strided = np.repeat(tiny_input, 2, axis=3)[..., ::2]
    assert not strided.flags.c_contiguous
    for inputs in ({"x": strided}, [np.asfortranarray(tiny_input)], (tiny_input,)):
        np.testing.assert_allclose(loaded.run(inputs)["output0"], reference(tiny_net, tiny_input), atol=1e-4, rtol=0)


def test_benchmark_statistics(loaded, tiny_net, tiny_input):
    loaded.run(np.zeros_like(tiny_input))  # the timed runs must replace these outputs
    result = loaded.benchmark(tiny_input, repeat=7, warmup=1, number=2)
    # What the timed calls computed (the outputs the last of them left in the VM).
    np.testing.assert_allclose(loaded._collect_outputs()["output0"], reference(tiny_net, tiny_input),
                               atol=1e-4, rtol=0)
    times = np.array(result.times_ms)
    assert times.shape == (7,) and np.all(times > 0)
    stats = result.to_json()
    assert stats["repeat"] == 7 and stats["warmup"] == 1 and stats["number"] == 2
    assert stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"]
    for key, value in (("min_ms", times.min()), ("max_ms", times.max()), ("median_ms", np.median(times)),
                       ("mean_ms", times.mean()), ("std_ms", times.std())):
        assert stats[key] == pytest.approx(value, abs=1e-4), key
    assert stats["throughput_per_s"] == pytest.approx(1000.0 / np.median(times), rel=1e-4)  # batch 1


def test_benchmark_refuses_bad_counts(loaded):
    for kwargs in ({"repeat": 0}, {"number": 0}, {"warmup": -1}):
        with pytest.raises(RuntimeInputError, match="repeat >= 1, number >= 1, warmup >= 0"):
            loaded.benchmark(**kwargs)


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


def test_avx512_artifact_refused_on_cpu_without_it(tmp_path, tiny_pt2, monkeypatch):
    from qcompile.target import hostcpu

    art = build(import_model(str(tiny_pt2)), resolve_target("x86-avx512"), tmp_path)
    assert "avx512f" in art.manifest.cpu_features
    # This CPU as a VM that hides AVX-512 reports it (the same flags without avx512*).
    hidden = {flag for flag in cpu_flags() if not flag.startswith("avx512")} or {"sse4_2", "avx2"}
    monkeypatch.setattr(hostcpu, "cpu_flags", lambda *_: hidden)
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


def test_runtime_works_without_torch_or_onnx(artifact, tmp_path, tiny_net, tiny_input):
    # tvm_ffi imports torch opportunistically when it is installed; the runtime must not need it.
    np.save(tmp_path / "x.npy", tiny_input)
    code = _BLOCK_FRAMEWORKS + (
        "import numpy as np\n"
        "from qcompile.runtime import CompiledModel\n"
        f"m = CompiledModel.load({str(artifact.library)!r})\n"
        f"out = m.run(np.load({str(tmp_path / 'x.npy')!r}))['output0']\n"
        "stats = m.benchmark(repeat=2, warmup=0).to_json()\n"
        "assert 'torch' not in sys.modules\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        "print(stats['repeat'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "2"
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference(tiny_net, tiny_input), atol=1e-4, rtol=0)
