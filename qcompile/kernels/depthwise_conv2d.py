"""Depthwise conv2d (NHWC), int8 (and float32), vectorized along the channels.

A depthwise conv has no reduction over input channels, so no dot-product instruction
applies (each lane needs its own activations); what makes it fast is the layout: in NHWC one
tap of ``L`` adjacent channels is one vector load (u8 -> i32 widening) and one multiply-add
against that tap's ``L`` weights, for a tile of ``P`` output pixels kept in registers.
TVM's grouped conv2d reaches the same loop nest, but its default lowering runs it as scalar
code (measured 5 GMAC/s on mobilenet_v2's 112x112x96 stride-2 layer vs 30-45 here).

Inputs: ``x`` NHWC (uint8 or int8), the zero point (padding value; a tensor, so the kernel
does not change with calibration), the weight ``[KH, KW, C]`` int8.  Output: int32 NHWC.
The float32 form (the weight float32, the padding value 0.0) serves float models.
"""
from __future__ import annotations

from collections.abc import Callable

from tvm import s_tir, te, tirx

from qcompile.kernels.packed_conv2d import PAD, ConvShape, has_block
from qcompile.kernels.registry import HandKernel, register

ANCHOR = "qc_depthwise_conv2d"

# (P pixels, L channel lanes) register tiles that `qcompile tune` measures (the default is
# `tile_for`'s): 32-bit accumulators, L=8 is one AVX2 register.
TILES = ((4, 8), (7, 8), (2, 8), (4, 16), (8, 8), (14, 8))
KERNEL = register(HandKernel("depthwise_conv2d", ANCHOR, TILES))


def depthwise_func(shape: ConvShape, activation_dtype: str) -> tirx.PrimFunc:
    """The compute definition: (x NHWC, zero point, weight [KH, KW, C]) -> int32 NHWC
    (float32: the same with a float32 weight and output, the "zero point" 0.0);
    ``shape.ic == shape.oc`` (one input channel per group, channel multiplier 1)."""
    if shape.ic != shape.oc:
        raise ValueError(f"depthwise conv2d: {shape.ic} input channels but {shape.oc} outputs")
    top, left, bottom, right = shape.padding
    oh, ow = shape.out_hw
    (sh, sw), (dh, dw) = shape.stride, shape.dilation

    def dims(*values: int) -> tuple:
        return tuple(tirx.IntImm("int64", v) for v in values)  # int64 like LegalizeOps' kernels

    integer = activation_dtype != "float32"
    x = te.placeholder(dims(shape.n, shape.h, shape.w, shape.ic), activation_dtype, name="x")
    zx = te.placeholder(dims(1), activation_dtype, name="zero_point")
    w = te.placeholder(dims(shape.kh, shape.kw, shape.ic), "int8" if integer else "float32", name="w")
    widen = (lambda v: v.astype("int32")) if integer else (lambda v: v)
    xp = x
    if any(shape.padding):
        def pad(n, y, xx, c):
            inside = tirx.all(y >= top, y < shape.h + top, xx >= left, xx < shape.w + left)
            return tirx.if_then_else(inside, x[n, y - top, xx - left, c], zx[0])

        xp = te.compute(dims(shape.n, shape.h + top + bottom, shape.w + left + right, shape.ic), pad, name=PAD)
    rkh, rkw = te.reduce_axis(dims(0, shape.kh), "kh"), te.reduce_axis(dims(0, shape.kw), "kw")
    acc = te.compute(
        dims(shape.n, oh, ow, shape.oc),
        lambda n, y, xx, c: te.sum(
            widen(xp[n, y * sh + rkh * dh, xx * sw + rkw * dw, c]) * widen(w[rkh, rkw, c]),
            axis=[rkh, rkw]),
        name=ANCHOR)
    return te.create_prim_func([x, zx, w, acc])


def tile_for(out_width: int, channels: int) -> tuple[int, int]:
    """(P pixels, L lanes): measured best on mobilenet_v2's layers here (4 x 8 for wide
    rows, 7 x 8 for 14- and 7-wide ones)."""
    pixels = next(p for p in (4, 7, 2, 1) if out_width % p == 0)
    lanes = next(v for v in (8, 4, 2, 1) if channels % v == 0)
    return pixels, lanes


def schedule(sch: s_tir.Schedule, anchor, fuse_epilogue: Callable[[object], None] | None,
             tile: tuple[int, int] | None = None) -> bool:
    """Rows over the cores; per row, channel blocks of ``L`` lanes x tiles of ``P`` pixels
    accumulated in registers over the (unrolled) taps; ``fuse_epilogue(loop)`` computes the
    consumers per tile (None: the anchor writes the function's output, through a local
    copy).  False if ``tile`` does not divide this conv (``sch`` is then untouched)."""
    n, oh, ow, c, rkh, rkw = sch.get_loops(anchor)
    width, channels = int(sch.get(ow).extent), int(sch.get(c).extent)
    pixels, lanes = tile or tile_for(width, channels)
    if width % pixels or channels % lanes:
        return False
    if has_block(sch, PAD):
        # Taps read the input through the padding condition instead of a padded copy: the
        # copy cost more than the conv (float32 112x112x96 stride 2: 0.15 -> 0.06 ms, 56x56x144
        # 0.14 -> 0.05 ms, int8 0.068 -> 0.041 ms; Zen 4, AVX-512 and AVX2 code alike).
        sch.compute_inline(sch.get_sblock(PAD))
    c_o, c_i = sch.split(c, [None, lanes])
    ow_o, ow_i = sch.split(ow, [None, pixels])
    sch.reorder(n, oh, c_o, ow_o, rkh, rkw, ow_i, c_i)
    sch.parallel(sch.fuse(n, oh))
    if fuse_epilogue is None:
        out = sch.cache_write(anchor, 0, "local")
        sch.reverse_compute_at(out, ow_o)
        sch.vectorize(sch.split(sch.get_loops(out)[-1], [None, lanes])[1])
    else:
        sch.set_scope(anchor, 0, "local")  # one tile's accumulators, kept in registers
        fuse_epilogue(ow_o)
    sch.unroll(rkh)
    sch.unroll(rkw)
    sch.unroll(ow_i)
    sch.vectorize(c_i)
    init = sch.decompose_reduction(anchor, rkh)
    sch.vectorize(sch.get_loops(init)[-1])
    return True
