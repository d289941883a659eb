"""The Relax compile pipeline, assembled in one place as named phases.

1. ``inference``: bindings into dataflow blocks, fold batch-norm (and per-channel affine
                  chains) into conv, decompose training-style ops, fold constants, 1-D and
                  non-overlapping transposed convs as conv2d (the graph quantization
                  calibrates).
2. ``kernels``:   on CPUs, convs onto qcompile's NHWC kernels (``PackConv``: int8
                  dot-product, depthwise, float); the transposes the NHWC conversion
                  leaves around a quantize/dequantize cancelled
                  (:mod:`qcompile.build.compact`).
3. ``legalize``:  the target backend's own dispatch + legalize + fusion passes
                  (GPU backends add dlight schedules here).
4. ``lower``:     one-element constants every call of a kernel passes made immediates of
                  the kernel (:mod:`qcompile.build.compact`), then the backend's dataflow
                  lowering and VM finalisation.

Code generation lowers the kernels with TVM's TIR pipeline plus two passes of ours
(:mod:`qcompile.passes.stack_tiles`: register tiles on the stack, not the workspace pool;
:mod:`qcompile.passes.balance_parallel`: parallel loops balanced over the cores at run time),
without the per-argument checks of each kernel's entry function (:func:`tir_pipeline`).

``dump_ir`` writes the module after each phase (``01-inference.py`` ...) for debugging.
After ``legalize`` every operator must have become a kernel call (:func:`check_lowered`):
one TVM cannot lower for the target (or with these attributes) is reported by name there,
not as a TVMScript dump from the VM code generator.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from qcompile.errors import BuildError

Phase = tuple[str, Callable[[tvm.target.Target], list]]


def _inference_passes(target: tvm.target.Target) -> list:
    from qcompile.passes.as_conv2d import ConvAsConv2D
    from qcompile.passes.fold_channel_affine import FoldChannelAffine
    from qcompile.passes.padding_taps import DropPaddingTaps

    return [
        # bindings an importer leaves outside dataflow blocks (around an If) into dataflow
        # blocks: the layout, fusion and quantization passes work on dataflow blocks
        relax.transform.ConvertToDataflow(min_size=1),
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        ConvAsConv2D,  # conv1d and non-overlapping conv2d_transpose onto the conv2d kernels (and PTQ)
        DropPaddingTaps,  # dilated convs on small maps (DeepLab's ASPP) without the taps that read only zeros
        FoldChannelAffine,
        relax.transform.CanonicalizeBindings(),  # the alias a rewritten last op leaves (gv1 = gv)
        relax.transform.FoldConstant(),
    ]


def _kernel_passes(target: tvm.target.Target, counts: dict | None = None, notes: list[str] | None = None) -> list:
    from qcompile.build.compact import CancelTransposePairs
    from qcompile.passes.pack_conv import PackConv
    from qcompile.passes.resize_as_matmul import ResizeAsMatmul
    from qcompile.passes.sink_reshape import SinkReshapes

    # ResizeAsMatmul before PackConv: its first matmul (x @ constant) goes onto the packed kernel;
    # SinkReshapes after it: a dense layer's bias, activation and requantize join its kernel
    return [ResizeAsMatmul, PackConv(target, counts, notes), SinkReshapes,
            relax.transform.DeadCodeElimination(["main"]), CancelTransposePairs]


def _legalize_passes(target: tvm.target.Target) -> list:
    # exp, erf, tanh and softmax as TVM's fast polynomial approximations (relative error
    # ~1e-7, vectorized) rather than calls of libm's scalar functions: as ONNX Runtime's MLAS
    # kernels compute them.  With libm's scalar erf, a MiniLM encoder's GELU kernels take
    # 60% of its int8 run time (9.2 ms vs 3.9 ms per run, 2-vCPU Zen 5).  sigmoid first
    # written with exp, which FastMathTransform does not cover otherwise, and GELU/SiLU ops with
    # erf/tanh/sigmoid first; x ** 2 and x ** 3 (tanh GELU) as products rather than libm's powf.
    from qcompile.passes.fast_activations import ActivationsAsElementwise
    from qcompile.passes.fast_power import PowerAsMultiply
    from qcompile.passes.fast_sigmoid import SigmoidAsExp

    return ([ActivationsAsElementwise, SigmoidAsExp, PowerAsMultiply, relax.transform.FastMathTransform()] + relax.pipeline.library_dispatch_passes(target)
            + relax.pipeline.legalize_passes(target))


def _lower_passes(target: tvm.target.Target) -> list:
    from qcompile.build.compact import FoldScalarArguments

    # relax.pipeline.dataflow_lower_passes() fails in TVM 0.27 (the backends do not export
    # it); these four passes are what every backend's version returns.
    dataflow_lower = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]
    # FoldScalarArguments first: after legalize, where the tuning records were matched
    # (it changes the kernels they were matched by)
    return [FoldScalarArguments] + dataflow_lower + relax.pipeline.finalize_passes(target)


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
            if name == "legalize":
                check_lowered(mod, target)
    return mod


# Relax operators that stay after legalization by design: calls into kernels and packed
# functions, closures, and shape/memory/device bookkeeping that the lower phase
# (LowerRuntimeBuiltin, VMShapeLower) turns into VM instructions.
_STRUCTURAL_OPS = frozenset({
    "relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad", "relax.call_dps_packed",
    "relax.call_pure_packed", "relax.call_inplace_packed", "relax.call_builtin_with_ctx", "relax.null_value",
    "relax.shape_of", "relax.tensor_to_shape", "relax.shape_to_tensor", "relax.reshape", "relax.make_closure",
    "relax.invoke_closure", "relax.invoke_pure_closure", "relax.hint_on_device", "relax.to_vdevice",
    "relax.wrap_param", "relax.print", "relax.assert_op",
})
_STRUCTURAL_PREFIXES = ("relax.builtin.", "relax.vm.", "relax.memory.")
# Operator attributes by which the VM runs an operator itself (a packed function, a builtin).
_RUNTIME_ATTRS = ("FCallPacked", "FLowerBuiltin")


def _is_lowered_op(op: tvm.ir.Op) -> bool:
    name = str(op.name)
    if name in _STRUCTURAL_OPS or name.startswith(_STRUCTURAL_PREFIXES):
        return True
    return any(op.get_attr(attr) is not None for attr in _RUNTIME_ATTRS)


def unlowered_calls(mod: tvm.IRModule) -> list[tuple[str, relax.Call]]:
    """``(variable name, call)`` of every operator call in ``mod``'s Relax functions that
    legalization left as a high-level operator (the VM code generator cannot emit it)."""
    found: list[tuple[str, relax.Call]] = []

    @relax.expr_functor.visitor
    class Finder(relax.PyExprVisitor):
        def visit_var_binding_(self, binding) -> None:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and not _is_lowered_op(value.op):
                found.append((str(binding.var.name), value))
            self.visit_expr(value)

    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        attrs = func.attrs or {}
        if "Codegen" in attrs or "Composite" in attrs:  # offloaded to an external codegen as a whole
            continue
        Finder().visit_expr(func)
    return found


def _describe_attrs(attrs: Any) -> str:
    """``strides=[2, 2], data_layout=NHWC, ...`` for an operator's attributes (None ones left out)."""
    info = getattr(type(attrs), "__tvm_ffi_type_info__", None) if attrs is not None else None
    parts = []
    for field in (info.fields if info is not None else []):
        value = getattr(attrs, field.name, None)
        if value is None:
            continue
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):  # tuples, tvm_ffi Arrays
            value = "[" + ", ".join(str(v) for v in value) + "]"
        parts.append(f"{field.name}={value}")
    text = ", ".join(parts)
    return text if len(text) <= 300 else text[:297] + "..."


def _describe_args(call: relax.Call) -> str:
    """The tensor arguments as ``float32[1, 8, 8, 4]``."""
    shapes = []
    for arg in call.args:
        info = getattr(arg, "ty", None)
        shape = getattr(info, "shape", None)
        if isinstance(info, relax.TensorType) and isinstance(shape, relax.ShapeExpr):
            dims = [str(d.value) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in shape.values]
            shapes.append(f"{info.dtype}[{', '.join(dims)}]")
    return ", ".join(shapes)


def check_lowered(mod: tvm.IRModule, target: tvm.target.Target) -> None:
    """Raise BuildError naming the first operator legalization could not lower for ``target``
    (with its attributes and the variable it is bound to), before code generation fails on it."""
    calls = unlowered_calls(mod)
    if not calls:
        return
    var, call = calls[0]
    op = str(call.op.name)
    attrs = _describe_attrs(call.attrs)
    args = _describe_args(call)
    details = "; ".join(part for part in (f"bound to {var}", args and f"inputs {args}", attrs) if part)
    others = sorted({str(c.op.name) for _, c in calls[1:]} - {op})
    layout = "layout=" in attrs
    hint = ("TVM lowers it only in some layouts, and this one came from the model or from qcompile's layout "
            "conversion (see --dump-ir); " if layout else "")
    raise BuildError(
        f"operator {op} ({details}) has no lowering for target {target.kind.name} with these attributes "
        f"(TVM's legalization left it as is): {hint}change the model to avoid this form of the operator "
        "(another layout or operator), or build for another target"
        + (f"; also unlowered: {', '.join(others)}" if others else "")
    )


def with_tuning(passes: list) -> list[Phase]:
    """PHASES with ``passes`` (applying tuning records) at the end of ``legalize``:
    after fusion, where MetaSchedule extracted its tasks, so the records match."""
    if not passes:
        return PHASES
    return [(name, (lambda t, f=make: f(t) + list(passes)) if name == "legalize" else make)
            for name, make in PHASES]


def default_schedule_passes(target: tvm.target.Target) -> list:
    """Fixed schedules for CPU kernels that no tuning record covered: conv2d/matmul/pool
    (``ConvMatmulCPU``), kernels without a reduction (``InjectiveCPU``) and the other
    reductions: norms, softmax, sums, a tensor's range (``ReductionCPU``)."""
    if target.kind.name != "llvm":
        return []  # GPU targets get dlight's schedules inside the backend's legalize passes
    from tvm.s_tir import dlight as dl

    from qcompile.build.schedules import ConvMatmulCPU, InjectiveCPU, ReductionCPU

    return [dl.ApplyDefaultSchedule(ConvMatmulCPU(), InjectiveCPU(), ReductionCPU())]


def _cpu_tir_pipeline(argument_checks: bool = True):
    """TVM's default TIR lowering followed by :mod:`qcompile.passes.stack_tiles` and
    :mod:`qcompile.passes.balance_parallel` (both skip non-CPU functions); without
    ``argument_checks``, the argument checks of the kernels' entry functions are left out
    (see :func:`tir_pipeline`)."""
    from tvm.tirx import compilation_pipeline

    from qcompile.passes.balance_parallel import BalanceParallel
    from qcompile.passes.stack_tiles import StackTiles

    lower, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default")
    # SkipAssert after `lower` (MakePackedAPI writes the checks there), before
    # finalize_host, whose LowerTVMBuiltin adds the allocation failure checks, which stay
    checks = [] if argument_checks else [tvm.tirx.transform.SkipAssert()]
    return tvm.transform.Sequential([lower, *checks, StackTiles, BalanceParallel]), finalize_host, finalize_device


def tir_pipeline(argument_checks: bool = True) -> str:
    """The name of qcompile's TIR pipeline for ``tvm.compile(..., tir_pipeline=)``
    (registered in TVM's process-wide table on first use).

    ``argument_checks=False`` is the pipeline of a model's library: TVM's entry function of
    each kernel checks every tensor argument (type, ndim, dtype, each dim of shape and
    strides, device, data pointer: ~800 bytes of code and error strings per argument, more
    than the kernel's own code for most layers), but in a model's library the only caller is
    the VM, which checks the model's inputs at ``main``'s entry and allocates every other
    tensor from shapes it derived.  Kernels built alone (`qcompile tune`'s candidates, tests)
    keep the checks."""
    from tvm.tirx import compilation_pipeline

    if argument_checks:
        compilation_pipeline.register_tir_pipeline("qcompile_cpu", _cpu_tir_pipeline)
        return "qcompile_cpu"
    compilation_pipeline.register_tir_pipeline("qcompile_cpu_unchecked", lambda: _cpu_tir_pipeline(False))
    return "qcompile_cpu_unchecked"


def compile_module(mod: tvm.IRModule, target: tvm.target.Target, dump_ir: Path | None = None,
                   tuning_passes: list | None = None, kernel_counts: dict | None = None,
                   kernel_notes: list[str] | None = None):
    """Run the pipeline and generate code: returns a ``tvm.runtime.Executable``.
    Kernels without a tuning record get :mod:`qcompile.build.schedules`' default schedule;
    ``kernel_counts`` (if given) receives how many convs each of qcompile's kernels runs,
    ``kernel_notes`` (if given) why the kernels phase left convs to TVM."""
    from qcompile.tvm_compat import ensure

    ensure()
    passes = list(tuning_passes or []) + default_schedule_passes(target)
    phases = [(name, (lambda t: _kernel_passes(t, kernel_counts, kernel_notes)) if name == "kernels" else make)
              for name, make in with_tuning(passes)]
    lowered = run_phases(mod, target, phases=phases, dump_ir=dump_ir)
    return tvm.compile(lowered, target, relax_pipeline=None, tir_pipeline=tir_pipeline(argument_checks=False))
