"""The CLI end to end on a tiny model, and one-line errors with non-zero exits."""
from __future__ import annotations

import hashlib
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


def _reference(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def test_run_with_npy_for_single_input(cli, built, tmp_path, tiny_net, tiny_input):
    np.save(tmp_path / "in.npy", tiny_input)
    assert cli("run", built, "--inputs", tmp_path / "in.npy", "--outputs", tmp_path / "out.npz").code == 0
    with np.load(tmp_path / "out.npz") as data:
        np.testing.assert_allclose(data["output0"], _reference(tiny_net, tiny_input), atol=1e-4, rtol=0)


def test_bench_json(cli, built):
    result = cli("bench", built, "--repeat", "5", "--warmup", "1", "--number", "2", "--json")
    assert result.code == 0, result.err
    stats = json.loads(result.out)
    assert (stats["repeat"], stats["warmup"], stats["number"]) == (5, 1, 2)
    assert stats["library"] == str(built) and stats["target"] == "native" and stats["device"] == "local"
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"]
    text = cli("bench", built, "--repeat", "3", "--warmup", "0")
    assert text.code == 0 and "(native) on local: 3 runs after 0 warm-up" in text.out


def test_info_prints_manifest(cli, built):
    result = cli("info", built, "--json")
    assert result.code == 0
    manifest = json.loads(result.out)
    assert manifest["library"]["file"] == "tiny.so" and manifest["inputs"][0]["name"] == "x"
    text = cli("info", built)
    assert "input:        x [1, 3, 32, 32] float32" in text.out and "quantization: none" in text.out


def test_compare_against_pytorch(cli, built, tmp_path, tiny_net, tiny_input):
    np.save(tmp_path / "in.npy", tiny_input)
    result = cli("compare", built, "--inputs", tmp_path / "in.npy", "--repeat", "2", "--atol", "1e-4", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["reference"] == f"PyTorch {torch.__version__}"
    # The reported difference is the artifact's against the PyTorch module, computed here independently.
    assert cli("run", built, "--inputs", tmp_path / "in.npy", "--outputs", tmp_path / "out.npz").code == 0
    with np.load(tmp_path / "out.npz") as data:
        ours = data["output0"]
    expected = _reference(tiny_net, tiny_input)
    entry = report["outputs"]["output0"]
    assert entry["max_abs_diff"] == pytest.approx(float(np.abs(ours.astype(np.float64) - expected).max()), abs=1e-7)
    assert entry["max_abs_diff"] <= 1e-4 and entry["shape"] == [1, 10]
    assert entry["top1_agreement"] == float(ours.argmax(1)[0] == expected.argmax(1)[0])
    assert report["latency_ms"]["qcompile"] > 0 and report["latency_ms"]["reference"] > 0


def _state_dict_sha256(state: dict) -> str:
    """sha256 over the state_dict's names and tensor bytes, in name order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_weights_reach_the_build(cli, tmp_path):
    """``--weights`` for a torchvision name: the artifact computes the module loaded with them,
    not the seeded default, and its manifest names and hashes them."""
    import torchvision

    name = "squeezenet1_1"  # the smallest torchvision classifier (1.2 M parameters)
    torch.manual_seed(1)  # qcompile's default weights come from seed 0
    torch.save(torchvision.models.get_model(name, weights=None).state_dict(), tmp_path / "w.pt")
    weighted = torchvision.models.get_model(name, weights=None)
    weighted.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    torch.manual_seed(0)
    default = torchvision.models.get_model(name, weights=None)

    result = cli("build", name, "--weights", tmp_path / "w.pt", "--input-shape", "x:1x3x64x64",
                 "-o", tmp_path / "out", "--quiet")
    assert result.code == 0, result.err
    library = tmp_path / "out" / f"{name}.so"
    manifest = json.loads(cli("info", library, "--json").out)
    assert manifest["model"]["kind"] == "torchvision" and manifest["model"]["name"] == name
    assert manifest["model"]["weights"] == str((tmp_path / "w.pt").resolve())
    assert manifest["model"]["sha256"] == _state_dict_sha256(weighted.state_dict())
    assert manifest["model"]["sha256"] != _state_dict_sha256(default.state_dict())

    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    assert cli("run", library, "--inputs", tmp_path / "x.npy", "--outputs", tmp_path / "y.npz").code == 0
    with np.load(tmp_path / "y.npz") as data:
        got = data["output0"]
    want = _reference(weighted.eval(), x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(got - _reference(default.eval(), x)).max() > 100 * np.abs(got - want).max() + 1e-3
    # compare's reference loads the same weights.
    compare = cli("compare", library, "--inputs", tmp_path / "x.npy", "--repeat", "1", "--atol", "1e-4")
    assert compare.code == 0, compare.err


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


def test_help_of_every_command_renders(cli):
    """``qcompile --help`` and each command's ``--help`` print and exit 0 (argparse formats
    help strings with %: a bare % in one of them breaks the whole listing)."""
    from qcompile.cli.main import make_parser

    result = cli("--help")
    assert result.code == 0 and "explain" in result.out, result.err
    commands = next(a for a in make_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name in commands:
        result = cli(name, "--help")
        assert result.code == 0, (name, result.err)
