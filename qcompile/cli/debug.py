"""``qcompile debug``: per-layer int8 errors of a model, worst first, with their cause; the model
prepared as ``qcompile build`` prepares it (the same quantization flags, ``--[no-]equalize`` and
``--[no-]bias-correction`` included, declared once in :func:`add_model_options`)."""
from __future__ import annotations

import json

from qcompile.cli.common import add_model_options, config_errors_as_flags, model_options


def register(sub) -> None:
    p = sub.add_parser("debug", help="per-layer int8 quantization errors (SQNR, cosine), worst first, with the cause, "
                                          "of the model as built (equalization / bias correction as build applies them)")
    add_model_options(p)
    p.set_defaults(quantize="int8")
    p.add_argument("--data", metavar="PATH", help="samples to measure on (default: the calibration data)")
    p.add_argument("--limit", type=int, default=16, metavar="N", help="samples to measure on at most (default: 16)")
    p.add_argument("--top", type=int, default=None, metavar="N", help="show the N worst layers (default: all)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    import qcompile
    from qcompile.accuracy.debug import debug_layers
    from qcompile.errors import ConfigError

    if args.quantize != "int8":
        raise ConfigError("--quantize: qcompile debug measures static int8 (calibrated) quantization")
    if args.limit < 1:
        raise ConfigError(f"--limit: expected a positive number of samples, but got {args.limit}")
    with config_errors_as_flags():
        options = model_options(args)
        model = qcompile.import_model(args.model, options["input_shapes"], options["weights"], options["trust_pt2"])
        report = debug_layers(model, options["calibration_data"], options["quantization"], args.data,
                              target=args.target, limit=args.limit, preprocess=options.get("preprocess"))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(report.to_markdown(args.top), end="")
    for name, a in report.int8_outputs.items():
        print(f"model output {name} (int8 kernels vs float): SQNR {a['sqnr_db']:.2f} dB, cosine min "
              f"{a['cosine_min']:.5f}, max abs diff {a['max_abs_diff']:.3g}")
    return 0
