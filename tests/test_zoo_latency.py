"""benchmarks/zoo_latency.py's summary: ratios, geometric mean, worst model, models left out."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo_latency as zl


def _record(name: str, cls: str, median_ms: dict[str, float], errors: dict[str, str] | None = None) -> dict:
    record = {"name": name, "class": cls, "median_ms": median_ms, "errors": errors or {}}
    record["ratio"] = zl.ratios(record)
    return record


def test_summary_geomean_worst_and_left_out():
    records = [
        _record("a", "cnn", {zl.QC_FP32: 2.0, zl.ORT_FP32: 1.0, zl.QC_INT8: 1.0, zl.ORT_INT8: 2.0}),
        _record("b", "cnn", {zl.QC_FP32: 1.0, zl.ORT_FP32: 2.0, zl.QC_INT8: 1.0},
                {zl.ORT_INT8: "quant_pre_process / quantize_static: AssertionError: "}),
        _record("c-ort-qdq", "prequantized", {zl.QC_INT8: 4.0, zl.ORT_INT8: 2.0}),
    ]
    assert records[0]["ratio"] == {"fp32": 2.0, "int8": 0.5}
    fp32 = zl.summarize(records, "fp32")
    assert fp32["models"] == 2 and fp32["geomean"] == pytest.approx(1.0)
    assert (fp32["worst"], fp32["worst_model"], fp32["over_limit"]) == (2.0, "a", ["a"])
    assert fp32["left_out"] == {}  # a pre-quantized row has no float32 of its own
    int8 = zl.summarize(records, "int8")
    assert int8["models"] == 2 and int8["geomean"] == pytest.approx(math.sqrt(0.5 * 2.0))
    assert int8["worst_model"] == "c-ort-qdq" and int8["over_limit"] == ["c-ort-qdq"]
    assert list(int8["left_out"]) == ["b"] and int8["left_out"]["b"].startswith("ONNX Runtime int8 failed")
    table = zl.row(records[1])
    assert table[4:] == ["1.00", "failed", "-"]


def _args(**kw):
    import argparse

    return argparse.Namespace(**{"threads": 2, "rounds": 3, "seconds": 0.5, **kw})


def test_resume_keeps_the_earlier_records_of_the_same_cpu_and_settings(tmp_path):
    import json

    machine = {"cpu": {"model": "AMD EPYC", "family": "25", "model_number": "17", "flags": ["avx512f"]},
               "git_commit": "aaaa"}
    earlier = {"machine": machine, "threads": 2, "rounds": 3, "seconds": 0.5,
               "models": [_record("a", "cnn", {zl.QC_FP32: 2.0, zl.ORT_FP32: 1.0})]}
    path = tmp_path / "zoo_latency.json"
    assert zl.resumed_records(path, machine, _args()) == ([], [])  # nothing to resume
    path.write_text(json.dumps(earlier))
    records, runs = zl.resumed_records(path, {**machine, "git_commit": "bbbb"}, _args())
    assert [r["name"] for r in records] == ["a"] and records[0]["commit"] == "aaaa"
    assert runs == [machine]
    other_cpu = {**machine, "cpu": {**machine["cpu"], "family": "26"}}
    with pytest.raises(SystemExit, match="another CPU"):
        zl.resumed_records(path, other_cpu, _args())
    with pytest.raises(SystemExit, match="other settings"):
        zl.resumed_records(path, machine, _args(seconds=1.0))
