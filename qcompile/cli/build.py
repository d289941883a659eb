"""``qcompile build``: import a model and compile it into ``OUT/NAME.so`` + manifest;
with ``--accuracy-budget``, the fastest int8/float mix within the budget."""
from __future__ import annotations

from qcompile.cli.common import (
    Progress,
    add_model_options,
    add_rpc_options,
    config_errors_as_flags,
    model_options,
    rpc_endpoint,
)
from qcompile.errors import ConfigError

# qcompile.accuracy.budget.METRICS' keys (not imported at parser time: it is cheap, TVM is not)
BUDGET_METRICS = ("top1", "agreement", "cosine", "sqnr")


def register(sub) -> None:
    p = sub.add_parser("build", help="compile a model into a shared library + manifest")
    add_model_options(p)
    p.add_argument("-o", "--output", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--name", help="artifact name (default: the model's name, with -int8, -int8-dynamic or -int4 when quantized here)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pipeline phase into DIR")
    p.add_argument("--log-dir", metavar="DIR",
                   help="tuning records folder (default: $QCOMPILE_TUNING_LOGS or ~/.cache/qcompile/tuning_logs, "
                        "then the records shipped with qcompile)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    b = p.add_argument_group("accuracy budget (with --quantize int8): mixed int8/float precision")
    b.add_argument("--accuracy-budget", type=float, default=None, metavar="X",
                   help="fall back the fewest, cheapest layers to float until the model is within X of the float "
                        "build on --eval-data (X as --accuracy-metric says), chosen by measured accuracy and latency")
    b.add_argument("--accuracy-metric", choices=BUDGET_METRICS, default="top1",
                   help="what X bounds: top1, the most top-1 points lost (needs labels; default); agreement, the "
                        "least %% of samples whose top-1 class is the float build's; cosine, the least mean output "
                        "cosine; sqnr, the least output SQNR in dB (these three need no labels)")
    b.add_argument("--eval-data", metavar="PATH",
                   help="samples the budget is measured on: .npz keyed by input name (with 'labels' for top1) or an "
                        "image folder (ROOT/CLASS/*.png)")
    b.add_argument("--labels", metavar="FILE", help="labels for --eval-data (.npy or one integer per line)")
    b.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate on at most N samples")
    add_rpc_options(p)  # with --accuracy-budget: time and evaluate every candidate on that device
    p.set_defaults(handler=run)


def run(args) -> int:
    import qcompile

    if args.accuracy_budget is not None:
        return _run_budget(args)
    if args.eval_data or args.labels or args.eval_limit is not None:
        raise ConfigError("--eval-data/--labels/--eval-limit apply with --accuracy-budget")
    if args.rpc or args.rpc_tracker or args.rpc_key:
        raise ConfigError("--rpc/--rpc-tracker apply with --accuracy-budget (a build runs nothing; run or bench "
                          "the artifact over RPC with `qcompile run/bench --rpc`)")
    with config_errors_as_flags():
        artifact = qcompile.compile(
            args.model, args.target, **model_options(args), out_dir=args.output, name=args.name,
            tuning_logs=args.log_dir, dump_ir=args.dump_ir, progress=Progress(args.quiet))
    print(artifact.library)
    print(artifact.manifest_file)
    return 0


def _run_budget(args) -> int:
    from qcompile.accuracy.budget import AccuracyBudget, fit_budget
    from qcompile.api import import_model

    if args.quantize != "int8":
        raise ConfigError("--accuracy-budget applies with --quantize int8 (it mixes int8 and float layers)")
    if not args.eval_data:
        raise ConfigError("--accuracy-budget needs --eval-data PATH (.npz keyed by input name, with 'labels' for "
                          "--accuracy-metric top1, or an image folder)")
    if args.dump_ir:
        raise ConfigError("--dump-ir does not apply with --accuracy-budget (it builds many candidates)")
    budget = AccuracyBudget.from_metric(args.accuracy_metric, args.accuracy_budget)
    rpc = rpc_endpoint(args)
    progress = Progress(args.quiet)
    with config_errors_as_flags():
        options = model_options(args)
        model = import_model(args.model, options["input_shapes"], weights=options["weights"],
                             trust_pt2=options["trust_pt2"])
        result = fit_budget(model, args.target, options["calibration_data"], args.eval_data, budget,
                            options["quantization"], labels=args.labels, out_dir=args.output, name=args.name,
                            preprocess=options.get("preprocess"), limit=args.eval_limit,
                            tuning_logs=args.log_dir, rpc=rpc, progress=progress)
    print(result.to_text())
    print(result.artifact.library)
    print(result.artifact.manifest_file)
    return 0
