"""``qcompile report``: the before/after page of a quantized build, with its three charts.

On the digits CNN trained here: the page and report.json exist, the three PNG charts are real
images of non-trivial size, and the numbers on the page are the JSON's, which are those
``qcompile eval`` gives.  On a small model searched under an accuracy budget
(:func:`qcompile.accuracy.budget.fit_budget`): the page's "Accuracy budget" section shows the
manifest's search, number for number, and "Kept in float" gives the budget's fallbacks.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import qcompile
from qcompile.accuracy.budget import AccuracyBudget, fit_budget


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


class TwoConvNet(nn.Module):
    """A small conv, a larger conv (most of the time, int8 ~2-3x faster there), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.small, self.big, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 64, 3, padding=1), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.big(torch.relu(self.small(x)))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def budget_build(tmp_path_factory):
    """(float .so, budget .so, eval .npz): TwoConvNet with the small conv broken for per-tensor
    weights (a dead channel with weights 1000x the others'), searched for SQNR >= 25 dB with the
    head kept float by keep_float: the search falls back the small conv (conv2d_0)."""
    torch.manual_seed(0)
    net = TwoConvNet().eval()
    with torch.no_grad():
        net.small.weight[0] *= 1000.0
        net.small.bias[0] = -2.0 * float(net.small.weight[0].abs().sum()) - 10.0  # ReLU always gives 0
    work = tmp_path_factory.mktemp("budget_report")
    onnx = work / "twoconv.onnx"
    torch.onnx.export(net, (torch.zeros(4, 3, 32, 32),), str(onnx), input_names=["x"], output_names=["y"], dynamo=False)
    x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    data = work / "val.npz"
    np.savez(data, x=x)
    config = qcompile.Int8Config(weights=qcompile.PerTensor(), equalize=False, bias_correction=False, num_samples=8,
                                 keep_float=("matmul_0",))
    result = fit_budget(str(onnx), "native", {"x": x[:8]}, data, AccuracyBudget(min_sqnr_db=25.0), config,
                        out_dir=work, name="mixed", repeat=10, rounds=1, tuning_logs=False)
    fp32 = qcompile.compile(str(onnx), out_dir=work, name="fp32", tuning_logs=False)
    return fp32.library, result.artifact.library, data


def test_report_shows_the_accuracy_budget_search(cli, budget_build, tmp_path):
    fp32, mixed, data = budget_build
    out = tmp_path / "report"
    result = cli("report", fp32, mixed, "--data", data, "--repeat", "3", "-o", out)
    assert result.code == 0, result.err
    page = (out / "report.md").read_text()
    budget = json.loads(mixed.with_name("mixed.manifest.json").read_text())["quantization"]["budget"]
    assert json.loads((out / "report.json").read_text())["budget"] == budget
    assert budget["chosen"] == "mixed" and budget["float_layers"] == ["matmul_0", "conv2d_0"], budget
    section = page.split("## Accuracy budget", 1)[1].split("\n## ", 1)[0]
    assert "SQNR >= 25 dB (metric `sqnr`, limit 25.0)" in section
    assert f"| float32 | {budget['float']['value']} | {budget['float']['latency_ms']} |" in section
    assert f"| all int8 | {budget['int8']['value']} | {budget['int8']['latency_ms']} |" in section
    assert f"| chosen (mixed) | {budget['value']} | {budget['latency_ms']} |" in section
    layers = {la["name"]: la for la in budget["layers"]}
    assert set(layers) == {"conv2d_0", "conv2d_1"}  # the head is keep_float's, not searched
    for la in layers.values():
        assert (f"| {la['name']} | {la['op']} | {la['value']} | {la['loss']} | {la['int8_ms']} | {la['float_ms']} | "
                f"{la['cost_ms']} |") in section
    rows = [line for line in section.splitlines() if line[:4] in {f"| {k} " for k in range(10)}]
    assert len(rows) == len(budget["steps"]) >= 2
    for k, (row, step) in enumerate(zip(rows, budget["steps"])):
        la = layers.get(step["added"] or step["removed"])
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(k) and cells[2] == ", ".join(step["float_layers"])
        assert cells[3:6] == ([str(la["value"]), str(la["loss"]), str(la["cost_ms"])] if la else ["-"] * 3)
        assert cells[6:9] == [str(step["value"]), str(step["latency_ms"]), "yes" if step["holds"] else "no"]
        assert cells[9] == step["why"]
    assert rows[1].startswith("| 1 | `conv2d_0` to float |")
    speedup = budget["float"]["latency_ms"] / budget["latency_ms"]
    assert (f"Latency: {budget['latency_ms']} ms vs all-float {budget['float']['latency_ms']} ms "
            f"({speedup:.2f}x)") in section
    assert "kept float by the budget: `conv2d_0` (also float, from keep_float: `matmul_0`)" in section
    kept = page.split("## Kept in float", 1)[1]
    assert f"- `conv2d_0`: accuracy budget (step 1: {budget['steps'][1]['why']})" in kept
    assert "- `matmul_0`: listed in keep_float" in kept
