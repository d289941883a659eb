"""Before/after report of a quantized build: accuracy, size and latency on one page.

``write_report(float_lib, quant_lib, data, out_dir)`` evaluates both libraries on the same
samples (:func:`qcompile.accuracy.evaluate`), times both on this machine (TVM's time
evaluator, the same input), and writes ``report.md`` with three bar charts
(``accuracy.png``, ``size.png``, ``latency.png``, drawn by matplotlib), the per-layer table
from the quantized library's manifest (dtypes, scales; with a :class:`DebugReport`, each
layer's SQNR and cause), what stayed float and why, and the target and versions; and
``report.json`` with every number the page shows.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.accuracy.evaluate import evaluate


@dataclass(frozen=True)
class Report:
    """Where the page and its data went."""

    markdown: Path
    json: Path
    charts: tuple[Path, ...]
    data: dict[str, Any]


def write_report(float_library: str | Path, quant_library: str | Path, data, out_dir: str | Path, *,
                 labels=None, debug=None, repeat: int = 20, limit: int | None = None) -> Report:
    """Write the report of ``quant_library`` against ``float_library`` into ``out_dir``.

    data/labels: as :func:`qcompile.accuracy.evaluate`; debug: a
    :class:`~qcompile.accuracy.debug.DebugReport` of the same model (optional)."""
    from qcompile.runtime import CompiledModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = evaluate(float_library, data, labels=labels, limit=limit)
    after = evaluate(quant_library, data, labels=labels, reference=float_library, limit=limit)
    models = {"float32": CompiledModel.load(float_library), "quantized": CompiledModel.load(quant_library)}
    inputs = models["float32"].default_inputs()
    latency = {}
    for _ in range(2):  # interleaved: a machine slowing down mid-run hits both alike
        for name, model in models.items():
            latency.setdefault(name, []).append(model.benchmark(inputs, repeat=repeat, warmup=3).to_json()["median_ms"])
    manifest = models["quantized"].manifest
    quant = manifest.quantization or {}
    report: dict[str, Any] = {
        "float_library": str(float_library), "quantized_library": str(quant_library), "data": after.data,
        "samples": after.n,
        "accuracy": {"float32": _accuracy(before), "quantized": _accuracy(after)},
        "agreement": after.agreement,
        "size_bytes": {"float32": Path(float_library).stat().st_size, "quantized": Path(quant_library).stat().st_size},
        "latency_ms": {name: round(min(values), 4) for name, values in latency.items()},
        "scheme": quant.get("scheme"),
        "layers": quant.get("layers", []),
        "float_layers": quant.get("float_layers", []),
        "float_ops": quant.get("float_ops", {}),
        "float_nodes": quant.get("float_nodes", []),
        "target": manifest.target,
        "versions": manifest.to_json().get("versions", {}),
        "machine": {"cpu": _cpu_name(), "python": platform.python_version()},
    }
    if debug is not None:
        report["debug"] = debug.to_json()
    charts = _charts(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_markdown(report, charts))
    return Report(out / "report.md", out / "report.json", tuple(charts), report)


def _accuracy(result) -> dict[str, float | None]:
    return {"top1": result.top1, "top5": result.top5}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _charts(report: dict, out: Path) -> list[Path]:
    """The three before/after bar charts."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    labels = ["float32", report["scheme"] or "quantized"]
    acc = report["accuracy"]
    series = [("accuracy.png", "top-1 accuracy (%)", [acc["float32"]["top1"], acc["quantized"]["top1"]]),
              ("size.png", "library size (MB)", [report["size_bytes"]["float32"] / 1e6,
                                                  report["size_bytes"]["quantized"] / 1e6]),
              ("latency.png", "latency, batch as built (ms)", [report["latency_ms"]["float32"],
                                                               report["latency_ms"]["quantized"]])]
    paths = []
    for file, title, values in series:
        if any(v is None for v in values):
            continue  # no labels: no accuracy chart (the agreement table says it)
        fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
        bars = ax.bar(labels, values, color=["#888888", "#2a7ab9"])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values])
        ax.set_title(title)
        ax.set_ylim(0, max(values) * 1.2 or 1)
        fig.tight_layout()
        fig.savefig(out / file)
        plt.close(fig)
        paths.append(out / file)
    return paths


def _markdown(r: dict, charts: list[Path]) -> str:
    acc, size, ms = r["accuracy"], r["size_bytes"], r["latency_ms"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [f"# Quantization report: {Path(r['quantized_library']).name}", "",
             f"{r['samples']} samples of {r['data']}; target `{r['target'].get('name')}`; "
             f"qcompile {r['versions'].get('qcompile', '?')}, TVM {r['versions'].get('tvm', '?')}; "
             f"measured on {r['machine']['cpu']}.", "",
             "| | float32 | quantized | change |", "|---|---|---|---|",
             f"| top-1 % | {pct(acc['float32']['top1'])} | {pct(acc['quantized']['top1'])} | "
             + (f"{acc['quantized']['top1'] - acc['float32']['top1']:+.2f} points |"
                if acc["float32"]["top1"] is not None else "- |"),
             f"| top-5 % | {pct(acc['float32']['top5'])} | {pct(acc['quantized']['top5'])} | |",
             f"| size (bytes) | {size['float32']} | {size['quantized']} | {size['quantized'] / size['float32']:.2f}x |",
             f"| latency (ms) | {ms['float32']:.3f} | {ms['quantized']:.3f} | "
             f"{ms['float32'] / ms['quantized']:.2f}x faster |", ""]
    lines += [f"![{c.stem}]({c.name})" for c in charts] + [""]
    if r["agreement"]:
        lines += ["## Agreement with float32", "", "| output | SQNR dB | cosine min | max abs diff | top-1 agreement % |",
                  "|---|---|---|---|---|"]
        for name, a in r["agreement"].items():
            lines.append(f"| {name} | {a['sqnr_db']} | {a['cosine_min']} | {a['max_abs_diff']:.3g} | "
                         f"{a.get('top1_agreement', '-')} |")
        lines.append("")
    debug = {la["name"]: la for la in r.get("debug", {}).get("layers", [])}
    lines += ["## Layers", "", "| layer | op | dtypes | input scale | weight scales | output scale | SQNR dB | cause |",
              "|---|---|---|---|---|---|---|---|"]
    for layer in r["layers"]:
        d = debug.get(layer.get("name"), {})
        wmin, wmax = layer.get("weight_scale_min"), layer.get("weight_scale_max")
        weights = "-" if wmin is None else f"{wmin:.3g}..{wmax:.3g}"
        lines.append(f"| {layer.get('name')} | {layer.get('op')} | {layer.get('dtype')} | "
                     f"{_num(layer.get('input_scale'))} | {weights} | {_num(layer.get('output_scale'))} | "
                     f"{d.get('sqnr_db', '-')} | {d.get('cause', '-')} |")
    lines += ["", "## Kept in float", ""]
    kept = [f"- `{name}`: listed in keep_float" for name in r["float_layers"]]
    kept += [f"- {count} x `{op}`: no integer kernel for this op (runs in float32 between quantized layers)"
             for op, count in sorted(r["float_ops"].items())]
    kept += [f"- `{node}`: the model's QDQ pattern around it is not one realize turns into an integer kernel"
             for node in r["float_nodes"]]
    lines += kept or ["nothing: every conv/linear/matmul layer runs on integer kernels"]
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"
