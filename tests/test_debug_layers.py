"""``qcompile debug`` / ``qcompile.accuracy.debug.debug_layers``: per-layer int8 errors, worst first.

A deliberately broken layer (its calibrated output range shrunk 30x, so most of its
output clips) must rank first with the cause "output range (clipping)", whichever layer it
is; the layers after it show the error as accumulated, not as their own.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qcompile.accuracy.debug import debug_layers

CALIB = np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype("float32")


def _shrink(index: int):
    def hook(plan, ranges):
        out = plan.regions[index].out
        lo, hi = ranges[out]
        return {**ranges, out: (lo / 30.0, hi / 30.0)}

    return hook


def test_healthy_model_has_no_clipping_layer(tiny_pt2):
    report = debug_layers(tiny_pt2, CALIB, limit=4)
    assert [la.kind for la in report.layers].count("conv2d") == 3 and len(report.layers) == 4
    assert all(la.local_sqnr_db > 30 for la in report.layers), report.to_markdown()
    assert all("clipping" not in la.cause for la in report.layers), report.to_markdown()
    # the integer kernels compute what the QDQ model does
    for la in report.layers:
        assert la.int8_sqnr_db == pytest.approx(la.sqnr_db, abs=0.5), la


@pytest.mark.parametrize("index", [1, 2])
def test_broken_layer_ranks_first(tiny_pt2, index):
    healthy = {la.name: la for la in debug_layers(tiny_pt2, CALIB, limit=4).layers}
    report = debug_layers(tiny_pt2, CALIB, limit=4, ranges_hook=_shrink(index))
    worst = report.layers[0]
    assert worst.name == f"conv2d_{index}", report.to_markdown()
    assert worst.cause == "output range (clipping)"
    assert worst.output.clipped > 0.1 and worst.local_sqnr_db < healthy[worst.name].local_sqnr_db - 20
    later = [la for la in report.layers[1:] if la.sqnr_db < healthy[la.name].sqnr_db - 10]
    assert later and all(la.cause == "accumulated" for la in later), report.to_markdown()
    assert report.outputs["output0"]["sqnr_db"] < 35


def test_cli_debug_json(cli, tiny_pt2, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=CALIB)
    result = cli("debug", tiny_pt2, "--calib-data", calib, "--limit", "2", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["samples"] == 2 and len(report["layers"]) == 4
    assert {"sqnr_db", "int8_sqnr_db", "local_sqnr_db", "cause", "input", "output"} <= set(report["layers"][0])
    text = cli("debug", tiny_pt2, "--calib-data", calib, "--limit", "2", "--top", "2")
    assert text.code == 0 and text.out.count("| conv2d_") + text.out.count("| matmul_") == 2, text.out


def test_layer_whose_output_is_the_model_output(tiny_onnx):
    """ONNX import binds the classifier's result as the function's output var itself."""
    report = debug_layers(tiny_onnx, CALIB, limit=2)
    last = next(la for la in report.layers if la.kind == "matmul")
    assert math.isfinite(last.sqnr_db) and last.sqnr_db > 20
    assert last.sqnr_db == pytest.approx(report.outputs["logits"]["sqnr_db"], abs=0.01)
