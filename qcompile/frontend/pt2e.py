"""Converters for PyTorch PT2E's ``quantized_decomposed`` ops into Relax QDQ.

``convert_pt2e`` leaves ``quantize_per_tensor`` / ``dequantize_per_tensor`` /
``dequantize_per_channel`` calls around float aten ops; TVM's torch frontend has no
converters for them.  These map them onto ``relax.op.quantize``/``dequantize`` so PT2E
models reach the same realize pass as every other source.

Dynamic quantization (``is_dynamic=True``) computes each activation's scale and zero
point at run time with ``choose_qparams.tensor``; it is written out as its definition in
Relax ops, and the dequantize that reads its results is what
:func:`qcompile.quantize.dynamic.realize_dynamic` turns into integer kernels.
"""
from __future__ import annotations

from collections.abc import Callable

from tvm import relax

from qcompile.errors import ModelImportError

_DTYPES = {"torch.uint8": ("uint8", 0, 255), "torch.int8": ("int8", -128, 127)}


def _qdtype(node, dtype, qmin, qmax, within: bool = False) -> str:
    """The Relax dtype of a PT2E quantized dtype whose range is the full one, or with
    ``within`` (a dequantize, which reads values its range does not change) inside it."""
    name, lo, hi = _DTYPES.get(str(dtype), (None, None, None))
    full = (qmin, qmax) == (lo, hi)
    if name is None or not (full or (within and lo <= qmin <= qmax <= hi)):
        raise ModelImportError(
            f"PT2E node {node.name}: {dtype} with range [{qmin}, {qmax}] is not supported "
            "(qcompile realizes full-range int8/uint8)"
        )
    return name


def _scalar(value, dtype: str):
    return value if isinstance(value, relax.Expr) else relax.const(value, dtype)


def _zero_point(value):
    if isinstance(value, relax.Expr):
        return relax.op.astype(value, "int32") if str(value.ty.dtype) != "int32" else value
    return relax.const(int(value), "int32")


def _quantize(node, importer):
    x, scale, zp, qmin, qmax, dtype = importer.retrieve_args(node)[:6]
    out = _qdtype(node, dtype, qmin, qmax)
    return importer.block_builder.emit(
        relax.op.quantize(x, _scalar(scale, "float32"), _zero_point(zp), axis=-1, out_dtype=out))


def _dequantize(node, importer):
    q, scale, zp, qmin, qmax, dtype = importer.retrieve_args(node)[:6]
    _qdtype(node, dtype, qmin, qmax, within=True)  # e.g. symmetric int8 weights in [-127, 127]
    return importer.block_builder.emit(
        relax.op.dequantize(q, _scalar(scale, "float32"), _zero_point(zp), axis=-1, out_dtype="float32"))


def _quantize_per_channel(node, importer):
    x, scale, zp, axis, qmin, qmax, dtype = importer.retrieve_args(node)[:7]
    out = _qdtype(node, dtype, qmin, qmax)
    return importer.block_builder.emit(relax.op.quantize(x, scale, _zero_point(zp), axis=int(axis), out_dtype=out))


def _dequantize_per_channel(node, importer):
    q, scale, zp, axis, qmin, qmax, dtype = importer.retrieve_args(node)[:7]
    _qdtype(node, dtype, qmin, qmax, within=True)
    return importer.block_builder.emit(
        relax.op.dequantize(q, scale, _zero_point(zp), axis=int(axis), out_dtype="float32"))


def _choose_qparams(node, importer):
    """``choose_qparams.tensor(x, qmin, qmax, eps, dtype)``, per tensor and asymmetric:
    ``lo = min(0, min x)``, ``hi = max(0, max x)``, ``s = max((hi - lo) / (qmax - qmin), eps)``,
    ``zp = clip(qmin - round(lo / s), qmin, qmax)``; (scale, zero point) as float32 and int32
    scalars."""
    x, qmin, qmax, eps, dtype = importer.retrieve_args(node)[:5]
    _qdtype(node, dtype, qmin, qmax)
    emit = importer.block_builder.emit
    zero = relax.const(0.0, "float32")
    lo = emit(relax.op.minimum(emit(relax.op.min(x)), zero))
    hi = emit(relax.op.maximum(emit(relax.op.max(x)), zero))
    span = emit(relax.op.divide(emit(relax.op.subtract(hi, lo)), relax.const(float(qmax - qmin), "float32")))
    scale = emit(relax.op.maximum(span, relax.const(float(eps), "float32")))
    shift = emit(relax.op.round(emit(relax.op.divide(lo, scale))))
    zp = emit(relax.op.clip(emit(relax.op.subtract(relax.const(float(qmin), "float32"), shift)), int(qmin), int(qmax)))
    return scale, emit(relax.op.astype(zp, "int32"))


CONVERT_MAP: dict[str, Callable] = {
    "quantize_per_tensor.default": _quantize,
    "quantize_per_tensor.tensor": _quantize,
    "dequantize_per_tensor.default": _dequantize,
    "dequantize_per_tensor.tensor": _dequantize,
    "quantize_per_channel.default": _quantize_per_channel,
    "dequantize_per_channel.default": _dequantize_per_channel,
    "choose_qparams.tensor": _choose_qparams,
}
