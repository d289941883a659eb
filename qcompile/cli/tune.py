"""``qcompile tune``: MetaSchedule-tune a model's kernels; records go to the tuning logs folder."""
from __future__ import annotations

from qcompile.cli.common import (
    Progress,
    add_model_options,
    add_rpc_options,
    config_errors_as_flags,
    model_options,
    rpc_endpoint,
)


def register(sub) -> None:
    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule (XGBoost cost model)")
    add_model_options(p)
    p.add_argument("--trials", type=int, default=None,
                   help="total measured candidates (default: the target preset's, else 2000)")
    p.add_argument("--max-trials-per-task", type=int, default=None, metavar="N",
                   help="cap per kernel (default: the target preset's)")
    p.add_argument("--log-dir", metavar="DIR",
                   help="where records are written and resumed from (default: $QCOMPILE_TUNING_LOGS or "
                        "~/.cache/qcompile/tuning_logs; a new folder starts from the records shipped with qcompile)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_rpc_options(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    import qcompile

    with config_errors_as_flags():
        result = qcompile.tune(
            args.model, args.target, args.trials, **model_options(args), max_trials_per_task=args.max_trials_per_task,
            log_dir=args.log_dir, rpc=rpc_endpoint(args), progress=Progress(args.quiet))
    print(f"{result.tasks} tasks, {result.trials} trials; {result.records} records in {result.database}")
    return 0
