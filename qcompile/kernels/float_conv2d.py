"""float32 conv2d (NHWC) on a weight packed into output-channel blocks.

The classic CPU direct convolution (TVM's old ``conv2d_NCHWc``, oneDNN's and MLAS's
NHWC kernels): the weight ``W[OC, IC, KH, KW]`` is packed once, at compile time, to
``Wp[OC/L, KH, KW, IC, L]`` so that one (kh, kw, ic) step reads ``L`` contiguous output
channels; a register tile of ``P`` output pixels x ``O`` blocks of ``L`` channels is
accumulated over (kh, kw, ic) with one broadcast of the input value per pixel and one FMA
per (pixel, block).  TVM's own conv2d, untuned or tuned by MetaSchedule within a CI budget,
ran resnet18 at about half of ONNX Runtime's speed here; this kernel's 3x3 layers measured
70-80 GMAC/s on 2 AVX2 cores (vs 42-46 before).

The register budget decides the output width the kernel computes and its default tile:
AVX2 (and NEON, two registers per 8-lane block) has 16 eight-lane registers, AVX-512 (with
VL) 32 -- enough for 7-pixel tiles over 2-4 blocks, so the 14- and 7-wide layers need no
padded columns there (see :func:`padded_width`).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import s_tir, te, tirx

from qcompile.kernels.packed_conv2d import PAD, ConvShape, rows_outer, vectorize_pad
from qcompile.kernels.registry import HandKernel, register

ANCHOR = "conv2d_float_packed"
LANES = 8  # output channels per block: one AVX2 register (two NEON registers)

# (P, O) register tiles that `qcompile tune` measures (the default is `tile_for`'s); the
# last four need 32 registers (AVX-512): on AVX2 they spill and lose to the others.
TILES = ((4, 2), (2, 4), (7, 1), (4, 1), (2, 2), (14, 1), (8, 1), (1, 4), (4, 4), (7, 2), (7, 4), (8, 2))
KERNEL = register(HandKernel("float_conv2d", ANCHOR, TILES))


def vector_registers(target) -> int:
    """How many ``LANES``-wide vector registers ``target``'s CPU has: 32 with AVX-512 (its
    VL extension gives 256-bit code registers 16-31), else 16 (AVX2; NEON's 32 128-bit
    registers are 16 pairs)."""
    from qcompile.kernels.int8_dot import cpu_features

    return 32 if "avx512f" in cpu_features(target) else 16


def pack_weight(weight: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """OIHW float32 -> (OC/L, KH, KW, IC, L); OC must be a multiple of ``lanes``."""
    oc, ic, kh, kw = weight.shape
    if oc % lanes:
        raise ValueError(f"float conv2d: {oc} output channels is not a multiple of {lanes}")
    return np.ascontiguousarray(weight.reshape(oc // lanes, lanes, ic, kh, kw).transpose(0, 3, 4, 2, 1))


def padded_width(out_width: int, registers: int = 16) -> int:
    """The output width the kernel computes.  With 16 registers: rounded up to a multiple of
    4 (14 -> 16, 7 -> 8) so that the 4-pixel register tile always fits; the extra columns
    read zero padding and are dropped (7 x 1 tiles on the 14- and 7-wide layers ran at 45-55
    GMAC/s vs 70-80 on AVX2).  With 32 (AVX-512) the width itself: 7 x 2 and 7 x 4 tiles fit
    and ran resnet18's 14-wide 3x3 conv at 110-112 GMAC/s vs 92 for the best 16-wide tile
    (counting real columns; 2-vCPU Zen 4)."""
    if registers >= 32 or out_width % 4 == 0 or out_width < 4:
        return out_width
    return (out_width + 3) // 4 * 4


def conv2d_func(shape: ConvShape, lanes: int = LANES, registers: int = 16) -> tirx.PrimFunc:
    """The compute definition: (x NHWC, packed weight) -> float32 NHWC; zero padding;
    ``registers``: the target's (:func:`vector_registers`), which sets the computed width."""
    top, left, bottom, right = shape.padding
    oh, ow = shape.out_hw
    owp = padded_width(ow, registers)
    (sh, sw), (dh, dw) = shape.stride, shape.dilation
    right += max(0, (owp - 1) * sw + (shape.kw - 1) * dw + 1 - (shape.w + left + right))

    def dims(*values: int) -> tuple:
        return tuple(tirx.IntImm("int64", v) for v in values)  # int64 like LegalizeOps' kernels

    x = te.placeholder(dims(shape.n, shape.h, shape.w, shape.ic), "float32", name="x")
    w = te.placeholder(dims(shape.oc // lanes, shape.kh, shape.kw, shape.ic, lanes), "float32", name="w")
    xp = x
    if any((top, left, bottom, right)):
        def pad(n, y, xx, c):
            inside = tirx.all(y >= top, y < shape.h + top, xx >= left, xx < shape.w + left)
            return tirx.if_then_else(inside, x[n, y - top, xx - left, c], tirx.const(0, "float32"))

        xp = te.compute(dims(shape.n, shape.h + top + bottom, shape.w + left + right, shape.ic), pad, name=PAD)
    rkh, rkw = te.reduce_axis(dims(0, shape.kh), "kh"), te.reduce_axis(dims(0, shape.kw), "kw")
    rc = te.reduce_axis(dims(0, shape.ic), "ic")
    acc = te.compute(
        dims(shape.n, oh, owp, shape.oc),
        lambda n, y, xx, c: te.sum(
            xp[n, y * sh + rkh * dh, xx * sw + rkw * dw, rc] * w[c // lanes, rkh, rkw, rc, c % lanes],
            axis=[rkh, rkw, rc]),
        name=ANCHOR)
    out = te.compute(dims(shape.n, oh, ow, shape.oc), lambda n, y, xx, c: acc[n, y, xx, c], name="qc_crop")
    return te.create_prim_func([x, w, out])


def tile_for(out_width: int, blocks: int, registers: int = 16) -> tuple[int, int]:
    """(P pixels, O channel blocks).  16 registers: 4 x 2 (8 accumulators) where it divides
    (always, but for outputs narrower than 4: see :func:`padded_width`) -- 7 x 2 spills the
    16 AVX2 registers and ran at half speed.  32: 4 x 4 or 7 x 4 (16 or 28 accumulators;
    on resnet18's 3x3 layers 101-113 GMAC/s vs 88-105 for 4 x 2, Zen 4)."""
    wide = ((4, 4), (7, 4), (7, 2)) if registers >= 32 else ()
    for pixels, groups in (*wide, (4, 2), (4, 1), (7, 1), (2, 2), (2, 1), (1, 1)):
        if out_width % pixels == 0 and blocks % groups == 0:
            return pixels, groups
    return 1, 1


def schedule(sch: s_tir.Schedule, anchor, fuse_epilogue: Callable[[object], None],
             tile: tuple[int, int] | None = None, lanes: int = LANES, registers: int = 16) -> bool:
    """Rows or channel blocks over the cores (``packed_conv2d.rows_outer``);
    per tile, accumulators in registers over (kh, kw, ic); ``fuse_epilogue(loop)`` computes
    the consumers (the crop, then any fused elementwise ops) per tile.  False if ``tile``
    does not divide this conv (``sch`` is then untouched)."""
    n, oh, ow, c, rkh, rkw, rc = sch.get_loops(anchor)
    width, blocks = int(sch.get(ow).extent), int(sch.get(c).extent) // lanes
    pixels, groups = tile or tile_for(width, blocks, registers)
    if width % pixels or blocks % groups or int(sch.get(c).extent) % lanes:
        return False
    co, ci = sch.split(c, [None, lanes])
    co_o, co_i = sch.split(co, [None, groups])
    ow_o, ow_i = sch.split(ow, [None, pixels])
    outer = (n, oh, co_o) if rows_outer(sch, anchor) else (n, co_o, oh)
    sch.reorder(*outer, ow_o, rkh, rkw, rc, ow_i, co_i, ci)
    sch.parallel(sch.fuse(*outer))
    sch.set_scope(anchor, 0, "local")  # one tile's accumulators, kept in registers
    fuse_epilogue(ow_o)  # at least the crop to the real output width
    sch.vectorize(ci)
    init = sch.decompose_reduction(anchor, rkh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(co_i)
    sch.unroll(ow_i)
    vectorize_pad(sch)
    return True
