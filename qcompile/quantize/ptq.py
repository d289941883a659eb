"""qcompile's own post-training quantization: annotate -> calibrate -> emit QDQ.

1. ``annotate``: find quantizable regions ``conv2d|matmul(x, W) [+ bias] [relu]`` with a
   constant weight, and the tensors to quantize: region inputs and outputs plus the
   int8-capable ops between regions (max pool, residual add, mean, reshape ...).
2. ``calibrate``: compile a variant of the float model that also returns those tensors,
   run the calibration data through it and feed range observers.
3. ``emit_qdq``: write the model in QDQ form -- ``quantize``/``dequantize`` around float
   ops, weights as int8 constants behind ``dequantize`` -- which ``realize`` turns into
   integer kernels.  The same realize pass handles QDQ from any other source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import tvm
from tvm import relax

from qcompile.errors import CalibrationError, ConfigError
from qcompile.passes.bindings import (
    Emitter,
    Graph,
    const_value,
    dtype_of,
    op_name,
    rebuild,
    shape_of,
    with_main,
)
from qcompile.quantize.config import Int8Config
from qcompile.quantize.observers import make_observer
from qcompile.quantize.op_tables import ACTIVATIONS, ANCHORS, LINEAR_OPS, SAME_SCALE_OPS


@dataclass
class Region:
    """One quantizable layer: anchor op, its constant weight/bias, fused activation."""

    name: str  # conv2d_0, matmul_1, ...
    kind: str
    anchor: object  # var bound to the conv2d/matmul
    data: object  # its activation input
    weight: np.ndarray
    bias_var: object | None = None
    bias: np.ndarray | None = None
    out: object = None  # last var of the region (after bias/activation)


@dataclass
class Plan:
    """What to quantize: regions, tensors with their own ranges, same-scale aliases."""

    regions: list[Region]
    observed: list  # vars that need calibrated ranges, in program order
    alias: dict = field(default_factory=dict)  # var -> var whose scale it shares
    kept_float: list[str] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # op name -> count of float ops left


def annotate(func, config: Int8Config) -> Plan:
    """Find the regions and tensors to quantize in ``main``."""
    graph = Graph.from_main(func)
    keep = _resolve_keep_float(graph, config.keep_float)
    counters: dict[str, int] = {}
    regions, kept = [], []
    for var, value in graph.bindings:
        kind = ANCHORS.get(op_name(value))
        if kind is None:
            continue
        weight = const_value(value.args[1])
        if weight is None or dtype_of(value.args[1]) != "float32":
            continue
        if kind == "matmul" and weight.ndim != 2:
            continue
        name = f"{kind}_{counters.get(kind, 0)}"
        counters[kind] = counters.get(kind, 0) + 1
        if name in keep or kind in keep:
            kept.append(name)
            continue
        region = Region(name, kind, var, value.args[0], weight, out=var)
        _extend_region(graph, region)
        regions.append(region)
    unknown = keep - set(kept) - set(ANCHORS.values()) - {r.name for r in regions}
    if unknown:
        raise ConfigError(f"--keep-float: no layer named {', '.join(sorted(unknown))} "
                          "(layers are conv2d_N, matmul_N; or first, last, conv2d, matmul)")

    quantized: set = set()
    observed: list = []
    alias: dict = {}

    def need(var) -> None:
        if var not in quantized:
            quantized.add(var)
            observed.append(var)

    region_of_anchor = {r.anchor: r for r in regions}
    inner = {r.bias_var for r in regions if r.bias_var is not None} | {r.anchor for r in regions}
    region_outs = {r.out for r in regions}
    pending_add: set = set()
    skipped: dict[str, int] = {}
    for var, value in graph.bindings:
        region = region_of_anchor.get(var)
        if region is not None:
            need(region.data)
        if var in region_outs:
            need(var)
            continue
        if region is not None or var in inner:
            continue
        name = op_name(value)
        tensor_args = [a for a in getattr(value, "args", []) if isinstance(a, relax.Var)]
        if isinstance(value, relax.Tuple) or name is None or not tensor_args:
            continue
        if name in SAME_SCALE_OPS and tensor_args[0] in quantized:
            quantized.add(var)
            alias[var] = alias.get(tensor_args[0], tensor_args[0])
        elif name in LINEAR_OPS and _all_inputs_quantized(graph, value, quantized):
            if name == "relax.add" and _single_relu_user(graph, var):
                pending_add.add(var)  # quantize after the relu: add+relu is one int8 op
            else:
                need(var)
        elif name in ACTIVATIONS and tensor_args[0] in pending_add:
            need(var)
        elif name not in ("relax.nn.relu",):
            skipped[name] = skipped.get(name, 0) + 1
    return Plan(regions, observed, alias, kept, skipped)


def _resolve_keep_float(graph: Graph, names: tuple[str, ...]) -> set[str]:
    """Expand the ``first`` / ``last`` policy names into layer names."""
    keep = set(names) - {"first", "last"}
    anchors, counters = [], {}
    for _, value in graph.bindings:
        kind = ANCHORS.get(op_name(value))
        if kind is not None and const_value(value.args[1]) is not None:
            anchors.append(f"{kind}_{counters.get(kind, 0)}")
            counters[kind] = counters.get(kind, 0) + 1
    if anchors and "first" in names:
        keep.add(anchors[0])
    if anchors and "last" in names:
        keep.add(anchors[-1])
    return keep


def _extend_region(graph: Graph, region: Region) -> None:
    """Absorb a per-channel constant bias add and a relu/relu6 into the region."""
    var = region.anchor
    channels = region.weight.shape[0] if region.kind == "conv2d" else region.weight.shape[1]
    users = [(v, val) for v, val in graph.bindings if any(a.same_as(var) for a in getattr(val, "args", []))]
    if graph.single_use(var) and len(users) == 1 and op_name(users[0][1]) == "relax.add":
        add_var, add = users[0]
        other = add.args[1] if add.args[0].same_as(var) else add.args[0]
        bias = const_value(other)
        if bias is not None and bias.size == channels and _bias_on_channel_axis(bias, region.kind):
            region.bias_var, region.bias, var = add_var, bias.reshape(-1).astype(np.float32), add_var
    users = [(v, val) for v, val in graph.bindings if any(a.same_as(var) for a in getattr(val, "args", []))]
    if graph.single_use(var) and len(users) == 1 and _is_relu(users[0][1]):
        var = users[0][0]
    region.out = var


def _single_relu_user(graph: Graph, var) -> bool:
    if not graph.single_use(var):
        return False
    users = [val for _, val in graph.bindings if any(a.same_as(var) for a in getattr(val, "args", []))]
    return len(users) == 1 and _is_relu(users[0])


def _bias_on_channel_axis(bias: np.ndarray, kind: str) -> bool:
    shape = bias.shape
    if kind == "conv2d":
        return len(shape) == 1 or (len(shape) == 4 and shape[0] == 1 and shape[2] == 1 and shape[3] == 1)
    return len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)


def _is_relu(value) -> bool:
    name = op_name(value)
    if name == "relax.nn.relu":
        return True
    if name == "relax.clip":  # relu6 and friends: clip(x, 0, hi)
        lo = value.args[1]
        return getattr(lo, "value", None) == 0
    return False


def _all_inputs_quantized(graph: Graph, value, quantized: set) -> bool:
    args = list(value.args)
    if op_name(value) == "relax.concat":
        tup = args[0]
        fields = tup.fields if isinstance(tup, relax.Tuple) else None
        return bool(fields) and all(f in quantized for f in fields)
    tensors = [a for a in args if isinstance(a, relax.Var)]
    return bool(tensors) and all(a in quantized for a in tensors) and all(
        const_value(a) is None for a in args if not isinstance(a, relax.Var) and hasattr(a, "ty")
    )


# ----------------------------------------------------------------------------- calibration


def calibrate(
    mod: tvm.IRModule,
    plan: Plan,
    batches: Iterable[dict[str, np.ndarray]],
    config: Int8Config,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run calibration data through the float model; return {var: (lo, hi)}."""
    from qcompile.build.pipeline import compile_module

    if not plan.observed:
        return {}
    main = rebuild(mod["main"], lambda em, v, val: None, extra_outputs=plan.observed)
    executable = compile_module(with_main(mod, main), target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    observers = [make_observer(config.calibration_method, config.percentile) for _ in plan.observed]
    n_out = len(main.ret_ty.fields) - len(plan.observed)
    params = [p.name for p in mod["main"].params]
    seen = 0
    for batch in batches:
        arrays = [batch[name] for name in params]
        for arr in arrays:
            if not np.all(np.isfinite(arr)):
                raise CalibrationError(f"calibration sample {seen} contains NaN or Inf; clean the calibration data")
        result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
        for obs, tensor in zip(observers, list(result)[n_out:]):
            obs.update(tensor.numpy())
        seen += 1
        if progress and (seen % 8 == 0):
            progress(f"calibrated {seen} samples")
        if seen >= config.num_samples:
            break
    if seen == 0:
        raise CalibrationError("calibration data is empty: give at least one sample")
    return {var: obs.range() for var, obs in zip(plan.observed, observers)}


# ----------------------------------------------------------------------------- QDQ emission


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: str


def activation_qparams(lo: float, hi: float, config: Int8Config) -> QParams:
    """Scale/zero-point covering [lo, hi] (always including 0, as ORT and PyTorch do)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if config.activation_symmetric:
        amax = max(abs(lo), abs(hi))
        scale = amax / 127.0 if amax > 0 else 1.0
        return QParams(float(np.float32(scale)), 0, "int8")
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    scale = float(np.float32(scale))
    zero_point = int(np.clip(np.round(-lo / scale), 0, 255))
    return QParams(scale, zero_point, "uint8")


def weight_qparams(weight: np.ndarray, axis: int, per_channel: bool, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-qmax, qmax]: (int8 weight, float32 scales along ``axis``)."""
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(moved).max(axis=1) if per_channel else np.full(weight.shape[axis], np.abs(weight).max())
    scale = np.where(amax > 0, amax / float(qmax), 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def emit_qdq(func, plan: Plan, ranges: dict, config: Int8Config):
    """``main`` in QDQ form, and the per-tensor parameters chosen."""
    qparams: dict = {}
    for var in plan.observed:
        lo, hi = ranges[var]
        qparams[var] = activation_qparams(lo, hi, config)
    for var, src in plan.alias.items():
        qparams[var] = qparams[src]
    regions = {r.anchor: r for r in plan.regions}
    bias_of = {r.bias_var: r for r in plan.regions if r.bias_var is not None}

    def qdq(em: Emitter, new_var, params: QParams, shared: bool = False):
        scale, zp = relax.const(params.scale, "float32"), relax.const(params.zero_point, "int32")
        q = em.emit(relax.op.quantize(new_var, scale, zp, axis=-1, out_dtype=params.dtype))
        dq = relax.op.dequantize(q, scale, zp, axis=-1, out_dtype="float32")
        return em.emit_shared(dq) if shared else em.emit(dq)

    def rewrite(em: Emitter, var, value):
        new = None
        region = regions.get(var)
        if region is not None:
            axis = 0 if region.kind == "conv2d" else 1
            wq, wscale = weight_qparams(region.weight, axis, config.per_channel, config.weight_qmax)
            region_scales[region.name] = wscale
            wdq = em.emit(relax.op.dequantize(relax.const(wq), relax.const(wscale), relax.const(np.zeros(wscale.shape, np.int32)), axis=axis, out_dtype="float32"))
            new = em.emit(relax.Call(value.op, [em.subst(value.args[0]), wdq], value.attrs, value.ty_args), var.name)
        elif var in bias_of:
            region = bias_of[var]
            sx = qparams[region.data].scale
            bscale = (sx * region_scales[region.name]).astype(np.float32)
            bq = np.round(region.bias / bscale).astype(np.int32)
            const_arg = 1 if const_value(value.args[1]) is not None else 0
            bshape = shape_of(value.args[const_arg])
            bdq = em.emit(relax.op.dequantize(relax.const(bq.reshape(bshape)), relax.const(bscale), relax.const(np.zeros(bscale.shape, np.int32)), axis=len(bshape) - 1 if region.kind == "matmul" else 1, out_dtype="float32"))
            args = [em.subst(a) for a in value.args]
            args[const_arg] = bdq
            new = em.emit(relax.Call(value.op, args, value.attrs, value.ty_args), var.name)
        if var in qparams:
            new = new if new is not None else em.emit(em.subst(value), var.name)
            return qdq(em, new, qparams[var])
        return new

    region_scales: dict[str, np.ndarray] = {}
    params_in_q = [p for p in func.params if p in qparams]

    def rewrite_with_prologue(em: Emitter, var, value):
        for p in params_in_q:
            if p not in em.vmap:  # (read by any later block)
                em.vmap[p] = qdq(em, p, qparams[p], shared=True)
        return rewrite(em, var, value)

    return rebuild(func, rewrite_with_prologue), qparams, region_scales
