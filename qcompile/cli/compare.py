"""``qcompile compare``: a built artifact against the framework it came from."""
from __future__ import annotations

import json

import numpy as np

from qcompile.cli.common import add_input_option, load_inputs
from qcompile.errors import MismatchError
from qcompile.frontend.reference import reference_runner, time_runner
from qcompile.runtime import CompiledModel


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare a built .so with PyTorch / ONNX Runtime on the same inputs")
    p.add_argument("library", help="built .so (its manifest must lie beside it)")
    add_input_option(p)
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="threads for the reference framework")
    p.add_argument("--atol", type=float, default=None, help="fail (exit 8) if max abs diff exceeds this")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    model = CompiledModel.load(args.library)
    inputs = load_inputs(args.inputs, model.inputs) or model.default_inputs()
    framework, reference = reference_runner(model.manifest, threads=args.threads)
    ours = model.run(inputs)
    theirs = reference(inputs)
    report = {"library": str(args.library), "reference": framework, "outputs": {}}
    for name, value in ours.items():
        ref = theirs[name]
        entry = {"max_abs_diff": float(np.max(np.abs(value.astype(np.float64) - ref))), "shape": list(value.shape)}
        if value.ndim == 2 and value.shape[1] > 1:
            entry["top1_agreement"] = float(np.mean(value.argmax(1) == ref.argmax(1)))
        report["outputs"][name] = entry
    ms_ours = model.benchmark(inputs, repeat=args.repeat, warmup=1).to_json()["median_ms"]
    ms_ref = float(np.median(time_runner(reference, inputs, args.repeat)))
    report["latency_ms"] = {"qcompile": ms_ours, "reference": round(ms_ref, 4)}
    worst = max(e["max_abs_diff"] for e in report["outputs"].values())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.library} vs {framework}")
        for name, entry in report["outputs"].items():
            extra = f", top-1 agreement {entry['top1_agreement']:.0%}" if "top1_agreement" in entry else ""
            print(f"  {name}: max abs diff {entry['max_abs_diff']:.3g}{extra}")
        print(f"  latency median: qcompile {ms_ours:.2f} ms, {framework} {ms_ref:.2f} ms")
    if args.atol is not None and worst > args.atol:
        raise MismatchError(f"max abs diff {worst:.3g} exceeds --atol {args.atol:g}")
    return 0
