"""benchmarks/zoo_latency.py's summary: ratios, geometric mean, worst model, models left out."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo_latency as zl


def _record(name: str, cls: str, ms: dict[str, float | list[float]], errors: dict[str, str] | None = None) -> dict:
    """A model's record from its ms per round (a number: one round)."""
    ms = {c: v if isinstance(v, list) else [v] for c, v in ms.items()}
    record = {"name": name, "class": cls, "ms": ms, "median_ms": {c: float(np.median(v)) for c, v in ms.items()},
              "errors": errors or {}}
    record["ratio"] = zl.ratios(record)
    return record


def test_ratio_is_the_median_of_back_to_back_ratios():
    """A round where the VM ran both contenders slower does not skew the ratio: 1.0 in every
    round, though the medians of the two columns come from different rounds (1.2 / 1.0)."""
    record = _record("a", "cnn", {zl.QC_FP32: [1.0, 1.2, 1.5], zl.ORT_FP32: [1.0, 1.2, 1.5],
                                  zl.QC_INT8: [1.0, 3.0, 3.0], zl.ORT_INT8: [2.0, 2.0, 2.0]})
    assert record["ratio"] == {"fp32": pytest.approx(1.0), "int8": pytest.approx(1.5)}


class _FakeServer:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def measure(self, path, feeds, seconds):
        self.log.append(self.name)
        return {"ms": 1.0, "waited_s": 0.0, "idle": True}


def test_rounds_run_each_pair_back_to_back_and_alternate_who_goes_first():
    log: list[str] = []
    servers = {c: _FakeServer(c, log) for c in zl.CONTENDERS}
    artifacts = {"files": dict.fromkeys(zl.CONTENDERS, "f"), "feeds": "x.npz"}
    per_round, errors, _ = zl.measure_model(artifacts, servers, 4, 0.1)
    assert not errors and all(len(v) == 4 for v in per_round.values())
    rounds = [log[i:i + 4] for i in range(0, 16, 4)]
    for order in rounds:
        for ours, theirs in zl.PAIRS.values():
            assert abs(order.index(ours) - order.index(theirs)) == 1, order
    assert {r[0] for r in rounds} == set(zl.CONTENDERS)  # every contender goes first once


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
