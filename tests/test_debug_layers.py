"""``qcompile debug`` / ``qcompile.accuracy.debug.debug_layers``: per-layer int8 errors, worst first.

A deliberately broken layer (its calibrated output range shrunk 30x, so most of its
output clips) must rank first with the cause "output range (clipping)", whichever layer it
is; the layers after it show the error as accumulated, not as their own.  On a depthwise-separable
digits CNN whose depthwise channel ranges are made ~1000x apart (tests/test_equalize.py's case),
per-tensor int8 collapses: the debugger, preparing the model as a build does (cross-layer
equalization and bias correction), reports the recovered model, and says which corrections it applied.
"""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO

import qcompile
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


@pytest.fixture(scope="module")
def depthwise_case(tmp_path_factory):
    """(onnx path, calibration .npz, data .npz): benchmarks/digits_accuracy.py's DepthwiseNet,
    trained 3 epochs on the digits, depthwise channels rescaled over three decades (the same
    function); 64 training digits to calibrate, 16 held-out digits to measure on."""
    spec = importlib.util.spec_from_file_location("digits_accuracy", REPO / "benchmarks" / "digits_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(2)
    xtr, ytr, xte, _ = bench.load_digits()
    net = bench.imbalance_depthwise(bench.train(xtr, ytr, epochs=3, make=bench.DepthwiseNet))
    work = tmp_path_factory.mktemp("debug_depthwise")
    path = work / "dw.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    np.savez(work / "calib.npz", x=xtr[:64])
    np.savez(work / "data.npz", x=xte[:16])
    return path, work / "calib.npz", work / "data.npz"


def test_corrections_the_build_applies_are_measured(depthwise_case):
    """Per-tensor weights: with equalization and bias correction (the default) every layer's
    error is at most that without them, the deep layers' and the output's far smaller."""
    path, calib, data = depthwise_case
    per_tensor = {"weights": qcompile.PerTensor(), "num_samples": 64}
    on = debug_layers(str(path), calib, qcompile.Int8Config(**per_tensor), data, limit=16)
    off = debug_layers(str(path), calib, qcompile.Int8Config(**per_tensor, equalize=False, bias_correction=False),
                       data, limit=16)
    print(on.to_markdown(), off.to_markdown(), sep="\n")
    assert len(on.corrections["equalized"]) == 4 and len(on.corrections["bias_corrected"]) == 6
    assert off.corrections == {}
    assert on.to_markdown().splitlines()[1] == ("corrections applied: cross-layer equalization (4 conv pairs, "
                                                "high-bias absorption in 0); bias correction (6 layers)")
    assert off.to_markdown().splitlines()[1] == "corrections applied: none"
    assert on.to_json()["corrections"] == on.corrections
    assert off.int8_outputs["y"]["sqnr_db"] < 10 and on.int8_outputs["y"]["sqnr_db"] > 30  # collapse, recovered
    before = {la.name: la for la in off.layers}
    for la in on.layers:
        assert la.sqnr_db >= before[la.name].sqnr_db - 0.5 and la.int8_sqnr_db >= before[la.name].int8_sqnr_db - 0.5, la
    assert min(la.sqnr_db for la in on.layers) > min(la.sqnr_db for la in off.layers) + 20


def test_cli_debug_correction_flags(cli, depthwise_case):
    """--per-tensor turns both corrections on unless --no-equalize / --no-bias-correction say
    otherwise (the flags of `qcompile build`); the output states what was applied."""
    path, calib, data = depthwise_case
    flags = ["debug", path, "--calib-data", calib, "--data", data, "--per-tensor", "--limit", "4"]
    text = cli(*flags, "--no-bias-correction")
    assert text.code == 0, text.err
    assert "corrections applied: cross-layer equalization (4 conv pairs, high-bias absorption in 0)\n" in text.out
    off = cli(*flags, "--no-equalize", "--no-bias-correction", "--json")
    assert off.code == 0, off.err
    assert json.loads(off.out)["corrections"] == {}
