"""``qcompile explain``: why an int8 build is not faster -- where its time goes, costliest first."""
from __future__ import annotations

import json
from pathlib import Path

from qcompile.cli.common import add_input_option, load_inputs


def register(sub) -> None:
    p = sub.add_parser("explain", help="why an int8 .so is not faster: float fallbacks, slow kernels, Q/DQ, %% of peak")
    p.add_argument("library", help="built .so (int8; its manifest must lie beside it)")
    p.add_argument("--float", dest="float_library", metavar="FLOAT.so",
                   help="the float build of the same model: its latency and each layer's time beside the int8 one's")
    add_input_option(p)
    p.add_argument("--runs", type=int, default=20, help="instrumented runs per library (default: 20)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs for the latencies (default: 20)")
    p.add_argument("--no-peaks", dest="peaks", action="store_false",
                   help="do not measure this CPU's fp32/int8 peaks (about a second): no %% of peak")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    from qcompile.errors import ArtifactError
    from qcompile.manifest import load_manifest
    from qcompile.runtime.explain import explain

    for path in (args.library, args.float_library):
        if path is not None and not Path(path).is_file():
            raise ArtifactError(f"{path} does not exist")
    inputs = load_inputs(args.inputs, load_manifest(Path(args.library)).inputs) if args.inputs else None
    result = explain(args.library, args.float_library, inputs=inputs, runs=args.runs, repeat=args.repeat,
                     peaks=args.peaks)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.to_text())
    return 0
