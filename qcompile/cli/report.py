"""``qcompile report``: a float and a quantized build side by side: accuracy, size, latency;
for a build made under ``--accuracy-budget``, the search's steps from its manifest."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="before/after page (Markdown + PNG charts) of a quantized build vs its float one, "
                                           "with the accuracy-budget steps when it was built with --accuracy-budget")
    p.add_argument("float_library", help="the float32 .so")
    p.add_argument("quant_library", help="the quantized .so of the same model")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="evaluation data, as for `qcompile eval` (.npz with 'labels', or an ImageFolder)")
    p.add_argument("--labels", metavar="FILE", help="labels overriding the data's")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N samples (batches) only")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per round for latency (default: 20)")
    p.add_argument("-o", "--output", default="report", metavar="DIR", help="output folder (default: report)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from qcompile.accuracy.report import write_report
    from qcompile.errors import ConfigError

    if args.repeat < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--repeat/--limit: expected positive numbers")
    report = write_report(args.float_library, args.quant_library, args.data, args.output, labels=args.labels,
                          repeat=args.repeat, limit=args.limit)
    print(report.markdown)
    return 0
