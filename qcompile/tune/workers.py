"""MetaSchedule builders and runners: candidates compiled with qcompile's TIR pipeline in a
long-lived worker pool, exported for and measured on a board over RPC."""
from __future__ import annotations

import os

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

    from qcompile.runtime.rpc import connect

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
