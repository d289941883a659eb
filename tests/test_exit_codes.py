"""Exit codes 7-10 through the CLI (``qcompile.cli.main.main``): a missing optional package,
``compare --atol`` exceeded, bad calibration data, and a failing tuner each exit with their
class's code (qcompile/errors.py) and one ``error:`` line, never a traceback."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny

from qcompile.errors import (
    CalibrationError,
    MismatchError,
    MissingDependencyError,
    TuningError,
)


def _exits_with(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err
    errors = [ln for ln in result.err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory, tiny_onnx):
    from qcompile.cli.main import main

    out = tmp_path_factory.mktemp("onnx-artifact")
    assert main(["build", str(tiny_onnx), "-o", str(out), "--quiet"]) == 0
    return out / "tiny.so"


def test_exit_codes_are_the_documented_ones():
    assert (MissingDependencyError.exit_code, MismatchError.exit_code, CalibrationError.exit_code,
            TuningError.exit_code) == (7, 8, 9, 10)


@pytest.mark.parametrize("blocked", ["torch", "torchvision"])
def test_torch_missing_exits_7(cli, monkeypatch, tmp_path, tiny_pt2, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import torch(vision)` raises ImportError
    for model in ("resnet18", tiny_pt2):
        _exits_with(cli("build", model, "-o", tmp_path / "out", "--quiet"), 7, "pip install 'qcompile[torch]'")
    assert not (tmp_path / "out").exists()


def test_compare_without_onnxruntime_exits_7(cli, monkeypatch, onnx_artifact):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    _exits_with(cli("compare", onnx_artifact, "--repeat", "1"), 7, "onnxruntime", "pip install onnxruntime")


def test_compare_beyond_atol_exits_8(cli, tmp_path, tiny_input):
    # Build from one model, then put a differently seeded model of the same signature in its
    # place: compare's PyTorch reference loads the file the manifest names.
    source = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(make_tiny(seed=0), (torch.from_numpy(tiny_input),)), str(source))
    assert cli("build", source, "-o", tmp_path / "out", "--quiet").code == 0
    library = tmp_path / "out" / "model.so"
    assert cli("compare", library, "--repeat", "1", "--atol", "1e-4").code == 0
    torch.export.save(torch.export.export(make_tiny(seed=1), (torch.from_numpy(tiny_input),)), str(source))
    _exits_with(cli("compare", library, "--repeat", "1", "--atol", "1e-4"), 8, "exceeds --atol 0.0001")


@pytest.mark.parametrize("data, fragment", [
    (np.zeros((4, 3, 16, 16), "float32"), "expected [N, 3, 32, 32]"),
    (np.full((2, 3, 32, 32), np.nan, "float32"), "NaN or Inf"),
    (np.zeros((0, 3, 32, 32), "float32"), "is empty"),
], ids=["misshapen", "non-finite", "empty"])
def test_bad_calibration_data_exits_9(cli, tmp_path, tiny_pt2, data, fragment):
    np.save(tmp_path / "calib.npy", data)
    result = cli("build", tiny_pt2, "--quantize", "int8", "--calib-data", tmp_path / "calib.npy",
                 "-o", tmp_path / "out", "--quiet")
    _exits_with(result, 9, fragment)
    assert not (tmp_path / "out").exists()


def test_metaschedule_failure_exits_10(cli, monkeypatch, tmp_path, tiny_pt2):
    from tvm.s_tir import meta_schedule as ms

    import qcompile.tune.search as search

    def broken_search(*args, **kwargs):
        raise RuntimeError("injected MetaSchedule failure")

    monkeypatch.setattr(search, "seed_default_schedules", lambda *args, **kwargs: 0)  # no measuring here
    monkeypatch.setattr(ms.tune, "tune_tasks", broken_search)
    result = cli("tune", tiny_pt2, "--trials", "4", "--log-dir", tmp_path / "logs", "--quiet")
    _exits_with(result, 10, "tuning tiny", "injected MetaSchedule failure")
