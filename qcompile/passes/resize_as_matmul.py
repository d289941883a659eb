"""ResizeAsMatmul: bilinear upsampling of a small map as two matmuls with interpolation matrices.

A segmentation head ends by resizing its class scores to the input size (DeepLabV3 and LRASPP:
an 8x8 or 16x16 map to 128x128 or larger).  TVM lowers ``resize2d`` as one loop nest that, for
every output element, computes both source coordinates, floors, clamps and gathers four
inputs: scalar work per element that took DeepLabV3-MobileNetV3's fp32 run ~10% of its time at
128x128.  Linear interpolation is separable and, on a static shape, the same for every
channel: ``y[n, c] = Ry @ x[n, c] @ Rx^T`` with ``Ry[OH, H]`` and ``Rx[OW, W]`` holding each output
row's two interpolation weights.  Both products run as vectorized matmuls (the first on the
packed conv kernel, ``PackConv`` takes ``x @ W`` with a constant ``W``), and they cost
``H + W * H / OH`` multiply-adds per output element, few where the input is small.

The matrices reproduce TVM's ``topi.image.resize2d`` arithmetic (coordinate transform, floor,
clamped neighbours), so results agree to float32 rounding.  Only float32 NCHW ``linear`` resizes
with static shapes whose input sides are at most :data:`MAX_SIDE` are rewritten, only where they
enlarge the map and only where the result is the model's output.  A resize inside the network (a
U-Net decoder's upsampling, LRASPP's inner one) feeds NHWC kernels: as NCHW matmuls it would
cost two layout transposes more than it saves, so it keeps TVM's resize in NHWC.  A 1x1 input (a
broadcast, as in ASPP's pooling branch) is left as it is too.  This pass runs in the ``kernels`` phase, after quantization: resizes stay float32 in an
int8 model and the matmuls must not become dense layers that PTQ quantizes.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Emitter,
    dtype_of,
    output_vars,
    rewrite_calls,
    shape_of,
)

# Input sides up to this many rows / columns: a matmul spends H (and W*H/OH) multiply-adds on
# each output where the gather form spends ~30 scalar operations, so larger maps keep the gather.
MAX_SIDE = 32
_MODES = ("half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel")


def interpolation_matrix(size: int, target: int, mode: str) -> np.ndarray:
    """``R[target, size]``: output row ``o`` of a linear resize along one axis is ``R[o] @ x``,
    computed as TVM's resize computes it (``get_inx``, then floor and clamped neighbours)."""
    out = np.arange(target, dtype=np.float32)
    scale = np.float32(size) / np.float32(target)
    if mode == "half_pixel" or (mode == "pytorch_half_pixel" and target > 1):
        src = (out + np.float32(0.5)) * scale - np.float32(0.5)
    elif mode == "align_corners":
        src = np.float32(size - 1) / np.float32(target - 1) * out if target > 1 else np.zeros_like(out)
    elif mode == "asymmetric":
        src = scale * out
    elif mode == "pytorch_half_pixel":
        src = np.zeros_like(out)
    else:
        raise ValueError(f"no interpolation matrix for coordinate_transformation_mode {mode!r}")
    low = np.floor(src).astype(np.int64)
    frac = (src - low).astype(np.float32)
    matrix = np.zeros((target, size), np.float32)
    rows = np.arange(target)
    np.add.at(matrix, (rows, np.clip(low, 0, size - 1)), np.float32(1) - frac)
    np.add.at(matrix, (rows, np.clip(low + 1, 0, size - 1)), frac)
    return matrix


def _resize2d(em: Emitter, var, value):
    attrs = value.attrs
    if (attrs.layout != "NCHW" or attrs.method != "linear" or attrs.coordinate_transformation_mode not in _MODES
            or dtype_of(value.args[0]) != "float32" or str(attrs.out_dtype or "") not in ("", "float32", "void")):
        return None
    try:
        (_, _, h, w), (_, _, oh, ow) = shape_of(value.args[0]), shape_of(var)
    except (TypeError, ValueError):  # symbolic sizes: no constant matrices
        return None
    if max(h, w) > MAX_SIDE or oh < h or ow < w or (oh, ow) == (h, w) or (h, w) == (1, 1):
        return None
    mode = str(attrs.coordinate_transformation_mode)
    ry = interpolation_matrix(h, oh, mode)
    rx_t = np.ascontiguousarray(interpolation_matrix(w, ow, mode).T)
    rows = em.emit(relax.op.matmul(em.subst(value.args[0]), relax.const(rx_t)))  # [N, C, H, OW]
    return relax.op.matmul(relax.const(ry), rows)  # [N, C, OH, OW]


@tvm.transform.module_pass(opt_level=0, name="ResizeAsMatmul")
def ResizeAsMatmul(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with its small float32 bilinear upsamplings as two matmuls each."""
    if "main" not in mod:
        return mod
    outputs = set(output_vars(mod["main"].body.body))

    def resize(em: Emitter, var, value):
        return _resize2d(em, var, value) if var in outputs else None

    return rewrite_calls(mod, {"relax.image.resize2d": resize})
