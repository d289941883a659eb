"""The CLI end to end on a tiny model, and one-line errors with non-zero exits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qcompile.errors import (
    ArtifactError,
    ConfigError,
    ModelImportError,
    RuntimeInputError,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_pt2):
    """`qcompile build tiny.pt2 -o OUT` through the installed console script."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("cli")
    exe = Path(sys.executable).with_name("qcompile")
    proc = subprocess.run([str(exe), "build", str(tiny_pt2), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "compiling tiny" in proc.stderr  # progress is shown
    assert proc.stdout.split() == [str(out / "tiny.so"), str(out / "tiny.manifest.json")]
    return out / "tiny.so"


def test_run_with_npz_inputs_and_outputs(cli, built, tmp_path, tiny_net, tiny_input):
    np.savez(tmp_path / "in.npz", x=tiny_input)
    result = cli("run", built, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz", "--print-top", "3")
    assert result.code == 0, result.err
    with np.load(tmp_path / "out.npz") as data:
        got = data["output0"]
    expected = tiny_net(torch.from_numpy(tiny_input)).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    top3 = np.argsort(-expected[0])[:3]
    assert [int(t.split(":")[0]) for t in result.out.split("batch 0: ")[1].split(", ")] == list(top3)


def test_run_with_npy_for_single_input(cli, built, tmp_path, tiny_input):
    np.save(tmp_path / "in.npy", tiny_input)
    assert cli("run", built, "--inputs", tmp_path / "in.npy").code == 0


def test_bench_json(cli, built):
    result = cli("bench", built, "--repeat", "5", "--warmup", "1", "--json")
    assert result.code == 0, result.err
    stats = json.loads(result.out)
    for key in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "repeat"):
        assert key in stats
    assert stats["repeat"] == 5 and stats["median_ms"] > 0


def test_info_prints_manifest(cli, built):
    result = cli("info", built, "--json")
    assert result.code == 0
    manifest = json.loads(result.out)
    assert manifest["library"]["file"] == "tiny.so" and manifest["inputs"][0]["name"] == "x"
    text = cli("info", built)
    assert "input:        x [1, 3, 32, 32] float32" in text.out and "quantization: none" in text.out


def test_compare_against_pytorch(cli, built):
    result = cli("compare", built, "--repeat", "2", "--atol", "1e-4", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["reference"].startswith("PyTorch")
    assert report["outputs"]["output0"]["max_abs_diff"] <= 1e-4


def _one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err
    lines = [ln for ln in result.err.strip().splitlines() if not ln.startswith("[")]  # drop progress lines
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_model_inputs_leave_no_artifact(cli, tmp_path):
    out = tmp_path / "out"
    corrupt = tmp_path / "broken.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    cases = [
        (("build", tmp_path / "missing.onnx", "-o", out), ModelImportError.exit_code, ["missing.onnx", "does not exist"]),
        (("build", corrupt, "-o", out), ModelImportError.exit_code, ["broken.onnx", "not a valid ONNX model"]),
        (("build", "resnet19", "-o", out), ModelImportError.exit_code, ["unknown model name 'resnet19'"]),
        (("build", "resnet18", "--target", "quantum-9000", "-o", out), ConfigError.exit_code, ["unknown target"]),
        (("build", "resnet18", "--input-shape", "x:1xfoo", "-o", out), ConfigError.exit_code, ["--input-shape"]),
    ]
    for args, code, fragments in cases:
        _one_line_error(cli(*args), code, *fragments)
        assert not out.exists()


def test_unquoted_tvmc_target_on_cli(cli, tmp_path, tiny_pt2):
    # "-mcpu=..." would otherwise be an unknown option to argparse.
    result = cli("build", tiny_pt2, "--target", "llvm", "-mcpu=nosuch", "-bogus=1", "-o", tmp_path / "o")
    _one_line_error(result, ConfigError.exit_code, "Unknown config option 'bogus'")


def test_wrong_runtime_inputs(cli, built, tmp_path):
    np.savez(tmp_path / "shape.npz", x=np.zeros((1, 3, 16, 16), "float32"))
    _one_line_error(cli("run", built, "--inputs", tmp_path / "shape.npz"), RuntimeInputError.exit_code,
                    "input 'x' has shape [1, 3, 16, 16], the model expects [1, 3, 32, 32]")
    np.savez(tmp_path / "dtype.npz", x=np.zeros((1, 3, 32, 32), "int32"))
    _one_line_error(cli("bench", built, "--inputs", tmp_path / "dtype.npz"), RuntimeInputError.exit_code,
                    "input 'x' has dtype int32, the model expects float32")
    _one_line_error(cli("run", built, "--inputs", tmp_path / "nope.npz"), RuntimeInputError.exit_code,
                    "nope.npz does not exist")
    _one_line_error(cli("run", tmp_path / "gone.so"), ArtifactError.exit_code, "gone.so does not exist")
