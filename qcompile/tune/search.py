"""The search: MetaSchedule with its XGBoost cost model over a model's fused kernels.

int8 kernels take scales, zero points and clip bounds as tensor arguments (see
quantize/realize.py), so their workloads, and the records, survive recalibration.
(``module_equality="anchor-block"`` would be the other way; TVM 0.27 fails to replay
anchor traces on resnet18's fused kernels, so it is not used.)  Tuning sees the module
exactly as the build's ``legalize`` phase produces it (fused TIR), and the build applies
records right there, so they match.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import ConfigError, TuningError
from qcompile.model import ImportedModel
from qcompile.target import TargetSpec
from qcompile.tune.records import open_database, writable_database
from qcompile.tune.seeding import seed_default_schedules
from qcompile.tune.workers import (
    build_candidate,
    export_candidate,
    pooled_builder,
    rpc_runner,
)


def _progress_callback(say: Callable[[str], None], total: int):
    """A MetaSchedule measure callback printing trials done, this task's best and the
    weighted sum of every task's best (an estimate of the whole model's latency)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.done = 0
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.done += len(runner_results)
            times = [sum(r.run_secs) / len(r.run_secs) for r in runner_results
                     if r.error_msg is None and r.run_secs]
            times = [float(t) for t in times if float(t) < 1e9]
            if times:
                self.best[task_id] = min(times + [self.best.get(task_id, float("inf"))])
            tasks = task_scheduler.tasks_
            estimate = sum(float(tasks[i].task_weight) * t for i, t in self.best.items()) * 1e3
            name = str(tasks[task_id].ctx.task_name)[:48]
            best = self.best.get(task_id)
            say(f"[{min(self.done, total)}/{total} trials] {name}: best "
                f"{'%.3f ms' % (best * 1e3) if best else 'n/a (all failed)'}; tuned kernels sum "
                f"{estimate:.2f} ms over {len(self.best)}/{len(tasks)} tasks")

    return Progress()


def _detach_unnamed_metaschedule_handlers() -> None:
    """MetaSchedule rebuilds its logging config from the names of the handlers already on
    its logger; one without a name (attached by a host application or test runner) makes
    that fail with "'NoneType' object has no attribute 'format'". Detach those."""
    import logging

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(logger.handlers):
        if handler.get_name() is None:
            logger.removeHandler(handler)


@dataclass(frozen=True)
class TuneResult:
    database: Path
    tasks: int
    trials: int
    records: int


def tune(
    model: ImportedModel,
    target: TargetSpec,
    trials: int,
    max_trials_per_task: int | None = None,
    root: Path | None = None,
    rpc=None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Tune every fused kernel of ``model`` for ``target``; records are appended to the
    database as they are measured, so an interrupted run keeps them and a re-run resumes
    from them.  ``rpc`` (a :class:`qcompile.runtime.rpc.RpcEndpoint`) measures on a remote board."""
    from tvm.s_tir import meta_schedule as ms

    from qcompile.build.pipeline import phases_through, run_phases

    if trials < 1:
        raise ConfigError(f"--trials: expected at least 1, but got {trials}")
    # Tune exactly the fused kernels the build's legalize phase produces, where the
    # records are applied (MetaSchedule extracts tasks from fused TIR functions).
    tvm_target = target.to_tvm()
    mod = run_phases(model.mod, tvm_target, phases=phases_through("legalize"))
    tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
    try:
        return tune_tasks(tasks, target, trials, max_trials_per_task, root, rpc, progress)
    except TuningError as exc:
        raise TuningError(f"tuning {model.source.name} for {target.name} failed: {exc}") from exc


def tune_tasks(
    tasks: list,
    target: TargetSpec,
    trials: int,
    max_trials_per_task: int | None = None,
    root: Path | None = None,
    rpc=None,
    progress: Callable[[str], None] | None = None,
    database_path: Path | None = None,
    task_scheduler: str = "gradient",
) -> TuneResult:
    """:func:`tune` for tasks already extracted (MetaSchedule ``ExtractedTask`` s): seed each
    with the default schedule's measurement, then search the kernels without a hand
    schedule with MetaSchedule and its XGBoost cost model.  ``database_path`` overrides
    the target's folder under ``root`` (a copy of the logs tuned on another machine);
    ``task_scheduler="round-robin"`` commits each task's records as its batch is measured
    (the gradient scheduler joins none before every task had its first batch)."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    from qcompile.kernels import hand_kernel_tiles

    if trials < 1:
        raise ConfigError(f"--trials: expected at least 1, but got {trials}")
    say = progress or (lambda _m: None)
    tvm_target = target.to_tvm()
    path = database_path or writable_database(target, root)
    say(f"{len(tasks)} tuning tasks; {trials} trials; records in {path}")
    database = open_database(path)
    runner = rpc_runner(rpc) if rpc is not None else "local"  # an unreachable board fails here, clearly
    _detach_unnamed_metaschedule_handlers()
    if rpc is None:  # the default schedule is the baseline every tuned kernel must beat
        seeded = seed_default_schedules(tasks, tvm_target, database, say=say)
        say(f"{seeded} kernels seeded with the default schedule's measurement")
    # qcompile's own conv kernels (qcompile.kernels) keep their hand schedule, measured
    # by the seeding above: MetaSchedule's generic rules cannot tensorize the packed convs
    # and would spend the trials on slower, untensorized variants.
    searchable = [t for t in tasks if hand_kernel_tiles(t.dispatched[0].script()) is None]
    if len(searchable) < len(tasks):
        say(f"{len(tasks) - len(searchable)} conv kernels keep their hand schedule (best register tile)")
    if not searchable:
        return TuneResult(path, len(tasks), 0, len(database))
    builder = pooled_builder(build_candidate, f_export=(
        functools.partial(export_candidate, target.cross_compiler) if rpc is not None else None))
    try:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=searchable, work_dir=str(path / "work"))
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(path / "work"), max_trials_global=trials,
            max_trials_per_task=max_trials_per_task, database=database,
            num_trials_per_iter=min(16, max_trials_per_task or 16), builder=builder,
            runner=runner, cost_model="xgb", task_scheduler=task_scheduler,
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [_progress_callback(say, trials)],
        )
    except Exception as exc:
        raise TuningError(str(exc)) from exc
    finally:
        builder.close()
    return TuneResult(path, len(tasks), trials, len(database))
