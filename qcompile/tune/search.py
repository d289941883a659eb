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
from qcompile.tune.records import (
    UnreadableDatabase,
    extract_tasks,
    open_database,
    writable_database,
)
from qcompile.tune.seeding import seed_default_schedules
from qcompile.tune.workers import (
    build_candidate,
    check_interrupted,
    close_runner,
    export_candidate,
    interruptible,
    pooled_builder,
    rpc_runner,
    scratch_tempdir,
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
            check_interrupted()  # after each batch: a Ctrl-C that landed where Python drops it
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
    if trials < 1:
        raise ConfigError(f"--trials: expected at least 1, but got {trials}")
    # Tune exactly the kernels a build looks up, where the build applies the records.
    tasks = extract_tasks(model, target)
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
    (the gradient scheduler joins none before every task had its first batch).

    Ctrl-C raises KeyboardInterrupt("N records kept in DB, re-run to resume") after the
    worker processes are stopped and the candidates' temporary folders removed."""
    if trials < 1:
        raise ConfigError(f"--trials: expected at least 1, but got {trials}")
    say = progress or (lambda _m: None)
    tvm_target = target.to_tvm()
    path = database_path or writable_database(target, root)
    say(f"{len(tasks)} tuning tasks; {trials} trials; records in {path}")
    try:
        try:
            database = open_database(path)
        except UnreadableDatabase as exc:  # appending to it would bury the damage
            raise TuningError(f"tuning records in {exc.file} are unreadable ({exc.reason}): move {path} aside "
                              "(or delete the damaged line) and re-run") from exc
        runner = rpc_runner(rpc) if rpc is not None else "local"  # an unreachable board fails here, clearly
        _detach_unnamed_metaschedule_handlers()
        # Candidates are built into temporary folders: all of them go with this one.
        with interruptible(), scratch_tempdir():
            searched = _seed_and_search(tasks, target, tvm_target, trials, max_trials_per_task, database, path,
                                        runner, rpc, say, task_scheduler)
    except KeyboardInterrupt as exc:
        # Every measurement is committed to the database as it is made: they stay, and a
        # re-run skips the kernels already seeded and continues the search from them.
        raise KeyboardInterrupt(f"{count_records(path)} records kept in {path}, re-run to resume") from exc
    return TuneResult(path, len(tasks), searched, len(database))


def count_records(path: Path) -> int:
    """Records in the database folder ``path`` (its file's lines: no parsing)."""
    try:
        with open(path / "database_tuning_record.json", "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


def _is_interrupt(exc: BaseException) -> bool:
    """A KeyboardInterrupt raised in a Python callback that MetaSchedule's C++ code wrapped."""
    return "KeyboardInterrupt" in f"{type(exc).__name__}: {exc}".splitlines()[0] or \
        isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)


def _seed_and_search(tasks: list, target: TargetSpec, tvm_target, trials: int, max_trials_per_task: int | None,
                     database, path: Path, runner, rpc, say: Callable[[str], None], task_scheduler: str) -> int:
    """Seed, then search the searchable kernels; returns the trials searched (0: none to search)."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    from qcompile.kernels import hand_kernel_tiles

    # The default schedule is the baseline every tuned kernel must beat, and for qcompile's
    # conv kernels the register tile is chosen by these measurements: on a board too, where
    # the candidates are linked here and measured there.
    export = functools.partial(export_candidate, target.cross_compiler) if rpc is not None else None
    seeded = seed_default_schedules(tasks, tvm_target, database, runner=None if rpc is None else runner, say=say,
                                    export=export)
    say(f"{seeded} kernels seeded with the default schedule's measurement" + (f" on {rpc.label}" if rpc else ""))
    # qcompile's own conv kernels (qcompile.kernels) keep their hand schedule, measured
    # by the seeding above: MetaSchedule's generic rules cannot tensorize the packed convs
    # and would spend the trials on slower, untensorized variants.
    searchable = [t for t in tasks if hand_kernel_tiles(t.dispatched[0]) is None]
    if len(searchable) < len(tasks):
        say(f"{len(tasks) - len(searchable)} conv kernels keep their hand schedule (best register tile)")
    if not searchable:
        return 0
    builder = pooled_builder(build_candidate, f_export=export)
    own_runner = isinstance(runner, str)  # "local"
    try:
        if own_runner:  # made here (not by MetaSchedule from "local") to be shut down below
            runner = ms.runner.LocalRunner()
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
        if _is_interrupt(exc):
            raise KeyboardInterrupt(str(exc)) from exc
        raise TuningError(str(exc)) from exc
    finally:
        builder.close()
        if own_runner and not isinstance(runner, str):
            close_runner(runner)
    return trials
