"""The Relax compile pipeline, assembled in one place as named phases.

1. ``inference``: fold batch-norm (and per-channel affine chains) into conv, decompose
                  training-style ops, fold constants (the graph quantization calibrates).
2. ``kernels``:   on CPUs, convs onto qcompile's NHWC kernels (``PackConv``: int8
                  dot-product, depthwise, float).
3. ``legalize``:  the target backend's own dispatch + legalize + fusion passes
                  (GPU backends add dlight schedules here).
4. ``lower``:     the backend's dataflow lowering and VM finalisation.

Code generation lowers the kernels with TVM's TIR pipeline plus two passes of ours
(:mod:`qcompile.passes.stack_tiles`: register tiles on the stack, not the workspace pool;
:mod:`qcompile.passes.balance_parallel`: parallel loops balanced over the cores at run time).

``dump_ir`` writes the module after each phase (``01-inference.py`` ...) for debugging.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import tvm
from tvm import relax

Phase = tuple[str, Callable[[tvm.target.Target], list]]


def _inference_passes(target: tvm.target.Target) -> list:
    from qcompile.passes.fold_channel_affine import FoldChannelAffine

    return [
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        FoldChannelAffine,
        relax.transform.FoldConstant(),
    ]


def _kernel_passes(target: tvm.target.Target, counts: dict | None = None) -> list:
    from qcompile.passes.pack_conv import PackConv

    return [PackConv(target, counts), relax.transform.DeadCodeElimination(["main"])]


def _legalize_passes(target: tvm.target.Target) -> list:
    return relax.pipeline.library_dispatch_passes(target) + relax.pipeline.legalize_passes(target)


def _lower_passes(target: tvm.target.Target) -> list:
    # relax.pipeline.dataflow_lower_passes() fails in TVM 0.27 (the backends do not export
    # it); these four passes are what every backend's version returns.
    dataflow_lower = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]
    return dataflow_lower + relax.pipeline.finalize_passes(target)


PHASES: list[Phase] = [
    ("inference", _inference_passes),
    ("kernels", _kernel_passes),
    ("legalize", _legalize_passes),
    ("lower", _lower_passes),
]


def phases_through(name: str) -> list[Phase]:
    """PHASES up to and including the one called ``name``."""
    names = [phase for phase, _ in PHASES]
    return PHASES[:names.index(name) + 1]


def run_phases(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    phases: list[Phase] = PHASES,
    dump_ir: Path | None = None,
) -> tvm.IRModule:
    """Apply ``phases`` in order under ``target``; optionally dump the IR after each."""
    if dump_ir is not None:
        dump_ir.mkdir(parents=True, exist_ok=True)
        (dump_ir / "00-imported.py").write_text(mod.script())
    with target:
        for index, (name, make_passes) in enumerate(phases, start=1):
            mod = tvm.transform.Sequential(make_passes(target), name=f"qcompile.{name}")(mod)
            if dump_ir is not None:
                (dump_ir / f"{index:02d}-{name}.py").write_text(mod.script())
    return mod


def with_tuning(passes: list) -> list[Phase]:
    """PHASES with ``passes`` (applying tuning records) at the end of ``legalize``:
    after fusion, where MetaSchedule extracted its tasks, so the records match."""
    if not passes:
        return PHASES
    return [(name, (lambda t, f=make: f(t) + list(passes)) if name == "legalize" else make)
            for name, make in PHASES]


def default_schedule_passes(target: tvm.target.Target) -> list:
    """Fixed schedules for CPU conv2d/matmul kernels that no tuning record covered."""
    if target.kind.name != "llvm":
        return []  # GPU targets get dlight's schedules inside the backend's legalize passes
    from tvm.s_tir import dlight as dl

    from qcompile.build.schedules import ConvMatmulCPU

    return [dl.ApplyDefaultSchedule(ConvMatmulCPU())]


def _cpu_tir_pipeline():
    """TVM's default TIR lowering followed by :mod:`qcompile.passes.stack_tiles` and
    :mod:`qcompile.passes.balance_parallel` (both skip non-CPU functions)."""
    from tvm.tirx import compilation_pipeline

    from qcompile.passes.balance_parallel import BalanceParallel
    from qcompile.passes.stack_tiles import StackTiles

    lower, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default")
    return tvm.transform.Sequential([lower, StackTiles, BalanceParallel]), finalize_host, finalize_device


def tir_pipeline() -> str:
    """The name of qcompile's TIR pipeline for ``tvm.compile(..., tir_pipeline=)``
    (registered in TVM's process-wide table on first use)."""
    from tvm.tirx import compilation_pipeline

    compilation_pipeline.register_tir_pipeline("qcompile_cpu", _cpu_tir_pipeline)
    return "qcompile_cpu"


def compile_module(mod: tvm.IRModule, target: tvm.target.Target, dump_ir: Path | None = None,
                   tuning_passes: list | None = None, kernel_counts: dict | None = None):
    """Run the pipeline and generate code: returns a ``tvm.runtime.Executable``.
    Kernels without a tuning record get :mod:`qcompile.build.schedules`' default schedule;
    ``kernel_counts`` (if given) receives how many convs each of qcompile's kernels runs."""
    from qcompile.tvm_compat import ensure

    ensure()
    passes = list(tuning_passes or []) + default_schedule_passes(target)
    phases = [(name, (lambda t: _kernel_passes(t, kernel_counts)) if name == "kernels" else make)
              for name, make in with_tuning(passes)]
    lowered = run_phases(mod, target, phases=phases, dump_ir=dump_ir)
    return tvm.compile(lowered, target, relax_pipeline=None, tir_pipeline=tir_pipeline())
