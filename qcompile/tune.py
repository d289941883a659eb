"""Tune: MetaSchedule with its XGBoost cost model; records reused at build.

Records live in MetaSchedule's JSON database format under
``tuning_logs/<target name>-<hash of the target dict>/tvm-<version>/`` so a record is only
offered to builds for the same target attributes (mcpu, mattr, cores) and TVM version;
inside a database MetaSchedule keys each record by the structural hash of its workload.
int8 kernels take scales, zero points and clip bounds as tensor arguments (see
quantize/realize.py), so their workloads, and these records, survive recalibration.
(``module_equality="anchor-block"`` would be the other way; TVM 0.27 fails to replay
anchor traces on resnet18's fused kernels, so it is not used.)
Tuning sees the module exactly as the build's ``legalize`` phase produces it (fused TIR),
and the build applies records right there, so they match; the build counts hits and
misses and warns when a database matches nothing (the silent 100x slowdown).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from .errors import ConfigError, QcompileError
from .model import ImportedModel
from .targets import TargetSpec

DEFAULT_LOG_ROOT = Path(__file__).resolve().parent.parent / "tuning_logs"


class TuningError(QcompileError):
    exit_code = 10


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's ``default_build`` without ``import tvm.s_tir.tensor_intrin``.

    That import registers every backend's intrinsics (~43 s here, CUDA's alone ~28 s; any
    submodule import runs the whole package) and the builder's fresh worker pool repeats it
    for every batch of candidates.  Building a candidate needs no intrinsic registry
    unless a schedule is replayed here (tensorized candidates arrive already lowered to
    their LLVM intrinsics).  Candidates are lowered with qcompile's TIR pipeline
    (:func:`qcompile.pipeline.tir_pipeline`), as ``qcompile build`` lowers them: a tile
    measured without its passes (register tiles on the stack, run-time balancing) can rank
    differently.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .pipeline import tir_pipeline
    from .tvm_compat import ensure

    ensure()
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target, pipeline=tir_pipeline())


def pooled_builder(f_build=None, f_export=None, timeout_sec: float = 120.0,
                   max_workers: int | None = None, restart_every: int = 32):
    """MetaSchedule's ``LocalBuilder`` whose worker processes live across batches.

    ``LocalBuilder`` starts a fresh pool of workers for every batch (against a memory
    leak in long-lived workers); each worker then imports TVM and qcompile again -- on a
    16-core machine 16 imports in parallel took ~30 s per batch of 16 small kernels, more
    than compiling them.  This pool is renewed only every ``restart_every`` batches."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder
    from tvm.s_tir.meta_schedule.utils import cpu_count
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PooledBuilder(ms.builder.PyBuilder):
        def __init__(self) -> None:
            self.pool = None
            self.batches = 0

        def build(self, build_inputs: list) -> list:
            if self.pool is None or self.batches >= restart_every:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = PopenPoolExecutor(max_workers=max_workers or cpu_count(logical=True),
                                              timeout=timeout_sec)
                self.batches = 0
            self.batches += 1
            jobs = [(f_build, f_export, b.mod, b.target, local_builder._serialize_params(b.params))
                    for b in build_inputs]
            results = []
            for done in self.pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs):
                if done.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(done.value, None))
                elif done.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(None, f"build timed out after {timeout_sec} s"))
                else:
                    results.append(ms.builder.BuilderResult(None, f"build failed:\n{done.value}"))
            return results

        def close(self) -> None:
            """Stop the worker processes (they would otherwise wait for garbage collection)."""
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None

    return PooledBuilder()


def log_root() -> Path:
    """``QCOMPILE_TUNING_LOGS`` or the repository's ``tuning_logs/``."""
    return Path(os.environ.get("QCOMPILE_TUNING_LOGS", DEFAULT_LOG_ROOT))


def database_dir(target: TargetSpec, root: Path | None = None) -> Path:
    """Where records for ``target`` and this TVM version are kept."""
    # Keyed by what the code depends on (the target dict), not by how it was named:
    # `--target native` on an AVX2 2-core machine and an identical preset share records.
    key = json.dumps({"target": target.target, "host": target.host}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    label = f"{target.kind}-{target.target.get('mcpu', 'generic')}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40]
    return (root or log_root()) / f"{safe}-{digest}" / f"tvm-{tvm.__version__}"


def open_database(path: Path):
    from tvm.s_tir import meta_schedule as ms

    # Records of tensorized kernels name qcompile's intrinsics: they must be registered
    # before the database parses its traces.
    from .kernels import int8_dot  # noqa: F401
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")


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


def export_candidate(cross_compiler: str | None, mod) -> str:
    """MetaSchedule export hook: a shared library linked here (with the target's cross
    compiler), so a board needs no compiler of its own (the default ships a .tar of objects
    that the board links)."""
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="qcompile-candidate-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler) if cross_compiler else cc.create_shared)
    return path


def _direct_session(host: str, port: int, _rpc_config):
    from tvm import rpc

    return rpc.connect(host, port)


def rpc_runner(endpoint, timeout_sec: float = 60.0):
    """A MetaSchedule runner that measures on the device behind ``endpoint``: an RPC server,
    or a pool of boards behind a tracker (the candidates are built here and uploaded)."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    from .rpc import connect

    connect(endpoint)  # fail now with a clear message, not after the first batch
    host, port = endpoint.address
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if endpoint.key:
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=endpoint.key,
                                     session_timeout_sec=timeout_sec)
        return ms.runner.RPCRunner(config, evaluator)
    # MetaSchedule's RPC runner asks a tracker for sessions; for one bare server connect directly.
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key="direct",
                                 session_timeout_sec=timeout_sec)
    return ms.runner.RPCRunner(config, evaluator, f_create_session=functools.partial(_direct_session, host, port),
                               max_workers=1)


def seed_default_schedules(tasks, target: tvm.target.Target, database, runner=None,
                           say: Callable[[str], None] | None = None, rounds: int = 3) -> int:
    """Measure what an untuned build runs for each task -- qcompile's default schedule
    (:mod:`qcompile.schedules`; for qcompile's conv kernels the fastest of its register
    tiles), or TVM's default lowering for kernels no rule covers -- and commit it as a tuning
    record, so it competes with MetaSchedule's candidates: the database's best record is then
    never slower than an untuned build (MetaSchedule's first candidates for small elementwise
    kernels measured 5x slower here), and the search starts from it.

    Register tiles are measured in ``rounds`` interleaved rounds (each round in a rotated
    order) and ranked by their median: one measurement each, one tile after another, let the
    machine's drift pick a slower tile than the default.  The default tile is kept unless
    another is more than ``_TILE_MARGIN`` faster.  Returns the number of records committed."""
    from tvm.s_tir import meta_schedule as ms

    builder = pooled_builder(build_candidate)
    try:
        return _seed(tasks, target, database, builder, runner or ms.runner.LocalRunner(), say, rounds)
    finally:
        builder.close()


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
        secs = _measure_interleaved(runner, [c[1] for c in candidates], rounds if len(candidates) > 1 else 1)
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
    from .kernels import hand_kernel_tiles
    from .schedules import ConvMatmulCPU

    tiles = hand_kernel_tiles(mod.script())
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
        order = [(index + k) % len(inputs) for k in range(len(inputs))] if inputs else []
        results = [r.result() for r in runner.run([inputs[i] for i in order])] if order else []
        for i, result in zip(order, results):
            if not result.error_msg and result.run_secs:
                secs[i].append(sum(float(t) for t in result.run_secs) / len(result.run_secs))
    return secs


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
    from them.  ``rpc`` (a :class:`qcompile.rpc.RpcEndpoint`) measures on a remote board."""
    from tvm.s_tir import meta_schedule as ms

    from .pipeline import phases_through, run_phases

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

    from .kernels import hand_kernel_tiles

    if trials < 1:
        raise ConfigError(f"--trials: expected at least 1, but got {trials}")
    say = progress or (lambda _m: None)
    tvm_target = target.to_tvm()
    path = database_path or database_dir(target, root)
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


def apply_database_passes(target: TargetSpec, root: Path | None, report: dict) -> list:
    """Passes for the end of the legalize phase: apply matching records, count hits/misses."""
    path = database_dir(target, root)
    if not (path / "database_workload.json").is_file():
        report.update({"database": None, "hits": 0, "misses": None})
        return []
    database = open_database(path)

    @tvm.transform.module_pass(opt_level=0, name="QcompileApplyTuningRecords")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from tvm import relax, tirx

        target_obj = tvm.target.Target.current()
        hits = misses = 0
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            # Workloads are keyed with global_symbol "main", as MetaSchedule extracted them.
            probe = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            found = database.query_schedule(probe, target_obj, workload_name="main")
            hits, misses = (hits + 1, misses) if found is not None else (hits, misses + 1)
        report.update({"database": str(path), "hits": hits, "misses": misses})
        with target_obj, database:
            return relax.transform.MetaScheduleApplyDatabase()(mod)

    return [apply]
