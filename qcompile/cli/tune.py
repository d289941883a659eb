"""``qcompile tune``: MetaSchedule-tune a model's kernels; records go to tuning_logs/."""
from __future__ import annotations

from pathlib import Path

from qcompile.cli.build import add_model_options, load_model
from qcompile.cli.common import Progress, add_rpc_options, rpc_endpoint
from qcompile.target import resolve_target


def register(sub) -> None:
    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule (XGBoost cost model)")
    add_model_options(p)
    p.add_argument("--trials", type=int, default=None,
                   help="total measured candidates (default: the target preset's, else 2000)")
    p.add_argument("--max-trials-per-task", type=int, default=None, metavar="N",
                   help="cap per kernel (default: the target preset's)")
    p.add_argument("--log-dir", metavar="DIR", help="tuning records root (default: the repository's tuning_logs/)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_rpc_options(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from qcompile.tune import tune

    progress = Progress(args.quiet)
    target = resolve_target(args.target)
    endpoint = rpc_endpoint(args)
    model, _, name = load_model(args, target, progress)
    trials = args.trials or int(target.tuning.get("trials", 2000))
    per_task = args.max_trials_per_task or target.tuning.get("max_trials_per_task")
    result = tune(model, target, trials, per_task, Path(args.log_dir) if args.log_dir else None,
                  rpc=endpoint, progress=progress)
    print(f"{name}: {result.tasks} tasks, {result.trials} trials; {result.records} records in {result.database}")
    return 0
