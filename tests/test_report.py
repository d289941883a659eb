"""``qcompile report``: the before/after page of a quantized build, with its three charts.

On the digits CNN trained here: the page and report.json exist, the three PNG charts are real
images of non-trivial size, and the numbers on the page are the JSON's, which are those
``qcompile eval`` gives.
"""
from __future__ import annotations

import json

import qcompile


def test_report_page_charts_and_numbers(cli, digits, tmp_path):
    fp32, int8, data, _, _ = digits
    out = tmp_path / "report"
    result = cli("report", fp32, int8, "--data", data, "--repeat", "5", "-o", out)
    assert result.code == 0, result.err
    page = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    for chart in ("accuracy.png", "size.png", "latency.png"):
        blob = (out / chart).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000, chart
        assert f"]({chart})" in page
    acc = report["accuracy"]
    after = qcompile.evaluate(int8, data, reference=fp32)
    assert acc["quantized"]["top1"] == after.top1 and acc["float32"]["top1"] == after.reference_top1
    assert f"| top-1 % | {acc['float32']['top1']:.2f} | {acc['quantized']['top1']:.2f} |" in page
    size = report["size_bytes"]
    assert size["quantized"] == int8.stat().st_size and f"| size (bytes) | {size['float32']} | {size['quantized']} |" in page
    ms = report["latency_ms"]
    assert ms["float32"] > 0 and ms["quantized"] > 0 and f"| latency (ms) | {ms['float32']:.3f} | {ms['quantized']:.3f} |" in page
    names = [layer["name"] for layer in report["layers"]]
    assert names and all(f"| {n} |" in page for n in names)
    assert "## Kept in float" in page and report["versions"]["tvm"] in page
