"""int8 PTQ keeps accuracy on real handwritten digits (scikit-learn's 8x8 scans).

Runs benchmarks/digits_accuracy.py's comparison (without writing its result files):
the same trained CNN and calibration samples through qcompile, ONNX Runtime
quantize_static and PyTorch PT2E.
"""
from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_int8_ptq_drop_at_most_half_a_point():
    spec = importlib.util.spec_from_file_location("digits_accuracy", REPO / "benchmarks" / "digits_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.run()
    results = report["results"]
    fp32 = results["PyTorch fp32 (reference)"]["top1"]
    assert fp32 >= 95.0, "the float model did not train"
    assert abs(results["qcompile fp32"]["top1"] - fp32) < 1e-9
    for method in ("minmax", "percentile", "mse"):  # entropy (KL) clips harder: reported, not bounded
        assert results[f"qcompile int8 ({method})"]["drop_vs_fp32"] <= 0.5, method
    # The peers ran on the same model and data (their numbers go to the README table).
    assert {"ONNX Runtime int8 (quantize_static QDQ)", "PyTorch int8 (PT2E, X86InductorQuantizer)"} <= set(results)
