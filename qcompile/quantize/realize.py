"""Realize: turn QDQ regions into integer kernels.

Input is any Relax module in QDQ form (``quantize``/``dequantize`` around float ops,
weights as int8 constants behind ``dequantize``).  Matched regions become:

* ``quantize([relu](conv(dq(xq), dq(Wq)) [+ dq(Bq)]))`` for conv2d, conv1d,
  conv2d_transpose and matmul -> the op on ``xq`` and ``Wq`` with ``out_dtype=int32`` +
  ``(Bq - zx * sum(Wq))``, then requantize.  With a non-zero input zero point a padded conv
  pads with ``zx`` explicitly; a transposed conv subtracts ``zx * conv2d_transpose(1, Wq)``
  (a constant: which taps reach an output depends on its position).  A matmul on 3-D or
  wider activations runs as one 2-D ``[B*S, K] x [K, N]`` product, the shape the dense
  kernels take.
* ``quantize(matmul(dq(aq), dq(bq)))`` of two activations (attention) ->
  ``matmul(aq, bq, out_dtype=int32) - zb * rowsum(aq) - za * colsum(bq) + K * za * zb``,
  then requantize with ``sa * sb / sy``.
* ``quantize(max_pool2d|reshape|...(dq(xq)))`` with the same scale -> the op on ``xq``;
  ``quantize(multiply(dq(xq), c))`` at scale ``sx * c`` -> ``xq`` itself.
* ``quantize([relu](add|concat|mean|avg_pool2d|multiply|divide(dq(x)...)))`` -> integer
  inputs, rescaled to the output scale in float32 inside the fused kernel, integer output.
* A conv/matmul on dequantized inputs whose output is not re-quantized still runs as an
  integer kernel, its int32 accumulator scaled back to float32 in the same fused kernel.

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
from qcompile.quantize.op_tables import (
    ANCHORS,
    CONV_LAYOUTS,
    LINEAR_OPS,
    SAME_SCALE_OPS,
    SCALE_OPS,
)

_QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


@dataclass
class RealizeReport:
    """Which layers became integer and with which parameters (for the manifest)."""

    layers: list[dict] = field(default_factory=list)


class _Layers:
    """Report entries keyed by the program position of the op they came from; named
    ``<op>_<n>`` in program order at the end, as PTQ names its layers (``--keep-float``),
    although the float-output layers are found in a second pass."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, int, dict]] = []

    def add(self, position: float, entry: dict) -> None:
        self.entries.append((position, len(self.entries), entry))

    def named(self) -> list[dict]:
        counters: dict[str, int] = {}
        out = []
        for _, _, entry in sorted(self.entries, key=lambda e: (e[0], e[1])):
            index = counters.get(entry["op"], 0)
            counters[entry["op"]] = index + 1
            out.append({"name": f"{entry['op']}_{index}", **entry})
        return out


@dataclass(frozen=True)
class _Q:
    """A quantized tensor: its integer var (new module) and scale/zero point."""

    var: object
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1 and self.zero_point.size == 1

    @property
    def s(self) -> float:
        return float(self.scale.reshape(-1)[0])

    @property
    def z(self) -> int:
        return int(self.zero_point.reshape(-1)[0])


def realize(mod: tvm.IRModule) -> tuple[tvm.IRModule, RealizeReport]:
    """Rewrite QDQ regions of ``main`` into integer ops; returns the module and a report."""
    func = mod["main"]
    graph = Graph.from_main(func)
    layers = _Layers()
    position = {var: float(i) for i, (var, _) in enumerate(graph.bindings)}
    dq_source, weight_of = _dequantize_readers(graph)
    emitter: dict = {}

    def rewrite(em: Emitter, var, value):
        emitter["em"] = em
        if op_name(value) != "relax.quantize":
            return None
        sy, zy = const_value(value.args[1]), const_value(value.args[2])
        if sy is None or zy is None or sy.size != 1 or not _usable_scale(sy):
            return None
        out = _OutQ(float(sy.reshape(-1)[0]), int(zy.reshape(-1)[0]), str(value.attrs.out_dtype))
        ctx = _Context(em, graph, dq_source, weight_of, layers, position)
        for matcher in (_match_layer, _match_same_scale, _match_scaled, _match_linear):
            new = matcher(ctx, value.args[0], out)
            if new is not None:
                return new
        return None

    main = rebuild(func, rewrite)
    new_mod = relax.transform.DeadCodeElimination(["main"])(with_main(mod, main))
    # the second pass sees the new module's vars: their positions are those of the old ones
    vmap = emitter["em"].vmap if "em" in emitter else {}
    new_position = {new: position[old] for old, new in vmap.items() if isinstance(new, relax.Var) and old in position}
    new_mod = _realize_float_outputs(new_mod, layers, new_position)
    return _qparams_as_tensors(new_mod), RealizeReport(layers.named())


@dataclass
class _Context:
    """What the matchers read and write: the emitter, the QDQ graph and its readers, the report."""

    em: Emitter
    graph: Graph
    dq_source: object
    weight_of: object
    layers: _Layers
    position: dict

    def where(self, var) -> float:
        return self.position.get(var, float(len(self.position)))


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


def _usable_scale(scale: np.ndarray) -> bool:
    """Finite and positive: a calibrator that saw an infinite range (ONNX Runtime on BERT's
    ``finfo.min`` attention mask) writes an infinite scale, which leaves its tensor's ops
    as the QDQ graph says, in float."""
    return bool(np.all(np.isfinite(scale)) and np.all(scale > 0))


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
        if scale is None or zp is None or not _usable_scale(scale):
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
        if lo == 0:  # clip(x, 0, inf) -- torch's Hardsigmoid pieces -- is a plain relu
            hi = float(hi) if hi is not None else None
            return call.args[0], 0.0, hi if hi is not None and np.isfinite(hi) else None
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


def _match_layer(ctx: _Context, expr, out: _OutQ):
    graph, em = ctx.graph, ctx.em
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
            bias, float_bias = ctx.weight_of(other), const_value(other)  # int32 behind dq, or float (PT2E)
            if bias is not None or (float_bias is not None and float_bias.dtype == np.float32):
                anchor_expr = add.args[i]
                break
        else:
            return None
    anchor = graph.producer.get(anchor_expr) if isinstance(anchor_expr, relax.Var) else None
    acc = _int_anchor(em, anchor, ctx.dq_source, ctx.weight_of)
    if acc is None:
        return None
    sx, zx, wscale, channels, bshape = acc.sx, acc.zx, acc.wscale, acc.channels, acc.bshape
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
    ctx.layers.add(ctx.where(anchor_expr), {
        "op": acc.kind, "dtype": f"{acc.dtypes} -> int32 -> {out.dtype}",
        **acc.scales(), "output_scale": out.scale, "output_zero_point": out.zero_point,
        "fused_relu": lo is not None,
    })
    return result


@dataclass(frozen=True)
class _Acc:
    """An integer conv/matmul: its int32 accumulator and what requantizing it needs."""

    var: object
    kind: str  # the layer's op in the report: conv2d, conv1d, conv2d_transpose, matmul
    sx: float
    zx: int
    wscale: np.ndarray  # (channels,); a matmul of two activations: the second one's scale
    wsum: np.ndarray  # per output channel sum of the int8 weight (zero-point correction)
    channels: int
    bshape: tuple
    dtypes: str  # "uint8 x int8"
    rhs: _Q | None = None  # the second activation of a matmul of two activations

    def scales(self) -> dict:
        """The report's input and weight (or second input) parameters."""
        out = {"input_scale": self.sx, "input_zero_point": self.zx}
        if self.rhs is not None:
            out.update({"rhs_scale": self.rhs.s, "rhs_zero_point": self.rhs.z})
        else:
            out.update({"weight_scale_min": float(self.wscale.min()), "weight_scale_max": float(self.wscale.max())})
        return out


def _int_anchor(em, anchor, dq_source, weight_of) -> _Acc | None:
    """``conv|matmul(dq(xq), dq(Wq))`` as an int32-accumulating op on ``xq`` and ``Wq``
    (or on ``xq`` and a second activation ``bq``)."""
    kind = ANCHORS.get(op_name(anchor)) if anchor is not None else None
    if kind is None:
        return None
    x = dq_source(em, anchor.args[0])
    if x is None or not x.per_tensor:
        return None
    w = weight_of(anchor.args[1])
    if w is None:
        return _int_matmul_activations(em, anchor, x, dq_source) if kind == "matmul" else None
    wq, wscale, wzp, waxis = w
    if wq.dtype != np.int8 or np.any(wzp != 0):
        return None
    channel_axis, rank = (CONV_LAYOUTS[kind][2], CONV_LAYOUTS[kind][3]) if kind in CONV_LAYOUTS else (1, 2)
    if wq.ndim != rank:
        return None
    if wscale.size not in (1, wq.shape[channel_axis]) or (wscale.size > 1 and waxis % wq.ndim != channel_axis):
        return None
    channels = wq.shape[channel_axis]
    sx, zx = x.s, x.z
    wscale = np.broadcast_to(wscale.reshape(-1).astype(np.float32), (channels,))
    if kind == "matmul":
        acc = _int_dense(em, x.var, wq)
        wsum, bshape = wq.astype(np.int64).sum(axis=0), (channels,)
    else:
        found = _int_conv(em, anchor, kind, x.var, zx, wq)
        if found is None:
            return None
        acc, wsum, bshape = found
    return _Acc(acc, kind, sx, zx, wscale, wsum, channels, bshape, f"{dtype_of(x.var)} x int8")


def _static_shape(expr) -> tuple[int, ...] | None:
    try:
        return shape_of(expr)
    except (TypeError, ValueError, AttributeError):
        return None


def _int_dense(em, data, wq: np.ndarray):
    """``matmul(data, Wq)`` in int32; ``data`` of rank > 2 flattened to one 2-D product."""
    shape = _static_shape(data)
    if shape is None or len(shape) <= 2:
        return em.emit(relax.op.matmul(data, relax.const(wq), out_dtype="int32"))
    rows = int(np.prod(shape[:-1]))
    flat = em.emit(relax.op.reshape(data, (rows, shape[-1])))
    acc = em.emit(relax.op.matmul(flat, relax.const(wq), out_dtype="int32"))
    return em.emit(relax.op.reshape(acc, (*shape[:-1], wq.shape[1])))


def _int_conv(em, anchor, kind: str, data, zx: int, wq: np.ndarray):
    """(int32 accumulator, per-channel weight sums, bias shape) of an integer conv2d,
    conv1d or conv2d_transpose in the layouts PTQ and the importers write, else None."""
    attrs = anchor.attrs
    data_layout, kernel_layout, channel_axis, rank = CONV_LAYOUTS[kind]
    if str(attrs.data_layout) != data_layout or str(attrs.kernel_layout) != kernel_layout:
        return None
    if str(attrs.out_layout) not in ("", data_layout):
        return None
    channels = wq.shape[channel_axis]
    bshape = (1, channels) + (1,) * (rank - 2)
    padding = [int(p) for p in attrs.padding]
    if kind == "conv2d_transpose":
        if int(attrs.groups) != 1:
            return None
        acc = em.emit(relax.op.nn.conv2d_transpose(
            data, relax.const(wq), strides=attrs.strides, padding=padding, output_padding=attrs.output_padding,
            dilation=attrs.dilation, groups=1, out_dtype="int32"))
        out_shape, in_shape = _static_shape(anchor), _static_shape(data)
        if zx != 0:
            if out_shape is None or in_shape is None:
                return None
            ones = _transpose_conv_ones(wq, in_shape[2:], [int(s) for s in attrs.strides], padding,
                                        [int(d) for d in attrs.dilation], out_shape[2:])
            acc = em.emit(relax.op.subtract(acc, relax.const((zx * ones).astype(np.int32))))
        return acc, np.zeros(channels, np.int64), bshape
    if zx != 0 and any(padding):  # padded zeros must be the zero point, not 0
        if kind == "conv2d":
            top, left, bottom, right = padding
            widths = [0, 0, 0, 0, top, bottom, left, right]
        else:
            widths = [0, 0, 0, 0, padding[0], padding[1]]
        data = em.emit(relax.op.nn.pad(data, widths, pad_value=float(zx)))
        padding = [0] * len(padding)
    make = relax.op.nn.conv2d if kind == "conv2d" else relax.op.nn.conv1d
    acc = em.emit(make(data, relax.const(wq), strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                       groups=int(attrs.groups), out_dtype="int32"))
    return acc, wq.astype(np.int64).reshape(channels, -1).sum(axis=1), bshape


def _transpose_conv_ones(wq: np.ndarray, in_hw, strides, padding, dilation, out_hw) -> np.ndarray:
    """``conv2d_transpose(ones, Wq)`` as (1, O, OH, OW) int64: the weight taps, summed over
    input channels, that reach each output position."""
    taps = wq.astype(np.int64).sum(axis=0)  # (O, KH, KW)
    (h, w), (sh, sw), (dh, dw) = in_hw, strides, dilation
    kh, kw = taps.shape[1:]
    top, left = padding[0], padding[1]
    full = np.zeros((taps.shape[0], max((h - 1) * sh + dh * (kh - 1) + 1, top + out_hw[0]),
                     max((w - 1) * sw + dw * (kw - 1) + 1, left + out_hw[1])), np.int64)
    for i in range(kh):
        for j in range(kw):
            full[:, i * dh:i * dh + (h - 1) * sh + 1:sh, j * dw:j * dw + (w - 1) * sw + 1:sw] += taps[:, i, j, None, None]
    return full[None, :, top:top + out_hw[0], left:left + out_hw[1]]


def _int_param(value: int, like) -> relax.Constant:
    """An int32 zero point as a tensor broadcastable to ``like`` (see :func:`_param`)."""
    return relax.const(np.full((1,) * max(1, len(shape_of(like))), value, np.int32))


def _int_matmul_activations(em, anchor, a: _Q, dq_source) -> _Acc | None:
    """``matmul(dq(aq), dq(bq))`` of two per-tensor quantized activations in int32:
    ``sum_k (a - za)(b - zb)`` expanded so that the product runs on the integer inputs.

    The row and column sums are taken for every uint8 (or zero-point) operand, with the
    zero points as tensors: the kernels stay the same when a recalibration moves them."""
    b = dq_source(em, anchor.args[1])
    if b is None or not b.per_tensor:
        return None
    a_shape, b_shape = _static_shape(a.var), _static_shape(b.var)
    if a_shape is None or b_shape is None or len(a_shape) < 2 or len(b_shape) < 2:
        return None
    if dtype_of(a.var) not in _QRANGE or dtype_of(b.var) not in _QRANGE:
        return None
    acc = em.emit(relax.op.matmul(a.var, b.var, out_dtype="int32"))
    k = a_shape[-1]
    if dtype_of(b.var) == "uint8" or b.z != 0:  # - zb * sum_k a
        rows = em.emit(relax.op.sum(em.emit(relax.op.astype(a.var, "int32")), axis=[-1], keepdims=True))
        acc = em.emit(relax.op.subtract(acc, em.emit(relax.op.multiply(rows, _int_param(b.z, rows)))))
    if dtype_of(a.var) == "uint8" or a.z != 0:  # - za * sum_k b, + K * za * zb
        cols = em.emit(relax.op.sum(em.emit(relax.op.astype(b.var, "int32")), axis=[-2], keepdims=True))
        acc = em.emit(relax.op.subtract(acc, em.emit(relax.op.multiply(cols, _int_param(a.z, cols)))))
        acc = em.emit(relax.op.add(acc, _int_param(k * a.z * b.z, acc)))
    n = b_shape[-1]
    return _Acc(acc, "matmul", a.s, a.z, np.full(n, b.s, np.float32), np.zeros(n, np.int64), n, (n,),
                f"{dtype_of(a.var)} x {dtype_of(b.var)}", rhs=b)


def _add_int_constant(em, acc, value: np.ndarray, bshape: tuple):
    if not np.any(value):
        return acc
    return em.emit(relax.op.add(acc, relax.const(value.astype(np.int32).reshape(bshape))))


def _realize_float_outputs(mod: tvm.IRModule, layers: _Layers, position: dict) -> tvm.IRModule:
    """Second stage: conv/matmul on dequantized int8 whose output is not re-quantized
    (PTQ before a float op such as GELU or softmax; PT2E's conv -> residual add) still run
    as integer kernels, with the int32 accumulator scaled back to float32 in the same
    fused kernel."""
    graph = Graph.from_main(mod["main"])
    dq_source, weight_of = _dequantize_readers(graph)

    def rewrite(em, var, value):
        acc = _int_anchor(em, value, dq_source, weight_of) if op_name(value) in ANCHORS else None
        if acc is None:
            return None
        total = _add_int_constant(em, acc.var, -acc.zx * acc.wsum, acc.bshape)
        scale = (np.float32(acc.sx) * acc.wscale).astype(np.float32).reshape(acc.bshape)
        result = em.emit(relax.op.multiply(em.emit(relax.op.astype(total, "float32")), relax.const(scale)))
        layers.add(position.get(var, float(len(position))),
                   {"op": acc.kind, "dtype": f"{acc.dtypes} -> int32 -> float32", **acc.scales()})
        return result

    return relax.transform.DeadCodeElimination(["main"])(with_main(mod, rebuild(mod["main"], rewrite)))


def _match_same_scale(ctx: _Context, expr, out: _OutQ):
    graph, em = ctx.graph, ctx.em
    call = graph.producer.get(expr) if isinstance(expr, relax.Var) else None
    if call is None or op_name(call) not in SAME_SCALE_OPS:
        return None
    x = ctx.dq_source(em, call.args[0])
    if x is None or x.scale.size != 1 or not np.isclose(x.s, out.scale, rtol=1e-6):
        return None
    if x.z != out.zero_point or dtype_of(x.var) != out.dtype:
        return None
    kind = op_name(call).split(".")[-1]
    if kind == "max_pool2d":  # reshapes and the like are not layers worth listing
        ctx.layers.add(ctx.where(expr), {"op": kind, "dtype": f"{out.dtype} -> {out.dtype}",
                                         "output_scale": out.scale, "output_zero_point": out.zero_point})
    return em.emit(relax.Call(call.op, [x.var] + [em.subst(a) for a in call.args[1:]], call.attrs, call.ty_args))


def _match_scaled(ctx: _Context, expr, out: _OutQ):
    """``quantize(multiply(dq(xq, s, z), c), s * c, z)`` (or divide by 1/c) is ``xq``: PTQ
    moves a positive constant factor into the scale."""
    call = ctx.graph.producer.get(expr) if isinstance(expr, relax.Var) else None
    if call is None or op_name(call) not in SCALE_OPS:
        return None
    a, b = call.args
    if op_name(call) == "relax.multiply" and const_value(a) is not None:
        a, b = b, a
    c = const_value(b)
    x = ctx.dq_source(ctx.em, a)
    if c is None or c.size != 1 or x is None or not x.per_tensor or _static_shape(a) != _static_shape(expr):
        return None
    c = float(c.reshape(-1)[0])
    if not c > 0:
        return None
    factor = c if op_name(call) == "relax.multiply" else 1.0 / c
    if not np.isclose(np.float32(x.s * factor), out.scale, rtol=1e-6):
        return None
    if x.z != out.zero_point or dtype_of(x.var) != out.dtype:
        return None
    return x.var


def _dequant_float(em, q: _Q):
    """(x - zx) * sx in float32, to be fused into the consumer's kernel."""
    y = em.emit(relax.op.astype(q.var, "float32"))
    return em.emit(relax.op.subtract(y, _param(q.z, y)))  # even when zero, as in _requantize


def _match_linear(ctx: _Context, expr, out: _OutQ):
    graph, em = ctx.graph, ctx.em
    inner, lo, hi = _activation(graph, expr)
    call = graph.producer.get(inner) if isinstance(inner, relax.Var) else None
    name = op_name(call) if call is not None else None
    if name not in LINEAR_OPS and name not in SCALE_OPS:
        return None
    scaled_arg = 0
    if name == "relax.concat":
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
        sources = [ctx.dq_source(em, f) for f in fields] if fields else [None]
    elif name == "relax.add":
        sources = [ctx.dq_source(em, a) for a in call.args]
    else:  # linear in its first input (either input of a multiply); the others stay as they are
        sources = [ctx.dq_source(em, call.args[0])]
        if sources[0] is None and name == "relax.multiply":
            scaled_arg, sources = 1, [ctx.dq_source(em, call.args[1])]
    if any(q is None or q.scale.size != 1 for q in sources):
        return None
    scaled = []
    for q in sources:
        ratio = np.float32(np.float32(q.s) / np.float32(out.scale))
        dq = _dequant_float(em, q)
        scaled.append(em.emit(relax.op.multiply(dq, _param(ratio, dq))))
    if name == "relax.concat":
        total = em.emit(relax.Call(call.op, [relax.Tuple(scaled)], call.attrs, call.ty_args))
    elif name == "relax.add":
        total = em.emit(relax.op.add(scaled[0], scaled[1]))
    else:
        args = [em.subst(a) for a in call.args]
        args[scaled_arg] = scaled[0]
        total = em.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
    kind = name.split(".")[-1]
    ctx.layers.add(ctx.where(inner), {
        "op": kind, "dtype": f"{'/'.join(sorted({dtype_of(q.var) for q in sources}))} -> {out.dtype} (float32 inside)",
        "output_scale": out.scale, "output_zero_point": out.zero_point, "fused_relu": lo is not None})
    return _requantize(em, total, np.array(1.0, np.float32), out, lo, hi)
