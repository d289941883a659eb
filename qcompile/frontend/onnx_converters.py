"""ONNX ``Clip`` and constant ``Pad`` as Relax operators instead of TVM's TE kernels.

TVM's converters emit these two as ``call_tir`` kernels (``topi.maximum`` / ``minimum``,
``topi.nn.pad``).  Those are opaque to every later pass: ConvertLayout wraps each one in
two transposes, FuseOps cannot put a clip into the producing convolution's epilogue, the
convolution cannot take a pad into its own padding, and the quantizer does not see a
ReLU6.  On an ONNX MobileNetV2 that is a transpose-clip-transpose kernel after every
expanded convolution, each a round trip of the activation through memory (at batch 8 the
largest kernels of the int8 run).

* ``Clip``: constant bounds become ``relax.op.clip`` (what the PyTorch importer gives for
  ReLU6; the later passes know it), other bounds ``relax.op.maximum`` / ``minimum``, with
  the frontend's semantics: a missing or NaN bound is no bound, ``min > max`` gives ``max``.
* ``Pad`` in ``constant`` mode with non-negative pads becomes ``relax.op.nn.pad``; other
  modes and negative pads (crops) stay with TVM's converter.
"""
from __future__ import annotations

import math

import numpy as np
from tvm import relax

from qcompile.passes.bindings import const_value, dtype_of


def convert_clip(bb: relax.BlockBuilder, inputs: list, attrs: dict, opset: int) -> relax.Expr:
    """The Relax expression of one ``Clip`` node (``inputs``: data[, min[, max]])."""
    x = inputs[0]
    if opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo = inputs[1] if len(inputs) > 1 else None
        hi = inputs[2] if len(inputs) > 2 else None
    lo, hi = _scalar(lo), _scalar(hi)
    dtype = dtype_of(x)
    if isinstance(lo, float) and isinstance(hi, float) and lo <= hi:
        if "int" in dtype and not (lo.is_integer() and hi.is_integer()):
            return _min_max(bb, x, lo, hi, dtype)
        return bb.emit(relax.op.clip(x, _prim(lo, dtype), _prim(hi, dtype)))
    return _min_max(bb, x, lo, hi, dtype)


def convert_pad(bb: relax.BlockBuilder, inputs: list, attrs: dict, opset: int, params) -> relax.Expr | None:
    """The Relax expression of one constant-mode ``Pad`` node, or None where TVM's
    converter should take it (another mode, negative or run-time pads)."""
    from tvm.relax.frontend.onnx.onnx_frontend import Pad

    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if opset < 11:
        pads = [int(p) for p in attrs.get("pads", ())]
        before, after, value = pads[:len(pads) // 2], pads[len(pads) // 2:], float(attrs.get("value", 0.0))
    else:
        try:
            before, after, value = Pad._parse_pads_and_axes(inputs, params)
        except ValueError:  # run-time pads or axes: the frontend's own message
            return None
    if min(before + after, default=0) < 0:
        return None
    width = [int(w) for pair in zip(before, after) for w in pair]
    return bb.emit(relax.op.nn.pad(inputs[0], width, "constant", value))


def _min_max(bb: relax.BlockBuilder, x: relax.Expr, lo, hi, dtype: str) -> relax.Expr:
    """``minimum(maximum(x, lo), hi)``, skipping a missing bound."""
    out = x
    if lo is not None:
        out = bb.emit(relax.op.maximum(out, _bound(bb, lo, dtype, float("-inf"))))
    if hi is not None:
        out = bb.emit(relax.op.minimum(out, _bound(bb, hi, dtype, float("inf"))))
    return out


def _scalar(bound):
    """A bound as a Python float when it is a known scalar, None when absent (or NaN / an
    infinity: no bound), else the Relax expression itself."""
    if bound is None:
        return None
    value = const_value(bound)
    if value is not None:
        if value.size != 1:
            return bound
        bound = value.reshape(()).item()
    if isinstance(bound, (int, float)):
        value = float(bound)
        return None if math.isnan(value) or math.isinf(value) else value
    return bound


def _prim(value: float, dtype: str):
    return int(value) if "int" in dtype else value


def _bound(bb: relax.BlockBuilder, bound, dtype: str, unbounded: float) -> relax.Expr:
    """A bound as a tensor of ``x``'s dtype; a run-time float bound that is NaN means none."""
    if isinstance(bound, float):
        return relax.const(np.array(bound).astype(dtype))
    if "float" in dtype:
        bound = bb.emit(relax.op.where(relax.op.isnan(bound), relax.const(unbounded, dtype), bound))
    return bound
