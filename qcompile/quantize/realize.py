"""Realize: turn QDQ regions into integer kernels.

Input is any Relax module in QDQ form (``quantize``/``dequantize`` around float ops,
weights as int8 constants behind ``dequantize``).  Matched regions become:

* ``quantize([relu](conv2d|matmul(dq(xq), dq(Wq)) [+ dq(Bq)]))`` ->
  ``conv2d|matmul(xq, Wq, out_dtype=int32) + (Bq - zx * sum(Wq))`` then requantize;
  with a non-zero input zero point the input is padded with ``zx`` explicitly.
* ``quantize(max_pool2d|reshape|...(dq(xq)))`` with the same scale -> the op on ``xq``.
* ``quantize([relu](add|concat|mean|avg_pool2d(dq(x)...)))`` -> integer inputs, rescaled
  to the output scale in float32 inside the fused kernel, integer output.

Requantize: ``y = clip(round(float32(acc) * float32(sx * sw / sy)) + zy, lo, hi)`` with
round-half-to-even (``relax.op.round``, like ``numpy.round``); a fused relu raises ``lo``
to ``zy``.  Scales, zero points and bounds are tensor constants, not literals, so kernels
and their tuning records do not change when the model is recalibrated.  Everything else is re-emitted unchanged: unmatched ops stay float, their
boundaries are the remaining ``dequantize``/``quantize`` calls, whose scalar scales and zero
points become one-element tensors for the same reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

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
from qcompile.quantize.op_tables import ANCHORS, LINEAR_OPS, SAME_SCALE_OPS

_QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


@dataclass
class RealizeReport:
    """Which layers became integer and with which parameters (for the manifest)."""

    layers: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _Q:
    """A quantized tensor: its integer var (new module) and scale/zero point."""

    var: object
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


def realize(mod: tvm.IRModule) -> tuple[tvm.IRModule, RealizeReport]:
    """Rewrite QDQ regions of ``main`` into integer ops; returns the module and a report."""
    func = mod["main"]
    graph = Graph.from_main(func)
    report = RealizeReport()
    counters: dict[str, int] = {}
    dq_source, weight_of = _dequantize_readers(graph)

    def rewrite(em: Emitter, var, value):
        if op_name(value) != "relax.quantize":
            return None
        sy, zy = const_value(value.args[1]), const_value(value.args[2])
        if sy is None or zy is None or sy.size != 1:
            return None
        out = _OutQ(float(sy.reshape(-1)[0]), int(zy.reshape(-1)[0]), str(value.attrs.out_dtype))
        for matcher in (_match_layer, _match_same_scale, _match_linear):
            new = matcher(em, graph, value.args[0], out, dq_source, weight_of, report, counters)
            if new is not None:
                return new
        return None

    main = rebuild(func, rewrite)
    new_mod = relax.transform.DeadCodeElimination(["main"])(with_main(mod, main))
    return _qparams_as_tensors(_realize_float_outputs(new_mod, report, counters)), report


@relax.expr_functor.mutator
class _QParamsAsTensors(relax.PyExprMutator):
    """Scalar scales/zero points of the remaining quantize/dequantize calls -> shape-(1,)
    tensors (see :func:`_qparams_as_tensors`)."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) not in ("relax.quantize", "relax.dequantize"):
            return call
        args = [call.args[0]] + [_one_element(a) for a in call.args[1:]]
        return relax.Call(call.op, args, call.attrs, call.ty_args)


def _one_element(expr):
    value = const_value(expr)
    return relax.const(value.reshape(1)) if value is not None and value.ndim == 0 else expr


def _qparams_as_tensors(mod: tvm.IRModule) -> tvm.IRModule:
    """The model's boundary quantize/dequantize calls (its input's quantize, the output's
    dequantize) with their scale and zero point as shape-(1,) tensors: legalization makes
    scalar constants literals in the fused kernel (a new kernel, and a missed tuning record,
    for every calibration) but reads a one-element tensor as a kernel argument; the
    formula is the same."""
    return with_main(mod, _QParamsAsTensors().visit_expr(mod["main"]))


def _dequantize_readers(graph: Graph):
    """Two readers of ``dequantize`` calls in ``graph``:

    ``dq_source(em, expr)``: for ``dequantize(xq, s, z)`` of a tensor, its integer side in the
    module being emitted, with constant scale/zero point (else None);
    ``weight_of(expr)``: for ``dequantize`` of a constant, (q, scale, zero point, axis).
    """

    def dq_source(em: Emitter, expr) -> _Q | None:
        call = graph.call_of(expr, "relax.dequantize")
        if call is None:
            return None
        scale, zp = const_value(call.args[1]), const_value(call.args[2])
        if scale is None or zp is None:
            return None
        return _Q(em.subst(call.args[0]), scale, zp, int(call.attrs.axis))

    def weight_of(expr) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
        call = graph.call_of(expr, "relax.dequantize")
        if call is None:
            return None
        values = [const_value(a) for a in call.args]
        if any(v is None for v in values):
            return None
        return values[0], values[1], values[2], int(call.attrs.axis)

    return dq_source, weight_of


@dataclass(frozen=True)
class _OutQ:
    scale: float
    zero_point: int
    dtype: str


def _activation(graph: Graph, expr):
    """Peel relu / clip(0, hi) off ``expr``: (inner expr, lo, hi in float units or None)."""
    call = graph.producer.get(expr) if isinstance(expr, relax.Var) else None
    name = op_name(call) if call is not None else None
    if name == "relax.nn.relu":
        return call.args[0], 0.0, None
    if name == "relax.clip":
        lo, hi = getattr(call.args[1], "value", None), getattr(call.args[2], "value", None)
        if lo == 0:
            return call.args[0], 0.0, float(hi) if hi is not None else None
    return expr, None, None


def _param(value, like) -> relax.Constant:
    """A calibration-dependent float32 value as a tensor broadcastable to ``like``.

    Scalars would become literals inside the fused kernels, so every recalibration would
    make new kernels (and miss every tuning record); tensor constants become kernel
    arguments and leave the kernel's code, and its MetaSchedule workload, unchanged."""
    value = np.asarray(value, np.float32)
    if value.size == 1:
        value = value.reshape((1,) * max(1, len(shape_of(like))))
    return relax.const(value)


def _requantize(em: Emitter, acc, multiplier: np.ndarray, out: _OutQ, lo: float | None, hi: float | None):
    """int32/float ``acc`` * multiplier -> round -> clip -> + zy -> out dtype.

    Clipped before adding zy (``clip(r, qmin - zy, qmax - zy) + zy`` equals
    ``clip(r + zy, qmin, qmax)``) so that the bounds, like zy, are tensors; a fused
    relu/relu6 narrows them."""
    qmin, qmax = _QRANGE[out.dtype]
    lower, upper = qmin - out.zero_point, qmax - out.zero_point
    if lo is not None:
        lower = max(lower, int(np.round(lo / out.scale)))
    if hi is not None:
        upper = min(upper, int(np.round(hi / out.scale)))
    y = acc if dtype_of(acc) == "float32" else em.emit(relax.op.astype(acc, "float32"))
    y = em.emit(relax.op.multiply(y, _param(multiplier, y)))
    y = em.emit(relax.op.round(y))
    y = em.emit(relax.op.maximum(y, _param(lower, y)))
    y = em.emit(relax.op.minimum(y, _param(upper, y)))
    # Added even when zero: the kernel's structure must not depend on calibration.
    y = em.emit(relax.op.add(y, _param(out.zero_point, y)))
    return em.emit(relax.op.astype(y, out.dtype))


def _match_layer(em, graph, expr, out, dq_source, weight_of, report, counters):
    inner, lo, hi = _activation(graph, expr)
    bias = float_bias = None
    add = graph.call_of(inner, "relax.add")
    anchor_expr = inner
    if add is not None:
        for i in (0, 1):
            producer = graph.producer.get(add.args[i]) if isinstance(add.args[i], relax.Var) else None
            if producer is None or op_name(producer) not in ANCHORS:
                continue
            other = add.args[1 - i]
            bias, float_bias = weight_of(other), const_value(other)  # int32 behind dq, or float (PT2E)
            if bias is not None or (float_bias is not None and float_bias.dtype == np.float32):
                anchor_expr = add.args[i]
                break
        else:
            return None
    anchor = graph.producer.get(anchor_expr) if isinstance(anchor_expr, relax.Var) else None
    acc = _int_anchor(em, anchor, dq_source, weight_of)
    if acc is None:
        return None
    sx, zx, wscale, channels, bshape, conv = acc.sx, acc.zx, acc.wscale, acc.channels, acc.bshape, acc.conv
    bias_int = np.zeros(channels, np.int64)
    if float_bias is not None and bias is None:  # quantize a float bias at sx * sw, as fbgemm does
        if float_bias.size != channels:
            return None
        bias_int = np.round(float_bias.reshape(-1) / (np.float32(sx) * wscale)).astype(np.int64)
    if bias is not None:
        bq, bscale, _bzp, _ = bias
        bias_int = bq.astype(np.int64).reshape(-1)
        if bias_int.size != channels:
            return None
        expected = (sx * wscale).astype(np.float32)
        if not np.allclose(bscale.reshape(-1), expected, rtol=1e-5):
            return None  # bias scale must be sx * sw to add in the int32 domain
    total = _add_int_constant(em, acc.var, bias_int - zx * acc.wsum, bshape)
    multiplier = (np.float32(sx) * wscale / np.float32(out.scale)).astype(np.float32).reshape(bshape)
    result = _requantize(em, total, multiplier, out, lo, hi)
    name = "conv2d" if conv else "matmul"
    index = counters.get(name, 0)
    counters[name] = index + 1
    report.layers.append({
        "name": f"{name}_{index}", "op": name, "dtype": f"{acc.x_dtype} x int8 -> int32 -> {out.dtype}",
        "input_scale": sx, "input_zero_point": zx, "output_scale": out.scale, "output_zero_point": out.zero_point,
        "weight_scale_min": float(wscale.min()), "weight_scale_max": float(wscale.max()),
        "fused_relu": lo is not None,
    })
    return result


@dataclass(frozen=True)
class _Acc:
    """An integer conv2d/matmul: its int32 accumulator and what requantizing it needs."""

    var: object
    sx: float
    zx: int
    wscale: np.ndarray  # (channels,)
    wsum: np.ndarray  # per output channel sum of the int8 weight (zero-point correction)
    channels: int
    bshape: tuple
    conv: bool
    x_dtype: str


def _int_anchor(em, anchor, dq_source, weight_of) -> _Acc | None:
    """``conv2d|matmul(dq(xq), dq(Wq))`` as an int32-accumulating op on ``xq`` and ``Wq``."""
    kind = op_name(anchor) if anchor is not None else None
    if kind not in ANCHORS:
        return None
    x = dq_source(em, anchor.args[0])
    w = weight_of(anchor.args[1])
    if x is None or w is None or x.scale.size != 1 or x.zero_point.size != 1:
        return None
    wq, wscale, wzp, waxis = w
    if wq.dtype != np.int8 or np.any(wzp != 0):
        return None
    conv = kind == "relax.nn.conv2d"
    channel_axis = 0 if conv else 1
    if wq.ndim != (4 if conv else 2):
        return None
    if wscale.size not in (1, wq.shape[channel_axis]) or (wscale.size > 1 and waxis % wq.ndim != channel_axis):
        return None
    channels = wq.shape[channel_axis]
    sx, zx = float(x.scale.reshape(-1)[0]), int(x.zero_point.reshape(-1)[0])
    wscale = np.broadcast_to(wscale.reshape(-1).astype(np.float32), (channels,))
    data = x.var
    if conv:
        attrs = anchor.attrs
        if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
            return None
        padding = [int(p) for p in attrs.padding]
        if zx != 0 and any(padding):  # padded zeros must be the zero point, not 0
            top, left, bottom, right = padding
            data = em.emit(relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zx)))
            padding = [0, 0, 0, 0]
        acc = em.emit(relax.op.nn.conv2d(data, relax.const(wq), strides=attrs.strides, padding=padding,
                                         dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32"))
        wsum = wq.astype(np.int64).reshape(channels, -1).sum(axis=1)
        bshape = (1, channels, 1, 1)
    else:
        acc = em.emit(relax.op.matmul(data, relax.const(wq), out_dtype="int32"))
        wsum = wq.astype(np.int64).sum(axis=0)
        bshape = (channels,)
    return _Acc(acc, sx, zx, wscale, wsum, channels, bshape, conv, dtype_of(x.var))


def _add_int_constant(em, acc, value: np.ndarray, bshape: tuple):
    if not np.any(value):
        return acc
    return em.emit(relax.op.add(acc, relax.const(value.astype(np.int32).reshape(bshape))))


def _realize_float_outputs(mod: tvm.IRModule, report: RealizeReport, counters: dict) -> tvm.IRModule:
    """Second stage: conv2d/matmul on dequantized int8 whose output is not re-quantized
    (PT2E leaves e.g. conv -> residual add in float) still run as integer kernels, with
    the int32 accumulator scaled back to float32 in the same fused kernel."""
    graph = Graph.from_main(mod["main"])
    dq_source, weight_of = _dequantize_readers(graph)

    def rewrite(em, var, value):
        acc = _int_anchor(em, value, dq_source, weight_of) if op_name(value) in ANCHORS else None
        if acc is None:
            return None
        total = _add_int_constant(em, acc.var, -acc.zx * acc.wsum, acc.bshape)
        scale = (np.float32(acc.sx) * acc.wscale).astype(np.float32).reshape(acc.bshape)
        result = em.emit(relax.op.multiply(em.emit(relax.op.astype(total, "float32")), relax.const(scale)))
        name = "conv2d" if acc.conv else "matmul"
        index = counters.get(name, 0)
        counters[name] = index + 1
        report.layers.append({"name": f"{name}_{index}", "op": name,
                              "dtype": f"{acc.x_dtype} x int8 -> int32 -> float32",
                              "input_scale": acc.sx, "input_zero_point": acc.zx,
                              "weight_scale_min": float(acc.wscale.min()), "weight_scale_max": float(acc.wscale.max())})
        return result

    return relax.transform.DeadCodeElimination(["main"])(with_main(mod, rebuild(mod["main"], rewrite)))


def _match_same_scale(em, graph, expr, out, dq_source, weight_of, report, counters):
    call = graph.producer.get(expr) if isinstance(expr, relax.Var) else None
    if call is None or op_name(call) not in SAME_SCALE_OPS:
        return None
    x = dq_source(em, call.args[0])
    if x is None or x.scale.size != 1 or not np.isclose(float(x.scale.reshape(-1)[0]), out.scale, rtol=1e-6):
        return None
    if int(x.zero_point.reshape(-1)[0]) != out.zero_point or dtype_of(x.var) != out.dtype:
        return None
    kind = op_name(call).split(".")[-1]
    if kind == "max_pool2d":  # reshapes and the like are not layers worth listing
        index = counters.get(kind, 0)
        counters[kind] = index + 1
        report.layers.append({"name": f"{kind}_{index}", "op": kind, "dtype": f"{out.dtype} -> {out.dtype}",
                              "output_scale": out.scale, "output_zero_point": out.zero_point})
    return em.emit(relax.Call(call.op, [x.var] + [em.subst(a) for a in call.args[1:]], call.attrs, call.ty_args))


def _dequant_float(em, q: _Q):
    """(x - zx) * sx in float32, to be fused into the consumer's kernel."""
    y = em.emit(relax.op.astype(q.var, "float32"))
    zx = int(q.zero_point.reshape(-1)[0])
    return em.emit(relax.op.subtract(y, _param(zx, y)))  # even when zero, as in _requantize




def _match_linear(em, graph, expr, out, dq_source, weight_of, report, counters):
    inner, lo, hi = _activation(graph, expr)
    call = graph.producer.get(inner) if isinstance(inner, relax.Var) else None
    name = op_name(call) if call is not None else None
    if name not in LINEAR_OPS:
        return None
    if name == "relax.concat":
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
        sources = [dq_source(em, f) for f in fields] if fields else [None]
    else:
        sources = [dq_source(em, a) for a in call.args]
        if name != "relax.add":
            sources = sources[:1]
    if any(q is None or q.scale.size != 1 for q in sources):
        return None
    scaled = []
    for q in sources:
        ratio = np.float32(np.float32(q.scale.reshape(-1)[0]) / np.float32(out.scale))
        dq = _dequant_float(em, q)
        scaled.append(em.emit(relax.op.multiply(dq, _param(ratio, dq))))
    if name == "relax.concat":
        total = em.emit(relax.Call(call.op, [relax.Tuple(scaled)], call.attrs, call.ty_args))
    elif name == "relax.add":
        total = em.emit(relax.op.add(scaled[0], scaled[1]))
    else:
        total = em.emit(relax.Call(call.op, [scaled[0]] + [em.subst(a) for a in call.args[1:]], call.attrs, call.ty_args))
    kind = name.split(".")[-1]
    index = counters.get(kind, 0)
    counters[kind] = index + 1
    report.layers.append({"name": f"{kind}_{index}", "op": kind,
                          "dtype": f"{'/'.join(sorted({dtype_of(q.var) for q in sources}))} -> {out.dtype} (float32 inside)",
                          "output_scale": out.scale, "output_zero_point": out.zero_point, "fused_relu": lo is not None})
    return _requantize(em, total, np.array(1.0, np.float32), out, lo, hi)
