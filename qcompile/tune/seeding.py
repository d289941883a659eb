"""Seeding: measure what an untuned build runs for each kernel and commit it as a record,
so MetaSchedule's search starts from it and a tuned build is never slower than an untuned one."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm

from qcompile.tune.workers import (
    build_candidate,
    check_interrupted,
    close_runner,
    pooled_builder,
    remove_artifact,
)


def seed_default_schedules(tasks, target: tvm.target.Target, database, runner=None,
                           say: Callable[[str], None] | None = None, rounds: int = 3, export=None) -> int:
    """Measure what an untuned build runs for each task -- qcompile's default schedule
    (:mod:`qcompile.build.schedules`; for qcompile's conv kernels the fastest of its register
    tiles), or TVM's default lowering for kernels no rule covers -- and commit it as a tuning
    record, so it competes with MetaSchedule's candidates: the database's best record is then
    never slower than an untuned build (MetaSchedule's first candidates for small elementwise
    kernels measured 5x slower here), and the search starts from it.

    Register tiles are measured in ``rounds`` interleaved rounds (each round in a rotated
    order) and ranked by their median: one measurement each, one tile after another, let the
    machine's drift pick a slower tile than the default.  The default tile is kept unless
    another is more than ``_TILE_MARGIN`` faster.  ``runner`` (default: a local one) and
    ``export`` (how a candidate library is linked, e.g. with a board's cross compiler) measure
    on a remote device.  Returns the number of records committed."""
    from tvm.s_tir import meta_schedule as ms

    builder = pooled_builder(build_candidate, f_export=export)
    own_runner = runner is None
    try:
        runner = runner or ms.runner.LocalRunner()
        return _seed(tasks, target, database, builder, runner, say, rounds)
    finally:
        builder.close()
        if own_runner and runner is not None:
            close_runner(runner)


def _seed(tasks, target: tvm.target.Target, database, builder, runner, say, rounds: int) -> int:
    """:func:`seed_default_schedules`' loop."""
    from tvm.s_tir import meta_schedule as ms

    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    committed = 0
    for task in tasks:
        mod = task.dispatched[0]
        if has_valid_record(database, mod):  # seeded (or tuned) by an earlier run: don't measure it again
            continue
        schedules = seed_candidates(mod, target)
        built = builder.build([ms.builder.BuilderInput(s.mod, target) for s in schedules])
        args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        candidates = [(s, ms.runner.RunnerInput(b.artifact_path, device, args_info))
                      for s, b in zip(schedules, built) if not b.error_msg]
        try:
            secs = _measure_interleaved(runner, [c[1] for c in candidates], rounds if len(candidates) > 1 else 1)
        finally:  # measured (or interrupted): the built libraries are not needed again
            for result in built:
                remove_artifact(result.artifact_path)
        timed = [(s, t) for (s, _), t in zip(candidates, secs) if t]
        if not timed:
            continue
        pick = choose_seed([t for _, t in timed], default_first=timed[0][0] is schedules[0])
        sch, run_secs = timed[pick]
        best_secs = float(np.median(run_secs))
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs, target, args_info))
        committed += 1
        if say:
            what = f"best of {len(timed)} register tiles" if len(schedules) > 1 else "default schedule"
            what = what if len(sch.trace.insts) > 1 else "default lowering"  # default_lowering's one lookup
            say(f"{what} of {str(task.task_name)[:48]}: {1e3 * best_secs:.3f} ms")
    return committed


def seed_candidates(mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """What the seeding measures for one workload: for qcompile's own conv kernels each
    register tile that fits (the default tile first), for other kernels the default
    schedule, and where no rule applies TVM's default lowering (what an untuned build runs)."""
    from qcompile.build.schedules import ConvMatmulCPU
    from qcompile.kernels import hand_kernel_tiles

    tiles = hand_kernel_tiles(mod)
    schedules = [s for s in (ConvMatmulCPU(tile).apply(mod["main"], target, False) for tile in (None,) + (tiles or ()))
                 if s is not None]
    return schedules or [default_lowering(mod["main"])]


def default_lowering(func):
    """TVM's default lowering of ``func``, as a schedule whose record builds can find.

    TVM 0.27's JSONDatabase never returns a record whose trace is empty (``get_top_k``
    and the build's query skip it): the seeded measurement of an unscheduled kernel was
    invisible, the build counted a miss and applied any slower MetaSchedule record of it
    instead.  One ``get_sblock`` -- a lookup that changes nothing -- makes the trace
    non-empty."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        sch.get_sblock("root")
    except Exception:  # noqa: BLE001 -- a function without a root block: nothing to look up
        pass
    return sch


def has_valid_record(database, mod: tvm.IRModule) -> bool:
    """Whether ``database`` holds a successful measurement of ``mod``'s workload.  A workload
    can be present with only failed runs (MetaSchedule stores them at 1e10 s; ``get_top_k``
    skips them): a build then misses it, so the seeding must measure it again."""
    if not database.has_workload(mod):
        return False
    return bool(database.get_top_k(database.commit_workload(mod), 1))


# A register tile other than the default must measure this much faster to be committed.
_TILE_MARGIN = 0.03


def choose_seed(secs: list[list[float]], default_first: bool = True) -> int:
    """Which candidate the seeding commits, from each one's measurements (one per round):
    the lowest median, except that the default (first, where ``default_first``) is kept
    unless another is more than ``_TILE_MARGIN`` faster -- within the noise of the best,
    keep what an untuned build runs."""
    medians = [float(np.median(s)) for s in secs]
    best = min(range(len(medians)), key=medians.__getitem__)
    if default_first and medians[0] <= medians[best] * (1 + _TILE_MARGIN):
        return 0
    return best


def _measure_interleaved(runner, inputs: list, rounds: int) -> list[list[float]]:
    """Mean seconds per run of each input, once per round; round r starts at input r
    (rotated) so that no candidate is always measured first or right after the same one.
    A failed measurement leaves that input's list short (empty if it never ran)."""
    secs: list[list[float]] = [[] for _ in inputs]
    for index in range(rounds):
        check_interrupted()
        order = [(index + k) % len(inputs) for k in range(len(inputs))] if inputs else []
        results = [r.result() for r in runner.run([inputs[i] for i in order])] if order else []
        for i, result in zip(order, results):
            if not result.error_msg and result.run_secs:
                secs[i].append(sum(float(t) for t in result.run_secs) / len(result.run_secs))
    return secs
