"""The README's ``## Python`` example runs as written; its performance table is generated.

Contract with README.md: a ``## Python`` heading followed by one ```python fenced block that
uses ``model.onnx`` (one input named ``input``, 1x3x32x32 float32) and ``calib.npz`` in the
current folder.  The test writes both into tmp_path, runs the block there with this venv's
Python, and checks it exits 0 and leaves the library and manifest where it says (its
``out_dir``, ``out`` by default, and any ``out/...`` path it names).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Python[ \t]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Python' section"
    return match.group(1)


def python_block() -> str:
    blocks = FENCE.findall(python_section())
    assert len(blocks) == 1, f"README.md's '## Python' section should hold one ```python block, not {len(blocks)}"
    return blocks[0]


def write_model(folder: Path) -> None:
    """``model.onnx`` (input ``input`` 1x3x32x32 float32: conv, ReLU, global pool, dense) and
    ``calib.npz`` (8 samples keyed by the input's name)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {
        "conv_w": (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32),
        "conv_b": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "fc_w": (rng.standard_normal((10, 8)) * 0.3).astype(np.float32),
        "fc_b": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "readme_model", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    np.savez(folder / "calib.npz", input=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))


def test_python_section_keeps_its_contract():
    block = python_block()
    assert "model.onnx" in block and "calib.npz" in block, block
    assert "import qcompile" in block, block


def test_python_example_runs(tmp_path):
    block = python_block()
    write_model(tmp_path)
    (tmp_path / "example.py").write_text(block)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # conftest's own QCOMPILE_TUNING_LOGS stays
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, check=False, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"README's Python example failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"

    found = re.search(r"""out_dir\s*=\s*["']([^"']+)["']""", block)
    out = tmp_path / (found.group(1) if found else "out")  # qcompile.compile's default out_dir is "out"
    libraries = sorted(out.glob("*.so"))
    assert libraries, f"the example left no library in {out}: {sorted(p.name for p in tmp_path.rglob('*'))}"
    manifests = [lib.with_name(lib.name[:-3] + ".manifest.json") for lib in libraries]
    assert all(m.is_file() for m in manifests), manifests
    named = re.findall(rf"""["']({re.escape(out.name)}/[^"']+)["']""", block)
    assert all((tmp_path / n).exists() for n in named), [n for n in named if not (tmp_path / n).exists()]
    if "Int8Config" in block:  # the example quantizes: one of its manifests says so
        schemes = [json.loads(m.read_text()).get("quantization", {}).get("scheme", "none") for m in manifests]
        assert any(s != "none" for s in schemes), schemes



def test_performance_and_accuracy_tables_are_the_scripts_output():
    """The README's performance table and docs/quantization.md's accuracy table are what
    benchmarks/readme_table.py renders from the committed results (regenerate them with
    ``--write`` after a ``--save``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_table", REPO / "benchmarks" / "readme_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = (REPO / "README.md").read_text()
    block = table.readme_block(text)
    assert block is not None, "README.md has no generated performance table"
    assert block == table.render()
    accuracy = table.readme_block(table.ACC_PAGE.read_text(), table.ACC_BEGIN, table.ACC_END)
    assert accuracy is not None, "docs/quantization.md has no generated accuracy table"
    assert accuracy == table.render_accuracy()
