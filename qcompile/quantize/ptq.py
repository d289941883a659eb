"""qcompile's own post-training quantization: annotate -> calibrate -> emit QDQ.

1. ``annotate``: find quantizable regions ``conv2d|conv1d|conv2d_transpose|matmul(x, W)
   [+ bias] [relu]`` with a constant weight, and ``matmul(a, b)`` of two activations
   (attention's Q.K^T and P.V), and the tensors to quantize: region inputs and outputs plus
   the int8-capable ops between regions (max pool, residual add, mean, reshape ...).  A
   region output or int8-capable op whose result only float ops read (a linear layer
   before GELU, Q.K^T before the mask add and softmax) is not requantized: its integer
   kernel hands its accumulator on in float32, which loses nothing.
2. ``calibrate``: compile a variant of the float model that also returns those tensors,
   run the calibration data through it and feed range observers.
3. ``emit_qdq``: write the model in QDQ form -- ``quantize``/``dequantize`` around float
   ops, weights as int8 constants behind ``dequantize`` -- which ``realize`` turns into
   integer kernels.  The same realize pass handles QDQ from any other source.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from qcompile.errors import CalibrationError, ConfigError
from qcompile.passes.bindings import (
    Emitter,
    Graph,
    const_value,
    op_name,
    output_vars,
    rebuild,
    shape_of,
    with_main,
)
from qcompile.quantize.config import Int8Config
from qcompile.quantize.observers import make_observer
from qcompile.quantize.op_tables import (
    ACTIVATIONS,
    ANCHORS,
    CONV_LAYOUTS,
    LINEAR_OPS,
    SAME_SCALE_OPS,
)


@dataclass
class Region:
    """One quantizable layer: anchor op, its constant weight/bias, fused activation.

    ``weight`` is None for a matmul of two activations; ``rhs`` is then its second input."""

    name: str  # conv2d_0, matmul_1, ...
    kind: str
    anchor: object  # var bound to the conv/matmul
    data: object  # its activation input
    weight: np.ndarray | None
    bias_var: object | None = None
    bias: np.ndarray | None = None
    out: object = None  # last var of the region (after bias/activation)
    rhs: object | None = None


@dataclass
class Plan:
    """What to quantize: regions, tensors with their own ranges, same-scale aliases."""

    regions: list[Region]
    observed: list  # vars that need calibrated ranges, in program order
    alias: dict = field(default_factory=dict)  # var -> (var whose range it shares, scale factor)
    kept_float: list[str] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # op name -> count of float ops left
    integer: set = field(default_factory=set)  # vars the integer ops compute


def annotate(func, config: Int8Config) -> Plan:
    """Find the regions and tensors to quantize in ``main``."""
    graph = Graph.from_main(func)
    users = _users(graph)
    keep = _resolve_keep_float(graph, config.keep_float)
    regions, kept = [], []
    for name, kind, weight, var, value in named_anchors(graph):
        if name in keep or kind in keep:
            kept.append(name)
            continue
        region = Region(name, kind, var, value.args[0], weight, out=var,
                        rhs=value.args[1] if weight is None else None)
        if weight is not None:
            _extend_region(graph, users, region)
        regions.append(region)
    unknown = keep - set(kept) - set(ANCHORS.values()) - {r.name for r in regions}
    if unknown:
        raise ConfigError(f"--keep-float: no layer named {', '.join(sorted(unknown))} "
                          "(layers are conv2d_N, matmul_N, ...; or first, last, conv2d, matmul)")

    quantized: set = set()
    alias: dict = {}
    int8_inputs: dict = {}  # quantized var -> the quantized vars its int8 form reads
    region_of_anchor = {r.anchor: r for r in regions}
    inner = {r.bias_var for r in regions if r.bias_var is not None} | {r.anchor for r in regions}
    region_outs = {r.out for r in regions}
    roots = {r.data for r in regions} | {r.rhs for r in regions if r.rhs is not None}
    pending_add: dict = {}  # add var -> its inputs: quantized after the relu (add+relu is one int8 op)

    def need(var, inputs=()) -> None:
        quantized.add(var)
        int8_inputs[var] = list(inputs)

    for param in graph.params:
        if param in roots:
            need(param)
    for var, value in graph.bindings:
        region = region_of_anchor.get(var)
        if region is not None:
            for arg in (region.data, region.rhs):
                if arg is not None and arg not in quantized:
                    need(arg)
        if var in region_outs:
            need(var)
            continue
        if region is not None or var in inner:
            continue
        name = op_name(value)
        tensor_args = [a for a in getattr(value, "args", []) if isinstance(a, relax.Var)]
        if isinstance(value, relax.Tuple) or name is None or not tensor_args:
            continue
        scaled = _scale_factor(value) if name in ("relax.multiply", "relax.divide") else None
        if name in SAME_SCALE_OPS and tensor_args[0] in quantized:
            root, factor = alias.get(tensor_args[0], (tensor_args[0], 1.0))
            alias[var] = (root, factor)
            need(var, tensor_args[:1])
        elif scaled is not None and scaled[0] in quantized:
            if scaled[1] > 0:  # the int8 values stay, the scale follows
                root, factor = alias.get(scaled[0], (scaled[0], 1.0))
                alias[var] = (root, factor * scaled[1])
            need(var, scaled[:1])
        elif name in LINEAR_OPS and _all_inputs_quantized(graph, value, quantized):
            inputs = _quantized_inputs(value)
            if name == "relax.add" and _single_relu_user(graph, users, var):
                pending_add[var] = inputs
            else:
                need(var, inputs)
        elif name in ACTIVATIONS and tensor_args[0] in pending_add:
            need(var, pending_add[tensor_args[0]])

    # Requantize only what an integer op reads: walking back from the regions' inputs and
    # the model's outputs, a quantized op's inputs are wanted when its result is.
    wanted = roots | {v for v in output_vars(graph.output) if v in quantized}
    for var, _ in reversed(graph.bindings):
        if var in wanted:
            wanted.update(int8_inputs.get(var, ()))
    observed = [p for p in graph.params if p in wanted and p not in alias]
    observed += [v for v, _ in graph.bindings if v in wanted and v not in alias]
    alias = {v: a for v, a in alias.items() if v in wanted}
    # ops that run on integers: the regions, and the quantized ops between them (not the
    # float ops whose output a region reads, such as a LayerNorm before a linear layer)
    integer = inner | {r.out for r in regions} | {v for v in wanted if int8_inputs.get(v)}
    integer |= {v for v in pending_add if any(u in wanted for u in users.get(v, ()))}
    skipped: dict[str, int] = {}
    for var, value in graph.bindings:
        name = op_name(value)
        if name is None or var in integer or not _is_float_tensor(var):
            continue
        skipped[name] = skipped.get(name, 0) + 1
    return Plan(regions, observed, alias, kept, skipped, integer)


def named_anchors(graph: Graph) -> Iterator[tuple[str, str, np.ndarray | None, relax.Var, relax.Call]]:
    """Every quantizable layer of ``main`` in program order as (name, kind, constant weight
    or None, bound var, call): named ``<kind>_<n>``, the names ``keep_float``, the manifest
    and every pass that refers to a layer use."""
    counters: dict[str, int] = {}
    for var, value in graph.bindings:
        found = _anchor(graph, value)
        if found is None:
            continue
        kind, weight = found
        yield f"{kind}_{counters.get(kind, 0)}", kind, weight, var, value
        counters[kind] = counters.get(kind, 0) + 1


def _anchor(graph: Graph, value) -> tuple[str, np.ndarray | None] | None:
    """(kind, float32 weight) of a quantizable conv/matmul binding, else None.

    The weight may sit behind a ``permute_dims`` (how exporters write a linear layer's
    transposed weight); None for a matmul of two float32 activations of rank >= 2."""
    kind = ANCHORS.get(op_name(value))
    if kind is None:
        return None
    weight = _const_weight(graph, value.args[1])
    if weight is None:
        if kind != "matmul" or const_value(value.args[1]) is not None:
            return None
        a, b = value.args
        if not all(isinstance(x, relax.Var) and _is_float_tensor(x) and len(shape_of(x)) >= 2 for x in (a, b)):
            return None
        return kind, None
    if weight.dtype != np.float32 or not isinstance(value.args[0], relax.Var) or not _is_float_tensor(value.args[0]):
        return None
    if kind == "matmul":
        return (kind, weight) if weight.ndim == 2 else None
    data_layout, kernel_layout, _, rank = CONV_LAYOUTS[kind]
    attrs = value.attrs
    if weight.ndim != rank or str(attrs.data_layout) != data_layout or str(attrs.kernel_layout) != kernel_layout:
        return None
    if str(attrs.out_layout) not in ("", data_layout):
        return None
    if kind == "conv2d_transpose" and int(attrs.groups) != 1:
        return None  # per-channel scales along the weight's axis 1 are per group there
    return kind, weight


def _const_weight(graph: Graph, expr) -> np.ndarray | None:
    """The value of a constant, or of ``permute_dims`` of one."""
    value = const_value(expr)
    if value is not None:
        return value
    call = graph.call_of(expr, "relax.permute_dims")
    inner = const_value(call.args[0]) if call is not None else None
    if inner is None:
        return None
    axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else None
    return np.ascontiguousarray(np.transpose(inner, axes))


def _is_float_tensor(expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _users(graph: Graph) -> dict:
    """var -> the vars of the bindings that read it."""
    out: dict = {}
    for var, value in graph.bindings:
        for arg in getattr(value, "args", []):
            if isinstance(arg, relax.Var):
                out.setdefault(arg, []).append(var)
            elif isinstance(arg, relax.Tuple):
                for f in arg.fields:
                    if isinstance(f, relax.Var):
                        out.setdefault(f, []).append(var)
    return out



def _resolve_keep_float(graph: Graph, names: tuple[str, ...]) -> set[str]:
    """Expand the ``first`` / ``last`` policy names into layer names."""
    keep = set(names) - {"first", "last"}
    anchors, counters = [], {}
    for _, value in graph.bindings:
        found = _anchor(graph, value)
        if found is not None:
            kind = found[0]
            anchors.append(f"{kind}_{counters.get(kind, 0)}")
            counters[kind] = counters.get(kind, 0) + 1
    if anchors and "first" in names:
        keep.add(anchors[0])
    if anchors and "last" in names:
        keep.add(anchors[-1])
    return keep


def _extend_region(graph: Graph, users: dict, region: Region) -> None:
    """Absorb a per-channel constant bias add and a relu/relu6 into the region."""
    var = region.anchor
    channel_axis = CONV_LAYOUTS[region.kind][2] if region.kind in CONV_LAYOUTS else 1
    channels = region.weight.shape[channel_axis]
    readers = users.get(var, [])
    if graph.single_use(var) and len(readers) == 1 and op_name(graph.producer.get(readers[0])) == "relax.add":
        add_var = readers[0]
        add = graph.producer[add_var]
        other = add.args[1] if add.args[0].same_as(var) else add.args[0]
        bias = const_value(other)
        if bias is not None and bias.size == channels and _bias_on_channel_axis(bias, region.kind):
            region.bias_var, region.bias, var = add_var, bias.reshape(-1).astype(np.float32), add_var
    readers = users.get(var, [])
    if graph.single_use(var) and len(readers) == 1 and _is_relu(graph.producer.get(readers[0])):
        var = readers[0]
    region.out = var


def _single_relu_user(graph: Graph, users: dict, var) -> bool:
    readers = users.get(var, [])
    return graph.single_use(var) and len(readers) == 1 and _is_relu(graph.producer.get(readers[0]))


def _bias_on_channel_axis(bias: np.ndarray, kind: str) -> bool:
    """A bias shaped (C,) or broadcast along the layer's channel axis only."""
    shape = bias.shape
    if len(shape) == 1:
        return True
    if kind == "matmul":
        return len(shape) >= 2 and all(d == 1 for d in shape[:-1])
    rank = CONV_LAYOUTS[kind][3]
    return len(shape) == rank and all(d == 1 for i, d in enumerate(shape) if i != 1)


def _is_relu(value) -> bool:
    name = op_name(value)
    if name == "relax.nn.relu":
        return True
    if name == "relax.clip":  # relu6 and friends: clip(x, 0, hi)
        lo = value.args[1]
        return getattr(lo, "value", None) == 0
    return False


def _scale_factor(value) -> tuple[object, float] | None:
    """(x, c) for ``multiply(x, c)`` / ``multiply(c, x)`` / ``divide(x, 1/c)`` with a
    constant scalar c and the output shaped as x, else None; c <= 0 is returned too (the op
    is then requantized with its own range)."""
    a, b = value.args
    if op_name(value) == "relax.multiply" and const_value(a) is not None:
        a, b = b, a
    c = const_value(b)
    if not isinstance(a, relax.Var) or c is None or c.size != 1 or not _is_float_tensor(a):
        return None
    if shape_of(a) != shape_of(value):
        return None
    c = float(c.reshape(-1)[0])
    if not np.isfinite(c) or c == 0:
        return None
    return a, (c if op_name(value) == "relax.multiply" else 1.0 / c)


def _quantized_inputs(value) -> list:
    if op_name(value) == "relax.concat":
        return list(value.args[0].fields)
    return [a for a in value.args if isinstance(a, relax.Var)]


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


def emit_qdq(func, plan: Plan, ranges: dict, config: Int8Config, extra_outputs=None):
    """``main`` in QDQ form, the per-tensor parameters chosen, and each layer's weight scales.

    ``extra_outputs`` (vars of ``func``): also returned, as the QDQ model computes them
    (after their quantize/dequantize pair), for the per-layer debugger."""
    qparams: dict = {}
    for var in plan.observed:
        lo, hi = ranges[var]
        qparams[var] = activation_qparams(lo, hi, config)
    for var, (src, factor) in plan.alias.items():
        base = qparams[src]
        qparams[var] = base if factor == 1.0 else QParams(float(np.float32(base.scale * factor)), base.zero_point,
                                                          base.dtype)
    graph = Graph.from_main(func)
    regions = {r.anchor: r for r in plan.regions if r.weight is not None}
    # A bias whose layer is not requantized stays a float add behind the integer kernel.
    bias_of = {r.bias_var: r for r in plan.regions if r.bias_var is not None and r.out in qparams}

    def qdq(em: Emitter, new_var, params: QParams, shared: bool = False):
        scale, zp = relax.const(params.scale, "float32"), relax.const(params.zero_point, "int32")
        q = em.emit(relax.op.quantize(new_var, scale, zp, axis=-1, out_dtype=params.dtype))
        dq = relax.op.dequantize(q, scale, zp, axis=-1, out_dtype="float32")
        return em.emit_shared(dq) if shared else em.emit(dq)

    # A tensor a float op computes (a LayerNorm before a linear layer and the residual add)
    # stays float for its float readers: only the integer ops read its quantized form.
    float_of: dict = {p: p for p in func.params}
    block_of = {v: i for i, block in enumerate(graph.blocks) for v, _ in block.bindings}

    def float_arg(em: Emitter, arg, block):
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([float_arg(em, f, block) for f in arg.fields])
        src = float_of.get(arg) if isinstance(arg, relax.Var) else None
        if src is not None and (arg in func.params or block_of.get(arg) == block):
            return src
        return em.subst(arg)

    def rewrite(em: Emitter, var, value):
        if var not in plan.integer and var not in regions and isinstance(value, relax.Call) \
                and isinstance(value.op, tvm.ir.Op):
            call = relax.Call(value.op, [float_arg(em, a, block_of.get(var)) for a in value.args], value.attrs,
                              value.ty_args)
            if var not in qparams:
                return call  # (bound by rebuild: the model's output is emitted as the block's output)
            new = float_of[var] = em.emit(call, var.name)
            return qdq(em, new, qparams[var])
        new = None
        region = regions.get(var)
        if region is not None:
            axis = CONV_LAYOUTS[region.kind][2] if region.kind in CONV_LAYOUTS else 1
            wq, wscale = weight_qparams(region.weight, axis, config.per_channel, config.weight_qmax)
            region_scales[region.name] = wscale
            zeros = relax.const(np.zeros(wscale.shape, np.int32))
            wdq = em.emit(relax.op.dequantize(relax.const(wq), relax.const(wscale), zeros, axis=axis,
                                              out_dtype="float32"))
            new = em.emit(relax.Call(value.op, [em.subst(value.args[0]), wdq], value.attrs, value.ty_args), var.name)
        elif var in bias_of:
            region = bias_of[var]
            sx = qparams[region.data].scale
            bscale = (sx * region_scales[region.name]).astype(np.float32)
            bq = np.round(region.bias / bscale).astype(np.int32)
            const_arg = 1 if const_value(value.args[1]) is not None else 0
            bshape = shape_of(value.args[const_arg])
            zeros = relax.const(np.zeros(bscale.shape, np.int32))
            bdq = em.emit(relax.op.dequantize(relax.const(bq.reshape(bshape)), relax.const(bscale), zeros,
                                              axis=len(bshape) - 1 if region.kind == "matmul" else 1,
                                              out_dtype="float32"))
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

    return rebuild(func, rewrite_with_prologue, extra_outputs=extra_outputs), qparams, region_scales
