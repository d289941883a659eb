"""The wheel of this checkout, installed without torch into a fresh virtual environment.

What an ONNX user (or a device) gets from ``pip install qcompile``: the presets and the shipped
tuning records are in the wheel, every module imports without torch, the CLI imports, builds
(hitting the packaged x86-avx2 records), runs, benches and serves RPC, the Python API
quantizes, a PyTorch model is a one-line error naming the ``torch`` extra, and ``qcompile tune``
never writes into site-packages.  Everything runs from a folder outside the repository with the
installed package only (no PYTHONPATH, no editable install).  The first run downloads the
dependencies (apache-tvm, xgboost); later runs take them from pip's cache.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qcompile.errors import ConfigError, MissingDependencyError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("x86-avx2", "x86-avx512", "rpi4", "rpi5", "cuda-sm80")
SHAPE = (1, 3, 224, 224)


@dataclass
class Venv:
    root: Path
    site_packages: Path
    work: Path  # cwd for every command: outside the repository
    env: dict[str, str]  # for qcompile: no PYTHONPATH, its own empty user cache

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def qcompile(self, *args, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.root / "bin" / "qcompile"), *map(str, args)], cwd=self.work, env=self.env,
                              check=False, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"qcompile {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stderr}"
        return proc


def _clean_env() -> dict[str, str]:
    """The caller's environment minus what would let the checkout or the dev venv leak in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP") and not k.startswith("QCOMPILE_")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _copy_checkout(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files (what the wheel would be built from in a
    clean clone, plus uncommitted work); builds there leave no build/ in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("checkout")
    _copy_checkout(src)
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300, env=_clean_env())
    (whl,) = out.glob("qcompile-*.whl")
    return whl


def test_wheel_holds_the_presets_and_the_tuning_records(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in PRESETS:
        assert f"qcompile/target/presets/{preset}.json" in names
    shipped = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "qcompile" / "tuning_logs").glob("*/*/database_*.json"))
    assert len(shipped) >= 4, shipped
    assert set(shipped) | {"qcompile/tuning_logs/README.md"} <= names
    assert not [n for n in names if "/work/" in n], "MetaSchedule scratch (tuning_logs/**/work/) must not ship"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if "torch" in r.lower() or "onnxruntime" in r.lower()], core
    assert any('torch==' in r and 'extra == "torch"' in r for r in requires), requires


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Venv:
    root = tmp_path_factory.mktemp("venv") / "venv"
    pip_env = _clean_env()  # pip keeps its own cache (XDG_CACHE_HOME as the caller has it)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300, env=pip_env)
    install = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                             check=False, capture_output=True, text=True, timeout=1800, env=pip_env)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path_factory.mktemp("work")
    env = _clean_env()
    env["XDG_CACHE_HOME"] = str(work / "cache")  # no user records: builds read the packaged ones
    site = subprocess.run([str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=env, cwd=work).stdout.strip()
    return Venv(root, Path(site), work, env)


@pytest.fixture(scope="module")
def model(venv) -> tuple[Path, np.ndarray, np.ndarray]:
    """resnet18's stem (Conv 3->64 7x7/2 + bias + ReLU, MaxPool 3x3/2) as ONNX at 1x3x224x224,
    an input, and ONNX Runtime's output for it (computed here: the fresh venv has no onnxruntime)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 3, 7, 7)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(64) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["output"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "resnet18_stem", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 64, 56, 56])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path = venv.work / "model.onnx"
    onnx.save(proto, str(path))
    x = rng.standard_normal(SHAPE).astype(np.float32)
    np.save(venv.work / "x.npy", x)
    np.savez(venv.work / "calib.npz", input=rng.standard_normal((4, *SHAPE[1:])).astype(np.float32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, x, session.run(["output"], {"input": x})[0]


@pytest.fixture(scope="module")
def built(venv, model) -> dict:
    """``qcompile build model.onnx --target x86-avx2 -o out`` in the fresh venv; its manifest."""
    venv.qcompile("build", model[0].name, "--target", "x86-avx2", "-o", "out")
    return json.loads((venv.work / "out" / "model.manifest.json").read_text())


def test_installed_without_torch(venv):
    for module in ("torch", "torchvision", "onnxruntime"):
        proc = subprocess.run([str(venv.python), "-c", f"import {module}"], check=False, capture_output=True, text=True,
                              env=venv.env, cwd=venv.work)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, f"{module} is installed in the fresh venv"


def test_the_installed_package_is_used_and_every_module_imports(venv):
    """qcompile comes from the venv's site-packages (not the checkout), and each of its modules
    imports without torch: torch is imported on first use only."""
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import qcompile\n"
        "failed = {}\n"
        "for info in pkgutil.walk_packages(qcompile.__path__, 'qcompile.'):\n"
        "    try:\n"
        "        importlib.import_module(info.name)\n"
        "    except Exception as exc:\n"
        "        failed[info.name] = repr(exc)\n"
        "print(json.dumps({'file': qcompile.__file__, 'path': sys.path, 'failed': failed,\n"
        "                  'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnxruntime'))}))\n"
    )
    proc = subprocess.run([str(venv.python), "-c", script], check=False, capture_output=True, text=True, env=venv.env,
                          cwd=venv.work, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert Path(report["file"]).is_relative_to(venv.site_packages)
    leaks = [p for p in report["path"] if p and Path(p).resolve().is_relative_to(REPO)]
    assert not leaks, f"the checkout is on the fresh venv's sys.path: {leaks}"
    assert report["failed"] == {}, report["failed"]
    assert report["loaded"] == []


def test_targets_lists_the_presets(venv):
    out = venv.qcompile("targets").stdout
    listed = {line.split()[0] for line in out.splitlines() if line and not line[0].isspace()}
    assert set(PRESETS) <= listed, out


def test_build_applies_the_packaged_records(venv, built):
    tuning = built["build"]["tuning"]
    assert tuning["hits"] >= 1, tuning
    database = Path(tuning["database"])
    assert database.is_relative_to(venv.site_packages / "qcompile" / "tuning_logs"), database
    assert (venv.work / "out" / "model.so").is_file()


def test_run_matches_onnxruntime_and_bench_prints_its_stats(venv, model, built):
    _, _, expected = model
    venv.qcompile("run", "out/model.so", "--inputs", "x.npy", "--outputs", "y.npz")
    with np.load(venv.work / "y.npz") as outputs:
        np.testing.assert_allclose(outputs["output"], expected, rtol=1e-4, atol=1e-4)
    bench = venv.qcompile("bench", "out/model.so", "--inputs", "x.npy", "--repeat", "5", "--warmup", "1")
    assert "median" in bench.stdout and "ms" in bench.stdout, bench.stdout
    stats = json.loads(venv.qcompile("bench", "out/model.so", "--repeat", "3", "--json").stdout)
    assert stats["median_ms"] > 0


def test_rpc_server_serves_a_run(venv, built):
    from qcompile.runtime.rpc import free_port

    port = free_port()
    server = subprocess.Popen([str(venv.root / "bin" / "qcompile"), "rpc-server", "--port", str(port)], cwd=venv.work,
                              env=venv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = server.stdout.readline()
        assert "RPC server listening on 127.0.0.1:" in banner, (banner, server.stderr.read() if server.poll() else "")
        venv.qcompile("run", "out/model.so", "--rpc", f"127.0.0.1:{port}", "--inputs", "x.npy", "--outputs", "rpc.npz")
        venv.qcompile("run", "out/model.so", "--inputs", "x.npy", "--outputs", "local.npz")
        with np.load(venv.work / "rpc.npz") as remote, np.load(venv.work / "local.npz") as local:
            np.testing.assert_array_equal(remote["output"], local["output"])
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_python_api_compiles_quantizes_and_runs(venv, model):
    _, _, expected = model
    script = venv.work / "api.py"
    script.write_text(
        "import sys\n"
        "import numpy as np\n"
        "import qcompile\n"
        "x = np.load('x.npy')\n"
        "fp32 = qcompile.compile('model.onnx', target='x86-avx2', out_dir='api')\n"
        "int8 = qcompile.compile('model.onnx', target='x86-avx2', quantization=qcompile.Int8Config(num_samples=4),\n"
        "                        calibration_data='calib.npz', out_dir='api')\n"
        "for art, tag in ((fp32, 'fp32'), (int8, 'int8')):\n"
        "    m = qcompile.load(art.library)\n"
        "    np.save(f'api_{tag}.npy', m.run({'input': x})['output'])\n"
        "    print(tag, art.library.name, m.benchmark(repeat=3, warmup=1).to_json()['median_ms'])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnxruntime')]\n"
    )
    proc = subprocess.run([str(venv.python), script.name], cwd=venv.work, env=venv.env, check=False, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(venv.work / "api_fp32.npy"), expected, rtol=1e-4, atol=1e-4)
    int8 = np.load(venv.work / "api_int8.npy")
    assert int8.shape == expected.shape
    # 8-bit activations and 7-bit per-channel weights (x86-avx2 has no VNNI): a few steps of the output's scale.
    assert float(np.max(np.abs(int8 - expected))) < 0.05 * float(np.max(expected)), np.max(np.abs(int8 - expected))
    manifest = json.loads((venv.work / "api" / "model-int8.manifest.json").read_text())
    assert manifest["quantization"]["scheme"] != "none", manifest["quantization"]


@pytest.mark.parametrize("model_name", ["resnet18", "model.pt2"])
def test_pytorch_models_name_the_torch_extra(venv, model_name):
    if model_name.endswith(".pt2"):
        (venv.work / model_name).write_bytes(b"PK\x05\x06" + bytes(18))  # any file: torch is checked first
    proc = venv.qcompile("build", model_name, "--target", "x86-avx2", "-o", "out_torch", check=False)
    assert proc.returncode == MissingDependencyError.exit_code == 7, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install 'qcompile[torch]'" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (size, mtime), bytecode caches aside."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if "__pycache__" not in p.parts}


def test_tune_never_writes_into_site_packages(venv, model):
    package = venv.site_packages / "qcompile"
    before = _tree(package)
    proc = venv.qcompile("tune", model[0].name, "--target", "x86-avx2", "--trials", "1", timeout=900)
    written = sorted((venv.work / "cache" / "qcompile" / "tuning_logs").glob("*/*/database_tuning_record.json"))
    assert written, proc.stderr[-2000:]
    refused = venv.qcompile("tune", model[0].name, "--target", "x86-avx2", "--trials", "1",
                            "--log-dir", package / "tuning_logs", check=False)
    assert refused.returncode == ConfigError.exit_code, refused.stderr[-2000:]
    assert "read-only" in refused.stderr
    assert _tree(package) == before, "qcompile tune changed the installed package"
