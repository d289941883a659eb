"""deploy/: the C++ app (CMake, TVM's C++ runtime from the wheel) and the minimal Python
app print the same top-5 as `qcompile run` on the same input."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import skip_unless

from qcompile.build import build
from qcompile.frontend import import_model
from qcompile.target import resolve_target

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_pt2):
    return build(import_model(str(tiny_pt2)), resolve_target("native"), tmp_path_factory.mktemp("apps"))


@pytest.fixture(scope="module")
def input_npy(tmp_path_factory, tiny_input):
    path = tmp_path_factory.mktemp("input") / "x.npy"
    np.save(path, tiny_input)
    return path


def _top_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("batch ")]


@pytest.fixture(scope="module")
def expected(artifact, input_npy, tiny_net, tiny_input):
    """`qcompile run --print-top 5`'s line, whose classes are PyTorch's top 5 for the input."""
    exe = Path(sys.executable).with_name("qcompile")
    out = subprocess.run([str(exe), "run", str(artifact.library), "--inputs", str(input_npy), "--print-top", "5"],
                         capture_output=True, text=True, check=True).stdout
    lines = _top_lines(out)
    assert len(lines) == 1 and lines[0].count(":") == 6  # "batch 0: i:s, ... (5 pairs)"
    with torch.no_grad():
        logits = tiny_net(torch.from_numpy(tiny_input)).numpy()[0]
    classes = [int(pair.split(":")[0]) for pair in lines[0].split("batch 0: ")[1].split(", ")]
    assert classes == np.argsort(-logits)[:5].tolist()
    return lines


def test_cpp_app_prints_the_same_top5(tmp_path, artifact, input_npy, expected):
    skip_unless(shutil.which("cmake") is not None and shutil.which("c++") is not None, "cmake",
                "cmake and a C++ compiler are needed (scripts/setup.sh installs them)")
    build_dir = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(REPO / "deploy" / "cpp-app"), "-B", str(build_dir),
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir)], check=True, capture_output=True)
    app = subprocess.run([str(build_dir / "qcompile_app"), str(artifact.library), str(input_npy), "5"],
                         capture_output=True, text=True)
    assert app.returncode == 0, app.stderr
    assert _top_lines(app.stdout) == expected
    bad = subprocess.run([str(build_dir / "qcompile_app"), str(artifact.library), str(artifact.library)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "not a .npy file" in bad.stderr


def test_python_app_prints_the_same_top5_without_torch(artifact, input_npy, expected):
    script = REPO / "deploy" / "python-app" / "classify.py"
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            f"sys.argv = ['classify.py', {str(artifact.library)!r}, {str(input_npy)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    app = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert app.returncode == 0, app.stderr
    assert _top_lines(app.stdout) == expected
