"""Dynamic int8 quantization: int8 weights, activations quantized while the model runs.

What ONNX Runtime's ``quantize_dynamic`` does, as a Relax rewrite of the float model, with
no calibration data:

* each ``matmul(x, W)`` with a constant 2-D weight (any rank of ``x``) and each NCHW
  ``conv2d(x, W)`` with a constant weight gets an int8 weight constant, symmetric, per
  output channel (or per layer);
* ``x`` is quantized at run time from its own range: ``lo = min(0, min(x))``,
  ``hi = max(0, max(x))``, ``s = (hi - lo) / 255``, ``zp = round(-lo / s)``,
  ``xq = clip(round(x / s) + zp, 0, 255)`` -- ONNX Runtime's DynamicQuantizeLinear,
  round-half-to-even -- per tensor, or per row (the last axis reduced, matmul only); or
  symmetric int8 ``s = max|x| / 127`` without a zero point;
* the integer op accumulates in int32 (``uint8 x int8``), the zero point comes off as a
  constant term, ``acc - zp * sum_k W[k, n]`` (for a padded conv, the sum over the taps
  inside the image at each output position), and the result is scaled back to float32 by
  ``s * w_scale[n]``; a bias stays the float add that follows.

:func:`realize_dynamic` turns the same pattern in an imported graph -- ``matmul|conv2d``
of ``dequantize(xq, s, zp)`` with a run-time ``s``/``zp`` and a dequantized int8 weight,
what ONNX Runtime's DynamicQuantizeLinear + MatMulInteger/ConvInteger become at import
(:mod:`qcompile.frontend.onnx_qoperator`) -- into the same integer kernels.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax

from qcompile.errors import ConfigError
from qcompile.model import ImportedModel
from qcompile.passes.bindings import (
    Emitter,
    Graph,
    const_value,
    dtype_of,
    op_name,
    readable,
    rebuild,
    shape_of,
    with_main,
)
from qcompile.quantize.config import DynamicInt8Config, QuantizationInfo
from qcompile.quantize.op_tables import ANCHORS

SCHEME = "int8-dynamic"


@dataclass
class DynamicReport:
    """The layers made integer, those kept float on request, and anchors left float."""

    layers: list[dict] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    float_ops: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class _QAct:
    """An activation quantized at run time: integer var, int32 zero point (None: 0) and
    float32 scale (None: 1), both broadcastable against the layer's output."""

    xq: object
    zero_point: object | None
    scale: object | None


# -- the float model ------------------------------------------------------------------------------

def quantize_dynamic(model: ImportedModel, config: DynamicInt8Config, target: tvm.target.Target,
                     progress: Callable[[str], None] | None = None) -> ImportedModel:
    """The float model with dynamically quantized integer layers, carrying its
    :class:`QuantizationInfo` (scheme ``int8-dynamic``).  ``target`` decides
    ``reduce_range`` where the config leaves it open."""
    from qcompile.build.pipeline import phases_through, run_phases

    if model.is_quantized:
        raise ConfigError(f"model {model.source.name} is already quantized ({model.quantization.source}); "
                          "quantize the float model")
    say = progress or (lambda _m: None)
    config = config.for_target(target)
    with readable(model.source.name):
        # batch-norm folded and constants folded first: weights behind permute_dims become constants
        mod = run_phases(model.mod, target, phases=phases_through("inference"))
        mod, report = rewrite_dynamic(mod, config)
    say(f"dynamic int8: {len(report.layers)} integer layers, activations quantized at run time "
        f"({config.activations.to_json()}, {config.activation_dtype})")
    info = QuantizationInfo(
        source="qcompile-dynamic",
        scheme=SCHEME,
        config=config,
        activation_dtype=config.activation_dtype,
        weight_range=(-config.weight_qmax, config.weight_qmax),
        layers=tuple(report.layers),
        float_layers=tuple(report.kept_float),
        float_ops=dict(report.float_ops),
    )
    return replace(model, mod=mod, quantization=info)


def rewrite_dynamic(mod: tvm.IRModule, config: DynamicInt8Config) -> tuple[tvm.IRModule, DynamicReport]:
    """``main`` with every eligible conv2d/matmul on a constant weight made a dynamically
    quantized integer layer (see the module docstring)."""
    graph = Graph.from_main(mod["main"])
    names = _layer_names(graph)
    keep = _resolve_keep_float(names, config.keep_float)
    block_of = {var: i for i, block in enumerate(graph.blocks) for var, _ in block.bindings}
    report = DynamicReport()
    quantized: dict = {}  # (block, input var, per row) -> _QAct: one quantization per tensor and block

    def rewrite(em: Emitter, var, value):
        name = names.get(var)
        if name is None:
            if op_name(value) in ANCHORS:
                report.float_ops[op_name(value)] += 1  # e.g. attention's activation x activation matmul
            return None
        kind = name.rsplit("_", 1)[0]
        if name in keep or kind in keep:
            report.kept_float.append(name)
            return None
        if not _eligible(value):
            report.float_ops[op_name(value)] += 1
            return None
        per_row = config.per_row and kind == "matmul"
        key = (block_of.get(var), value.args[0], per_row)
        if key not in quantized:
            quantized[key] = _quantize_activation(em, em.subst(value.args[0]), per_row, config.activation_symmetric)
        act = quantized[key]
        weight = const_value(value.args[1])
        axis = 1 if kind == "matmul" else 0
        wq, wscale = quantize_weight(weight, axis, config.per_channel, config.weight_qmax)
        if kind == "matmul":
            out = int_matmul(em, act, wq, wscale)
        else:
            out = int_conv2d(em, act, shape_of(value.args[0]), wq, wscale, value.attrs)
        report.layers.append({
            "name": name, "op": kind, "dtype": f"{config.activation_dtype} x int8 -> int32 -> float32",
            "activations": f"{'per_row' if per_row else 'per_tensor'} (run time)",
            "weights": config.weights.to_json(),
            "weight_scale_min": float(wscale.min()), "weight_scale_max": float(wscale.max()),
        })
        return out

    main = rebuild(mod["main"], rewrite)
    return relax.transform.DeadCodeElimination(["main"])(with_main(mod, main)), report


def _layer_names(graph: Graph) -> dict:
    """conv2d/matmul vars with a constant weight -> ``conv2d_N``/``matmul_N``, in program
    order: the names ``--keep-float`` and ``qcompile info --layers`` use."""
    names, counters = {}, Counter()
    for var, value in graph.bindings:
        kind = ANCHORS.get(op_name(value))
        if kind is not None and const_value(value.args[1]) is not None:
            names[var] = f"{kind}_{counters[kind]}"
            counters[kind] += 1
    return names


def _resolve_keep_float(names: dict, keep_float: tuple[str, ...]) -> set[str]:
    """``keep_float`` with ``first``/``last`` expanded; a name that is no layer is an error."""
    ordered = list(names.values())
    keep = set(keep_float) - {"first", "last"}
    if ordered and "first" in keep_float:
        keep.add(ordered[0])
    if ordered and "last" in keep_float:
        keep.add(ordered[-1])
    unknown = keep - set(ordered) - set(ANCHORS.values())
    if unknown:
        raise ConfigError(f"--keep-float: no layer named {', '.join(sorted(unknown))} "
                          "(layers are conv2d_N, matmul_N; or first, last, conv2d, matmul)")
    return keep


def _eligible(value) -> bool:
    """A float32 matmul on a 2-D weight, or a one-layout NCHW/OIHW float32 conv2d."""
    x, w = value.args[0], value.args[1]
    weight = const_value(w)
    if weight is None or weight.dtype != np.float32 or dtype_of(x) != "float32":
        return False
    try:
        rank = len(shape_of(x))
    except (AttributeError, TypeError):  # a symbolic shape
        return False
    if op_name(value) == "relax.matmul":
        return weight.ndim == 2 and rank >= 2 and str(value.attrs.out_dtype) in ("", "void", "None", "float32")
    attrs = value.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    return weight.ndim == 4 and rank == 4 and layouts == ("NCHW", "OIHW", "NCHW") \
        and str(attrs.out_dtype) in ("", "void", "None", "float32")


def quantize_weight(weight: np.ndarray, axis: int, per_channel: bool, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weight and its float32 scale per ``axis`` channel (one value repeated
    per channel for a per-layer scale)."""
    weight = weight.astype(np.float32)
    channels = weight.shape[axis]
    moved = np.moveaxis(weight, axis, 0).reshape(channels, -1)
    amax = np.abs(moved).max(axis=1) if per_channel else np.full(channels, np.abs(weight).max(), np.float32)
    scale = (amax / np.float32(qmax)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # an all-zero channel
    shape = [1] * weight.ndim
    shape[axis] = channels
    q = np.clip(np.round(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def _f32(value: float) -> relax.Constant:
    return relax.const(np.float32(value))


def _quantize_activation(em: Emitter, x, per_row: bool, symmetric: bool) -> _QAct:
    """Scale, zero point and integer tensor of ``x`` computed from its range at run time."""
    axis, keep = ([-1], True) if per_row else (None, False)
    zero = _f32(0.0)
    if symmetric:
        amax = em.emit(relax.op.max(em.emit(relax.op.abs(x)), axis=axis, keepdims=keep))
        scale = em.emit(relax.op.divide(amax, _f32(127.0)))
    else:
        hi = em.emit(relax.op.maximum(em.emit(relax.op.max(x, axis=axis, keepdims=keep)), zero))
        lo = em.emit(relax.op.minimum(em.emit(relax.op.min(x, axis=axis, keepdims=keep)), zero))
        scale = em.emit(relax.op.divide(em.emit(relax.op.subtract(hi, lo)), _f32(255.0)))
    # an all-zero tensor (range 0) quantizes to zeros at scale 1, as ONNX Runtime does
    scale = em.emit(relax.op.where(em.emit(relax.op.equal(scale, zero)), _f32(1.0), scale))
    scaled = em.emit(relax.op.round(em.emit(relax.op.divide(x, scale))))
    if symmetric:
        xq = em.emit(relax.op.astype(em.emit(relax.op.clip(scaled, -127, 127)), "int8"))
        return _QAct(xq, None, scale)
    zp = em.emit(relax.op.negative(em.emit(relax.op.divide(lo, scale))))
    zp = em.emit(relax.op.round(em.emit(relax.op.clip(zp, 0, 255))))
    xq = em.emit(relax.op.astype(em.emit(relax.op.clip(em.emit(relax.op.add(scaled, zp)), 0, 255)), "uint8"))
    return _QAct(xq, em.emit(relax.op.astype(zp, "int32")), scale)


# -- integer layers ------------------------------------------------------------------------------

def _rescale(em: Emitter, acc, act: _QAct, correction: np.ndarray, wscale: np.ndarray, bshape: tuple):
    """``float32(acc - zp * correction) * (s * wscale)``; terms that are 0 or 1 are left out."""
    if act.zero_point is not None:
        if isinstance(correction, Correction):
            # the zero point times the few distinct values, then spread over the output:
            # a constant [1, O, OH, OW] would outweigh the int8 weight of a wide early layer
            # (the indices are constants in range: "clip" costs nothing and, unlike "fast",
            # makes TVM print no out-of-bounds warning)
            term = em.emit(relax.op.multiply(act.zero_point, relax.const(correction.table.astype(np.int32))))
            term = em.emit(relax.op.take(term, relax.const(correction.rows.astype(np.int32)), axis=2, mode="clip"))
            term = em.emit(relax.op.take(term, relax.const(correction.cols.astype(np.int32)), axis=3, mode="clip"))
        else:
            term = em.emit(relax.op.multiply(act.zero_point, relax.const(correction.astype(np.int32))))
        acc = em.emit(relax.op.subtract(acc, term))
    y = em.emit(relax.op.astype(acc, "float32"))
    unit_w = bool(np.all(wscale == 1.0))
    if act.scale is None and unit_w:
        return y
    w = relax.const(wscale.astype(np.float32).reshape(bshape))
    multiplier = w if act.scale is None else (act.scale if unit_w else em.emit(relax.op.multiply(act.scale, w)))
    return em.emit(relax.op.multiply(y, multiplier))


def int_matmul(em: Emitter, act: _QAct, wq: np.ndarray, wscale: np.ndarray):
    """float32 ``x @ W`` from run-time-quantized ``x`` and int8 ``W`` [K, N] (scale per N).

    Inputs of rank > 2 are folded to 2-D around the integer matmul, the form of qcompile's
    packed int8 dense kernel (:mod:`qcompile.passes.pack_conv`)."""
    xshape = shape_of(act.xq)
    k, n = wq.shape
    data = act.xq
    if len(xshape) != 2:
        data = em.emit(relax.op.reshape(data, (int(np.prod(xshape[:-1])), k)))
    acc = em.emit(relax.op.matmul(data, relax.const(wq), out_dtype="int32"))
    if len(xshape) != 2:
        acc = em.emit(relax.op.reshape(acc, (*xshape[:-1], n)))
    colsum = wq.astype(np.int64).sum(axis=0)
    return _rescale(em, acc, act, colsum, wscale, (n,))


def int_conv2d(em: Emitter, act: _QAct, xshape: tuple, wq: np.ndarray, wscale: np.ndarray, attrs):
    """float32 NCHW ``conv2d(x, W)`` from run-time-quantized ``x`` and int8 OIHW ``W``.

    Padding stays zeros in the integer conv; the zero point's share is subtracted only over
    the taps that fall inside the image (:func:`conv_correction`), which equals padding
    with the zero point."""
    acc = em.emit(relax.op.nn.conv2d(act.xq, relax.const(wq), strides=attrs.strides, padding=attrs.padding,
                                     dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32"))
    correction = conv_correction(wq, xshape, [int(p) for p in attrs.padding], [int(s) for s in attrs.strides],
                                 [int(d) for d in attrs.dilation])
    return _rescale(em, acc, act, correction, wscale, (1, wq.shape[0], 1, 1))


@dataclass(frozen=True)
class Correction:
    """A [1, O, OH, OW] correction stored as its distinct values: ``table[:, :, rows[a],
    cols[b]]`` is the value at output position (a, b) (an output row's taps inside the image
    follow one of a few patterns: top edge, interior, bottom edge; columns likewise)."""

    table: np.ndarray  # [1, O, R, C]
    rows: np.ndarray  # [OH] -> pattern index
    cols: np.ndarray  # [OW] -> pattern index

    def dense(self) -> np.ndarray:
        return self.table[:, :, self.rows][:, :, :, self.cols]


def conv_correction(wq: np.ndarray, xshape: tuple, padding: list[int], strides: list[int],
                    dilation: list[int]) -> np.ndarray | Correction:
    """conv2d of an all-ones input with ``wq`` (zero padding): the sum of the weight over the
    taps inside the image at each output position -- [1, O, 1, 1] without padding, where every
    position sees every tap, else a :class:`Correction` of its distinct values."""
    top, left, bottom, right = padding
    height, width = xshape[2], xshape[3]
    taps = wq.astype(np.int64).sum(axis=1)  # [O, KH, KW]: summed over the group's input channels
    _, kh, kw = taps.shape

    def inside(size: int, before: int, after: int, k: int, stride: int, dil: int) -> np.ndarray:
        out = (size + before + after - dil * (k - 1) - 1) // stride + 1
        pos = np.arange(out)[:, None] * stride - before + np.arange(k)[None, :] * dil
        return ((pos >= 0) & (pos < size)).astype(np.int64)

    rows = inside(height, top, bottom, kh, strides[0], dilation[0])
    cols = inside(width, left, right, kw, strides[1], dilation[1])
    if rows.all() and cols.all():
        return taps.sum(axis=(1, 2)).reshape(1, -1, 1, 1)
    row_kinds, row_index = np.unique(rows, axis=0, return_inverse=True)
    col_kinds, col_index = np.unique(cols, axis=0, return_inverse=True)
    table = np.einsum("okl,ak,bl->oab", taps, row_kinds, col_kinds)[None]
    return Correction(table, row_index.reshape(-1), col_index.reshape(-1))


# -- pre-quantized graphs ------------------------------------------------------------------------

def realize_dynamic(mod: tvm.IRModule, counters: Counter | None = None) -> tuple[tvm.IRModule, list[dict]]:
    """Integer kernels for ``matmul|conv2d(dequantize(xq, s, zp), dequantize(Wq))`` whose
    activation scale or zero point is computed at run time (an imported
    DynamicQuantizeLinear); ``counters`` numbers the layers after those already named."""
    graph = Graph.from_main(mod["main"])
    counters = Counter() if counters is None else counters
    layers: list[dict] = []

    def rewrite(em: Emitter, var, value):
        kind = ANCHORS.get(op_name(value))
        if kind is None:
            return None
        found = _dynamic_operands(graph, value, kind)
        if found is None:
            return None
        xq, sx, zx, wq, wscale = found
        act = _QAct(em.subst(xq), _int32_zero_point(em, zx), _scale_or_none(em, sx))
        if kind == "matmul":
            out = int_matmul(em, act, wq, wscale)
        else:
            out = int_conv2d(em, act, shape_of(xq), wq, wscale, value.attrs)
        name = f"{kind}_{counters[kind]}"
        counters[kind] += 1
        layer = {"name": name, "op": kind, "dtype": f"{dtype_of(xq)} x int8 -> int32 -> float32",
                 "activations": "per_tensor (run time)"}
        if act.scale is not None or np.any(wscale != 1.0):  # else the graph's own Mul scales the result
            layer.update(weight_scale_min=float(wscale.min()), weight_scale_max=float(wscale.max()))
        layers.append(layer)
        return out

    main = rebuild(mod["main"], rewrite)
    if not layers:
        return mod, layers
    return relax.transform.DeadCodeElimination(["main"])(with_main(mod, main)), layers


def _dynamic_operands(graph: Graph, value, kind: str):
    """(xq, scale expr, zero point expr, int8 weight, weight scale per channel) of an anchor
    on a run-time-quantized activation and a dequantized int8 constant, else None."""
    dx = graph.call_of(value.args[0], "relax.dequantize")
    dw = graph.call_of(value.args[1], "relax.dequantize")
    if dx is None or dw is None:
        return None
    xq, sx, zx = dx.args
    if dtype_of(xq) not in ("uint8", "int8") or const_value(xq) is not None:
        return None
    if const_value(sx) is not None and const_value(zx) is not None:
        return None  # static: realize's
    if any(_size(a) != 1 for a in (sx, zx)):
        return None
    wq, wscale, wzp = (const_value(a) for a in dw.args)
    if wq is None or wscale is None or wzp is None or wq.dtype != np.int8 or np.any(wzp != 0):
        return None  # uint8 or asymmetric weights stay float
    if kind == "matmul":
        if wq.ndim != 2 or len(shape_of(xq)) < 2:
            return None
        axis = 1
    else:
        attrs = value.attrs
        if wq.ndim != 4 or (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NCHW", "OIHW"):
            return None
        axis = 0
    channels = wq.shape[axis]
    if wscale.size not in (1, channels) or (wscale.size > 1 and int(dw.attrs.axis) % wq.ndim != axis):
        return None
    wscale = np.broadcast_to(wscale.reshape(-1).astype(np.float32), (channels,)).copy()
    return xq, sx, zx, wq, wscale


def _size(expr) -> int:
    try:
        return int(np.prod(shape_of(expr)))
    except (AttributeError, TypeError):
        return -1


def _int32_zero_point(em: Emitter, zx):
    value = const_value(zx)
    if value is not None and not np.any(value):
        return None
    return em.emit(relax.op.astype(em.subst(zx), "int32"))


def _scale_or_none(em: Emitter, sx):
    value = const_value(sx)
    if value is not None and np.all(value == 1.0):
        return None  # MatMulInteger's own scale: the graph multiplies by x_scale * w_scale after
    return em.subst(sx)


def realize_dynamic_prequantized(model: ImportedModel) -> ImportedModel:
    """``model`` (already through :func:`qcompile.quantize.realize_prequantized`) with its
    dynamic-quantization patterns on integer kernels; unchanged where there are none."""
    info = model.quantization or QuantizationInfo(source=f"{model.source.kind}-qdq", activation_dtype=None,
                                                  layers=())
    with readable(model.source.name):
        mod, layers = realize_dynamic(model.mod, Counter(layer["op"] for layer in info.layers))
    if not layers:
        return model
    static = any(layer["op"] in ANCHORS.values() for layer in info.layers)
    all_layers = (*info.layers, *layers, *recurrent_layers(mod))
    activations = sorted({layer["dtype"].split()[0] for layer in all_layers if layer["op"] in ANCHORS.values()})
    unrealized = float_anchors(mod, quantized_only=True)
    new = replace(
        info,
        scheme="int8" if static else SCHEME,  # some layers on calibrated scales: not dynamic throughout
        activation_dtype="/".join(activations),
        layers=all_layers,
        float_ops=dict(Counter(op for _, op in float_anchors(mod))),
        float_nodes=tuple(f"{name} = {op}" for name, op in unrealized),
    )
    return replace(model, mod=mod, quantization=new)


def recurrent_layers(mod: tvm.IRModule) -> list[dict[str, str]]:
    """Report entries of DynamicQuantizeLSTM recurrences fused into one kernel
    (:mod:`qcompile.kernels.recurrent`, ``quantized_state``): their per-step GEMM is integer."""
    from qcompile.kernels.recurrent import QUANTIZED_NAME

    graph = Graph.from_main(mod["main"])
    calls = [value for _, value in graph.bindings if op_name(value) == "relax.call_tir"
             and value.args[0].name_hint.startswith(QUANTIZED_NAME)]
    return [{"name": f"lstm_{i}", "op": "lstm", "dtype": "uint8 x int8 -> int32 -> float32",
             "activations": "per_tensor per step (run time)"} for i in range(len(calls))]


def float_anchors(mod: tvm.IRModule, quantized_only: bool = False) -> list[tuple[str, str]]:
    """(var name, op) of conv2d/matmul still on float inputs; with ``quantized_only``, those
    with a dequantized operand only (a pattern left unrealized, not a layer the model
    leaves float, such as attention's activation x activation matmul)."""
    graph = Graph.from_main(mod["main"])
    return [(var.name, op_name(value)) for var, value in graph.bindings
            if op_name(value) in ANCHORS and dtype_of(value.args[0]) == "float32"
            and (not quantized_only or any(graph.call_of(a, "relax.dequantize") is not None for a in value.args[:2]))]

