"""``qcompile bench``: latency percentiles of a built artifact."""
from __future__ import annotations

import json

from qcompile.cli.common import (
    add_input_option,
    add_rpc_options,
    load_inputs,
    rpc_endpoint,
)
from qcompile.runtime import CompiledModel


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a built .so (median/p90/p99 latency)")
    p.add_argument("library", help="built .so (its manifest must lie beside it)")
    add_input_option(p)
    add_rpc_options(p)
    p.add_argument("--repeat", type=int, default=20, help="timed runs (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    p.add_argument("--number", type=int, default=1, help="calls averaged per timed run (default: 1)")
    p.add_argument("--profile", action="store_true",
                   help="also time each kernel (local only): where the model's time goes, slowest first")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    model = CompiledModel.load(args.library, rpc=rpc_endpoint(args))
    result = model.benchmark(load_inputs(args.inputs, model.inputs), repeat=args.repeat,
                             warmup=args.warmup, number=args.number).to_json()
    result["library"] = str(args.library)
    result["target"] = model.manifest.target["name"]
    result["device"] = model.remote or "local"
    kernels = model.profile(load_inputs(args.inputs, model.inputs), runs=args.repeat) if args.profile else None
    if kernels is not None:
        result["profile"] = [k.to_json() for k in kernels]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.library} ({result['target']}) on {result['device']}: {result['repeat']} runs after {result['warmup']} warm-up")
    print("  median {median_ms:.3f} ms   mean {mean_ms:.3f} ms   p90 {p90_ms:.3f} ms   p99 {p99_ms:.3f} ms".format(**result))
    print("  min {min_ms:.3f} ms   max {max_ms:.3f} ms   std {std_ms:.3f} ms   throughput {throughput_per_s} /s".format(**result))
    if kernels is not None:
        print(f"  per kernel (instrumented, {args.repeat} runs; total {sum(k.ms for k in kernels):.3f} ms/run):")
        print(f"    {'ms/run':>9} {'share':>6} {'calls':>5}  kernel")
        for k in kernels[:20]:
            print(f"    {k.ms:9.4f} {100 * k.share:5.1f}% {k.calls:5.0f}  {k.name}")
        if len(kernels) > 20:
            rest = kernels[20:]
            print(f"    {sum(k.ms for k in rest):9.4f} {100 * sum(k.share for k in rest):5.1f}%        "
                  f"{len(rest)} more kernels")
    if model.remote:
        print("  (timed on the remote device by TVM's time evaluator; behind an emulator such as "
              "deploy/arm-emulator these numbers measure qemu, not the board)")
    return 0
