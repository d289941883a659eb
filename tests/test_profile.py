"""``qcompile bench --profile`` / ``CompiledModel.profile``: per-kernel time, slowest first."""
from __future__ import annotations

import json

import pytest

import qcompile
from qcompile.runtime.profile import VM_BUILTIN


def test_bench_profile_lists_the_kernels(cli, tiny_pt2, tmp_path):
    art = qcompile.compile(str(tiny_pt2), "native", out_dir=tmp_path, name="tiny", tuning_logs=False)
    result = cli("bench", art.library, "--profile", "--repeat", "5", "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)["profile"]
    names = [r["name"] for r in rows]
    assert VM_BUILTIN in names and any("conv2d" in n for n in names)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-3)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    # every kernel of the library runs once per call here (no loops in this model)
    assert all(r["calls"] == 1 for r in rows if r["name"] != VM_BUILTIN)
    text = cli("bench", art.library, "--profile", "--repeat", "3")
    assert text.code == 0 and "per kernel" in text.out and "share" in text.out
