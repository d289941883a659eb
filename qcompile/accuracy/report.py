"""Before/after report of a quantized build: accuracy, size and latency on one page.

``write_report(float_lib, quant_lib, data, out_dir)`` evaluates both libraries on the same
samples (:func:`qcompile.accuracy.evaluate`), times both on this machine (TVM's time
evaluator, the same input), and writes ``report.md`` with three bar charts
(``accuracy.png``, ``size.png``, ``latency.png``, drawn by matplotlib), the per-layer table
from the quantized library's manifest (dtypes, scales; with a :class:`DebugReport`, each
layer's SQNR and cause), for a build made under ``--accuracy-budget`` the search's steps
(from the manifest's ``quantization.budget``), what stayed float and why, and the target and
versions; and ``report.json`` with every number the page shows.
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
        "budget": quant.get("budget"),
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
             (f"{r['samples']} samples of {r['data']}; target `{r['target'].get('name')}`; "
             f"qcompile {r['versions'].get('qcompile', '?')}, TVM {r['versions'].get('tvm', '?')}; "
             f"measured on {r['machine']['cpu']}."), "",
             "| | float32 | quantized | change |", "|---|---|---|---|",
             f"| top-1 % | {pct(acc['float32']['top1'])} | {pct(acc['quantized']['top1'])} | "
             + (f"{acc['quantized']['top1'] - acc['float32']['top1']:+.2f} points |"
                if acc["float32"]["top1"] is not None else "- |"),
             f"| top-5 % | {pct(acc['float32']['top5'])} | {pct(acc['quantized']['top5'])} | |",
             f"| size (bytes) | {size['float32']} | {size['quantized']} | {size['quantized'] / size['float32']:.2f}x |",
             (f"| latency (ms) | {ms['float32']:.3f} | {ms['quantized']:.3f} | "
             f"{ms['float32'] / ms['quantized']:.2f}x faster |"), ""]
    lines += [f"![{c.stem}]({c.name})" for c in charts] + [""]
    if r["agreement"]:
        lines += ["## Agreement with float32", "", "| output | SQNR dB | cosine min | max abs diff | top-1 agreement % |",
                  "|---|---|---|---|---|"]
        for name, a in r["agreement"].items():
            lines.append(f"| {name} | {a['sqnr_db']} | {a['cosine_min']} | {a['max_abs_diff']:.3g} | "
                         f"{a.get('top1_agreement', '-')} |")
        lines.append("")
    if r.get("budget"):
        lines += _budget_section(r["budget"])
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
    fallbacks = _budget_fallbacks(r.get("budget"))
    kept = [f"- `{name}`: accuracy budget ({why})" for name, why in fallbacks.items()]
    kept += [f"- `{name}`: listed in keep_float" for name in r["float_layers"] if name not in fallbacks]
    kept += [f"- {count} x `{op}`: no integer kernel for this op (runs in float32 between quantized layers)"
             for op, count in sorted(r["float_ops"].items())]
    kept += [f"- `{node}`: the model's QDQ pattern around it is not one realize turns into an integer kernel"
             for node in r["float_nodes"]]
    lines += kept or ["nothing: every conv/linear/matmul layer runs on integer kernels"]
    return "\n".join(lines) + "\n"


def _budget_section(b: dict[str, Any]) -> list[str]:
    """The accuracy-budget search of the manifest's ``quantization.budget``: the budget, the
    float / all-int8 / chosen models, each layer's measured sensitivity and cost, the steps in
    order, and what the chosen model keeps float.  Every number is the manifest's as written."""
    from qcompile.accuracy.budget import AccuracyBudget

    budget = AccuracyBudget.from_metric(b["budget"]["metric"], b["budget"]["limit"])
    unit = budget.unit()
    first = b["steps"][0]["float_layers"] if b.get("steps") else []
    lines = ["## Accuracy budget", "",
             (f"Built with `--accuracy-budget`: {budget.describe()} (metric `{b['budget']['metric']}`, limit "
              f"{b['budget']['limit']}), measured against the float build on the evaluation data of the build "
              f"(evaluated on {b.get('evaluated_on', 'local')}, timed on {b.get('timed_on', 'local')}: "
              "`local` is the machine that built it)."), "",
             f"| model | {unit} | latency (ms) |", "|---|---|---|",
             f"| float32 | {b['float']['value']} | {b['float']['latency_ms']} |",
             f"| all int8 | {b['int8']['value']} | {b['int8']['latency_ms']} |",
             f"| chosen ({b['chosen']}) | {b['value']} | {b['latency_ms']} |", ""]
    layers = {la["name"]: la for la in b.get("layers", [])}
    if layers:
        whole = any(la.get("timed") == "model" for la in layers.values())
        lines += [("Sensitivity of each layer (the model with only this layer int8, every other float) and the "
                   "cost of keeping it float ("
                   + ("the all-float model's latency - the only-this-layer-int8 model's: the float ms and int8 ms columns"
                      if whole else "its kernel's float ms - int8 ms") + "):"), "",
                  f"| layer | op | {unit} | loss | int8 ms | float ms | cost ms |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {la['name']} | {la['op']} | {la['value']} | {la['loss']} | {_or_dash(la['int8_ms'])} | "
                  f"{_or_dash(la['float_ms'])} | {la['cost_ms']} |" for la in layers.values()]
        lines.append("")
    lines += ["Steps, in order:", "",
              (f"| step | change | float layers | its {unit} alone int8 | its loss | its cost ms | {unit} after | "
               "latency (ms) | holds | why |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for k, step in enumerate(b.get("steps", [])):
        layer = step.get("added") or step.get("removed")
        change = (f"`{step['added']}` to float" if step.get("added")
                  else f"`{step['removed']}` int8 again" if step.get("removed") else "start")
        la = layers.get(layer, {})
        lines.append(f"| {k} | {change} | {', '.join(step['float_layers']) or '(none)'} | "
                     f"{_or_dash(la.get('value'))} | {_or_dash(la.get('loss'))} | {_or_dash(la.get('cost_ms'))} | "
                     f"{step['value']} | {step['latency_ms']} | {'yes' if step['holds'] else 'no'} | {step['why']} |")
    fell_back = [n for n in b["float_layers"] if n not in first]
    speedup = b["float"]["latency_ms"] / b["latency_ms"] if b["latency_ms"] else None
    lines += ["", (f"Chosen: {b['chosen']}; kept float by the budget: "
                   f"{', '.join(f'`{n}`' for n in fell_back) or 'no layer'}"
                   + (f" (also float, from keep_float: {', '.join(f'`{n}`' for n in first)})" if first else "")
                   + "."),
              (f"Latency: {b['latency_ms']} ms vs all-float {b['float']['latency_ms']} ms"
               + (f" ({speedup:.2f}x)" if speedup else "") + f"; {unit} {b['value']}."), ""]
    return lines


def _budget_fallbacks(b: dict[str, Any] | None) -> dict[str, str]:
    """{layer: why} of the layers the accuracy budget left float (not those keep_float named)."""
    if not b:
        return {}
    steps = b.get("steps", [])
    first = set(steps[0]["float_layers"]) if steps else set()
    if b["chosen"] == "float":
        return {name: "the float build was measured faster than any mix within the budget"
                for name in b["float_layers"]}
    out = {}
    for name in b["float_layers"]:
        if name not in first:
            k = next((k for k, s in enumerate(steps) if s.get("added") == name), None)
            out[name] = f"step {k}: {steps[k]['why']}" if k is not None else "chosen by the search"
    return out


def _or_dash(v) -> str:
    return "-" if v is None else str(v)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"
