"""DropPaddingTaps: remove the kernel taps of a conv2d that only ever read padding.

A dilated conv on a small feature map reads zeros with most of its taps: DeepLabV3's ASPP
branches (3x3 kernels, dilation 12/24/36, padding equal to the dilation) on the 8x8 map of a
128x128 input, or the 33x33 map of a 520x520 one, have an input row inside the map for the
centre tap only.  Such a conv computes the same as a conv with fewer taps (a 1x1 conv where one
tap is left), on a far smaller padded input, and that form runs on the packed kernels without
dilation, float32 and, through PTQ, int8 (this pass runs in the ``inference`` phase, before
calibration).

Along one spatial axis (input size ``H``, kernel ``K``, stride ``s``, dilation ``d``, padding
``pb``/``pa``, ``OH`` outputs) tap ``k`` reads input row ``o*s + k*d - pb`` for output row ``o``;
it is kept when some ``o`` in ``[0, OH)`` reads a row in ``[0, H)``.  Keeping taps ``k0..k1``
takes ``weight[..., k0:k1+1]`` with padding ``pb - k0*d`` before and ``pa - (K-1-k1)*d`` after,
which leaves every output's reads and the output size unchanged.  A rewrite that would need a
negative padding (a crop) is not made.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Emitter,
    const_value,
    rewrite_calls,
    shape_of,
)


def kept_taps(size: int, kernel: int, stride: int, dilation: int, before: int, after: int) -> tuple[int, int]:
    """First and last tap of one axis that read an input element for some output."""
    outputs = (size + before + after - dilation * (kernel - 1) - 1) // stride + 1
    rows = np.arange(outputs) * stride - before
    used = [k for k in range(kernel) if np.any((rows + k * dilation >= 0) & (rows + k * dilation < size))]
    return (used[0], used[-1]) if used else (0, kernel - 1)


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _conv2d(em: Emitter, _var, value):
    attrs = value.attrs
    weight = const_value(value.args[1])
    if weight is None or weight.ndim != 4 or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
        return None
    try:
        _, _, h, w = shape_of(value.args[0])
    except (TypeError, ValueError):  # a symbolic spatial size: which taps read data is not known
        return None
    (sh, sw), (dh, dw) = _ints(attrs.strides), _ints(attrs.dilation)
    top, left, bottom, right = _ints(attrs.padding)
    kh, kw = weight.shape[2:]
    (r0, r1), (c0, c1) = kept_taps(h, kh, sh, dh, top, bottom), kept_taps(w, kw, sw, dw, left, right)
    if (r0, r1, c0, c1) == (0, kh - 1, 0, kw - 1):
        return None
    padding = [top - r0 * dh, left - c0 * dw, bottom - (kh - 1 - r1) * dh, right - (kw - 1 - c1) * dw]
    if min(padding) < 0:
        return None
    kept = np.ascontiguousarray(weight[:, :, r0:r1 + 1, c0:c1 + 1])
    # one tap left along an axis: its dilation no longer matters, and 1 keeps the plain kernels
    dilation = [dh if r1 > r0 else 1, dw if c1 > c0 else 1]
    return relax.op.nn.conv2d(em.subst(value.args[0]), relax.const(kept), strides=[sh, sw], padding=padding,
                              dilation=dilation, groups=int(attrs.groups), data_layout=attrs.data_layout,
                              kernel_layout=attrs.kernel_layout, out_layout=attrs.out_layout,
                              out_dtype=attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="DropPaddingTaps")
def DropPaddingTaps(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with the taps of its constant-weight conv2d ops that read only padding removed."""
    return rewrite_calls(mod, {"relax.nn.conv2d": _conv2d})
