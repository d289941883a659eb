"""Shared fixtures: tiny models built in-process, and CLI runners.

Everything is written under pytest's tmp_path; nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qcompile.cli.main import main

REPO = Path(__file__).resolve().parent.parent

# Tools a machine class must have: named in QCOMPILE_REQUIRE (comma-separated, .ci/run sets it),
# their absence fails the tests that need them instead of skipping them.
REQUIRABLE = {"emulator", "cross", "cmake"}


def required() -> set[str]:
    """The names in ``QCOMPILE_REQUIRE``."""
    return {w.strip() for w in os.environ.get("QCOMPILE_REQUIRE", "").split(",") if w.strip()}


def pytest_configure(config) -> None:
    unknown = required() - REQUIRABLE
    if unknown:
        raise pytest.UsageError(f"QCOMPILE_REQUIRE names {sorted(unknown)}; known: {sorted(REQUIRABLE)}")


def skip_unless(condition: bool, what: str, reason: str) -> None:
    """Skip the calling test unless ``condition``; fail it instead when ``what`` is in
    ``QCOMPILE_REQUIRE`` (a tool this machine class must have)."""
    assert what in REQUIRABLE, what
    if condition:
        return
    if what in required():
        pytest.fail(f"{reason} (QCOMPILE_REQUIRE names {what!r})", pytrace=False)
    # Reported at the test's location (as a skipif marker is), not at this helper's.
    raise pytest.skip.Exception(reason, _use_item_location=True)


@pytest.fixture(autouse=True, scope="session")
def _user_tuning_logs(tmp_path_factory):
    """Tests never read or write the user's own records (~/.cache/qcompile/tuning_logs):
    builds without --log-dir see only the records shipped in the package."""
    old = os.environ.get("QCOMPILE_TUNING_LOGS")
    os.environ["QCOMPILE_TUNING_LOGS"] = str(tmp_path_factory.mktemp("user_tuning_logs"))
    yield
    if old is None:
        os.environ.pop("QCOMPILE_TUNING_LOGS", None)
    else:
        os.environ["QCOMPILE_TUNING_LOGS"] = old


class TinyResNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block, pooling, dense head: the op mix of real CNNs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.block(y))
        y = self.pool(y).mean(dim=(2, 3))
        return self.head(y)


class ShapeHeadNet(nn.Module):
    """Its ONNX export with dynamic axes computes Reshape targets from Shape at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = y.reshape(y.shape[0], y.shape[1], -1).mean(-1)
        return self.fc(y.reshape(y.shape[0], -1))


def make_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = TinyResNet().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding is really tested
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def run_relax(mod, *arrays: np.ndarray, target: str = "llvm") -> np.ndarray:
    """``mod``'s ``main`` compiled for ``target`` and run on ``arrays`` (TVM's VM, this CPU)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def build_like_pytorch(tmp_path: Path, module: nn.Module, shape: tuple[int, ...], int8: bool, target: str = "llvm"):
    """Export ``module`` (input ``x`` of ``shape``) to ONNX, build it for ``target`` (int8 calibrated
    on 4 random samples when ``int8``) with the IR dumped to ``tmp_path/ir``, run it on the first
    sample and check it against PyTorch: within 1e-4 in float32, correlation above 0.99 in int8.
    Returns the Artifact, for the caller's checks of the dumped IR and the manifest."""
    import qcompile

    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal(shape).astype("float32")} for _ in range(4)]
    path = tmp_path / "m.onnx"
    torch.onnx.export(module, (torch.from_numpy(samples[0]["x"]),), str(path), input_names=["x"], dynamo=False)
    options = {"quantization": qcompile.Int8Config(num_samples=4), "calibration_data": samples} if int8 else {}
    built = qcompile.compile(qcompile.import_model(str(path)), target, out_dir=tmp_path / "out", name="m",
                             dump_ir=tmp_path / "ir", **options)
    with torch.no_grad():
        expected = module(torch.from_numpy(samples[0]["x"])).numpy()
    got = next(iter(qcompile.load(built.library).run(samples[0]).values()))
    if int8:
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    return built


@pytest.fixture(scope="session")
def tiny_net() -> nn.Module:
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_input() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype("float32")


@pytest.fixture(scope="session")
def tiny_pt2(tmp_path_factory, tiny_net, tiny_input) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.pt2"
    torch.export.save(torch.export.export(tiny_net, (torch.from_numpy(tiny_input),)), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_net, tiny_input) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    torch.onnx.export(tiny_net, (torch.from_numpy(tiny_input),), str(path), input_names=["input"],
                      output_names=["logits"], dynamo=False)
    return path


@pytest.fixture(scope="session")
def dynamic_onnx(tmp_path_factory) -> Path:
    """ShapeHeadNet exported with symbolic batch/height/width."""
    torch.manual_seed(0)
    net = ShapeHeadNet().eval()
    path = tmp_path_factory.mktemp("models") / "dynamic.onnx"
    torch.onnx.export(net, (torch.zeros(2, 3, 16, 16),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}}, dynamo=False)
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli():
    """Run ``qcompile ARGS`` in-process; returns exit code, stdout, stderr."""

    def _run(*args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse errors
                code = int(exc.code or 0)
        return CliResult(code, out.getvalue(), err.getvalue())

    return _run


@pytest.fixture
def cli_subprocess():
    """Run the installed ``qcompile`` console script (what a user runs)."""

    def _run(*args: str, timeout: int = 900) -> CliResult:
        exe = Path(sys.executable).with_name("qcompile")
        proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ))
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return _run


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """A CNN trained on scikit-learn's real 8x8 digits (benchmarks/digits_accuracy.py's), built
    in float32 and int8 (200 calibration samples): (fp32 .so, int8 .so, test .npz with labels,
    test x, test y)."""
    import importlib.util

    import qcompile

    spec = importlib.util.spec_from_file_location("digits_accuracy", REPO / "benchmarks" / "digits_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = bench.load_digits()
    net = bench.train(xtr, ytr)
    work = tmp_path_factory.mktemp("digits")
    pt2 = work / "digits.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 8, 8),)), str(pt2))
    fp32 = qcompile.compile(str(pt2), "native", out_dir=work, name="fp32", tuning_logs=False)
    int8 = qcompile.compile(str(pt2), "native", quantization=qcompile.Int8Config(num_samples=200),
                            calibration_data=xtr[:200], out_dir=work, name="int8", tuning_logs=False)
    data = work / "test.npz"
    np.savez(data, x=xte, labels=yte)
    return fp32.library, int8.library, data, xte, yte
