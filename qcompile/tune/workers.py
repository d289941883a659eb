"""MetaSchedule builders and runners: candidates compiled with qcompile's TIR pipeline in a
long-lived worker pool, exported for and measured on a board over RPC."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import tvm


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's ``default_build`` without ``import tvm.s_tir.tensor_intrin``.

    That import registers every backend's intrinsics (~43 s here, CUDA's alone ~28 s; any
    submodule import runs the whole package) and the builder's fresh worker pool repeats it
    for every batch of candidates.  Building a candidate needs no intrinsic registry
    unless a schedule is replayed here (tensorized candidates arrive already lowered to
    their LLVM intrinsics).  Candidates are lowered with qcompile's TIR pipeline
    (:func:`qcompile.build.pipeline.tir_pipeline`), as ``qcompile build`` lowers them: a tile
    measured without its passes (register tiles on the stack, run-time balancing) can rank
    differently.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from qcompile.build.pipeline import tir_pipeline
    from qcompile.tvm_compat import ensure

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
            check_interrupted()
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
            """Stop the worker processes (they would otherwise wait for garbage collection).
            Builds still queued are dropped first: after Ctrl-C, shutting down would
            otherwise start a worker for each and build it."""
            if self.pool is not None:
                queue = getattr(self.pool, "_threadpool", None)
                if queue is not None:
                    queue.shutdown(wait=False, cancel_futures=True)
                self.pool.shutdown()
                self.pool = None

    return PooledBuilder()


@contextlib.contextmanager
def scratch_tempdir(prefix: str = "qcompile-tune-") -> Iterator[Path]:
    """Point ``tempfile`` and ``TMPDIR`` at a fresh folder while tuning, and remove it after.

    Candidates are built into temporary folders (MetaSchedule's export, :func:`export_candidate`)
    by worker processes, which inherit ``TMPDIR``; those a run measures are removed after it,
    but an interrupted batch or a failed run leaves its own behind.  Removing the folder
    removes all of them.  Worker pools must be started inside and shut down before the end."""
    folder = tempfile.mkdtemp(prefix=prefix)
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = folder
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(folder, ignore_errors=True)


def close_runner(runner) -> None:
    """Stop a LocalRunner's worker process now: left to garbage collection, its pool may be
    collected on one of its own threads and fail to join it."""
    pool = getattr(runner, "pool", None)
    if pool is not None:
        pool.shutdown()


_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Make Ctrl-C stop tuning reliably.

    Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives; in a
    ``__del__`` or weakref callback (torch's, during garbage collection) it is printed and
    dropped, and tuning went on.  Here SIGINT also sets a flag that
    :func:`check_interrupted` (called between batches and measurements) raises again.  And a
    KeyboardInterrupt inside a MetaSchedule callback reaches the caller as one (tvm_ffi
    returns an error of an unregistered kind as a bare RuntimeError)."""
    import tvm_ffi

    tvm_ffi.error.register_error("KeyboardInterrupt", KeyboardInterrupt)
    # Only where Ctrl-C raises KeyboardInterrupt anyway: not if SIGINT is ignored or handled.
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def on_sigint(signum, frame) -> None:
        _INTERRUPTED.set()
        signal.default_int_handler(signum, frame)

    _INTERRUPTED.clear()
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _INTERRUPTED.clear()


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside :func:`interruptible`."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def remove_artifact(artifact_path: str | None) -> None:
    """Remove a built candidate and the temporary folder it was built in."""
    if artifact_path:
        shutil.rmtree(os.path.dirname(artifact_path), ignore_errors=True)


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


def upload_random_arguments(session, device, args_info, alloc_repeat: int) -> list:
    """MetaSchedule ``f_alloc_argument`` for a board: random tensors made here and copied
    over.  MetaSchedule's default fills them on the server with ``tvm.contrib.random``, which
    a board's runtime-only TVM (and the emulated board's) does not have."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)

    def tensor(_kind, dtype, shape):
        host = rng.standard_normal(shape) if dtype.startswith("float") else rng.integers(-8, 8, shape)
        arg = tvm.runtime.empty(shape=shape, dtype=dtype, device=device)
        arg.copyfrom(np.ascontiguousarray(host.astype(dtype)))
        return arg

    return [[tensor(*info) for info in args_info] for _ in range(alloc_repeat)]


def rpc_runner(endpoint, timeout_sec: float = 60.0):
    """A MetaSchedule runner that measures on the device behind ``endpoint``: an RPC server,
    or a pool of boards behind a tracker (the candidates are built here and uploaded)."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    from qcompile.runtime.rpc import connect

    connect(endpoint)  # fail now with a clear message, not after the first batch
    host, port = endpoint.address
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if endpoint.key:
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=endpoint.key,
                                     session_timeout_sec=timeout_sec)
        return ms.runner.RPCRunner(config, evaluator, f_alloc_argument=upload_random_arguments)
    # MetaSchedule's RPC runner asks a tracker for sessions; for one bare server connect directly.
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key="direct",
                                 session_timeout_sec=timeout_sec)
    return ms.runner.RPCRunner(config, evaluator, f_create_session=functools.partial(_direct_session, host, port),
                               f_alloc_argument=upload_random_arguments, max_workers=1)
