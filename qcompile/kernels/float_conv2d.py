"""float32 conv2d (NHWC) on a weight packed into output-channel blocks.

The classic CPU direct convolution (TVM's old ``conv2d_NCHWc``, oneDNN's and MLAS's
NHWC kernels): the weight ``W[OC, IC, KH, KW]`` is packed once, at compile time, to
``Wp[OC/L, KH, KW, IC, L]`` so that one (kh, kw, ic) step reads ``L`` contiguous output
channels; a register tile of ``P`` output pixels x ``O`` blocks of ``L`` channels is
accumulated over (kh, kw, ic) with one broadcast of the input value per pixel and one FMA
per (pixel, block).  TVM's own conv2d, untuned or tuned by MetaSchedule within a CI budget,
ran resnet18 at about half of ONNX Runtime's speed here; this kernel's 3x3 layers measured
70-80 GMAC/s on 2 AVX2 cores (vs 42-46 before).

The vector width ``L`` follows the target's microarchitecture (:func:`vector_lanes`, read
from its ``-mcpu``, so a preset or an explicit ``-mcpu`` decides it and ``native`` names
the CPU it detects): 16 lanes (one zmm register per block) on AVX-512 cores that run zmm
code at full clock (:data:`WIDE_CPUS`): Zen 5 and Intel's server cores from Ice Lake on,
which execute 512-bit FMAs at full rate, and Zen 4, which splits each into two 256-bit
halves -- no more FMAs per cycle there, but one broadcast and one weight load feed 16
lanes, half the instructions per multiply-add of 8-lane code (resnet18 fp32 0.95x and
mobilenet_v2 0.94x the latency of the 8-lane build, 2-vCPU Zen 4, in-process A/B over 12
rounds).  8 lanes (one ymm register; two NEON registers) elsewhere: AVX2 and the generic
AVX-512 ``cascadelake``.  A conv whose output channels are not a
multiple of 16 falls back to 8 lanes unless padding it to one adds at most an eighth
(:func:`lanes_for`, :func:`padded_channels`).  On a 2-vCPU Zen 5 (AMD EPYC, family 26), one
thread, resnet18's and mobilenet_v2's convs ran at 120-130 GMAC/s with 16 lanes vs 60-65
with 8 (the single core's 512-bit and 256-bit FMA peaks at about 4 GHz).

The register budget decides the output width the kernel computes and its default tile:
AVX2 (and NEON, two registers per 8-lane block) has 16 eight-lane registers, AVX-512 (with
VL) 32 of either width -- enough for 7-pixel tiles over 2-4 blocks, so the 14- and 7-wide
layers need no padded columns there (see :func:`padded_width`).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import s_tir, te, tirx

from qcompile.kernels.packed_conv2d import (
    FULL_RATE_ZMM_CPUS,
    PAD,
    ConvShape,
    avx512_core_in,
    rows_outer,
    vectorize_pad,
)
from qcompile.kernels.registry import HandKernel, register

ANCHOR = "conv2d_float_packed"
LANES = 8  # output channels per block: one AVX2 register (two NEON registers)
WIDE_LANES = 16  # one AVX-512 register (see WIDE_CPUS)

# LLVM -mcpu names of the x86 cores the float kernel runs 16 lanes on: Zen 5 and Intel's server
# cores from Ice Lake-SP on (two full-width 512-bit FMA pipes) and Zen 4 (512-bit FMAs in
# two halves, at full clock: zmm code halves the instructions).  Not cascadelake /
# skylake-avx512: the generic AVX-512 choice (x86-avx512), and Xeons of that generation
# with one 512-bit FMA unit gain nothing from zmm code, which lowers their clock (why LLVM
# prefers 256-bit vectors there).
WIDE_CPUS = FULL_RATE_ZMM_CPUS | {"znver4"}

# (P, O) register tiles that `qcompile tune` measures (the default is `tile_for`'s); from
# (4, 4) on they need 32 registers (AVX-512): on AVX2 they spill and lose to the others.
# The 3-block tiles fit block counts with a factor 3 but not 2 (mobilenet_v2's 144 channels
# in 16-lane blocks, its 24 in 8-lane ones); 2 x 6 won on 1x1 layers with many more output
# than input channels (16 lanes, one Zen 5 core).
TILES = ((4, 2), (2, 4), (7, 1), (4, 1), (2, 2), (14, 1), (8, 1), (1, 4), (4, 4), (7, 2), (7, 4), (8, 2),
         (14, 2), (4, 3), (7, 3), (2, 6))
KERNEL = register(HandKernel("float_conv2d", ANCHOR, TILES))


def vector_registers(target) -> int:
    """How many vector registers of the kernel's width ``target``'s CPU has: 32 with
    AVX-512 (zmm, or with its VL extension ymm registers 16-31 too), else 16 (AVX2; NEON's
    32 128-bit registers are 16 pairs)."""
    from qcompile.kernels.int8_dot import cpu_features

    return 32 if "avx512f" in cpu_features(target) else 16


def vector_lanes(target) -> int:
    """Output channels per packed block for ``target``: :data:`WIDE_LANES` where its
    ``-mcpu`` is one of :data:`WIDE_CPUS` and AVX-512 is
    enabled, else :data:`LANES`.  Convs whose output channels 16 does not divide use 8
    (:func:`lanes_for`)."""
    return WIDE_LANES if avx512_core_in(target, WIDE_CPUS) else LANES


def lanes_for(out_channels: int, lanes: int) -> int:
    """The lanes a conv with ``out_channels`` runs at when the target's are ``lanes``: those
    where padding the channels to a multiple of them adds at most an eighth (1000 -> 1008,
    255 -> 256), else 8."""
    return lanes if padded_channels(out_channels, lanes) - out_channels <= out_channels // 8 else LANES


def padded_channels(out_channels: int, lanes: int) -> int:
    """The output channels the kernel computes: a whole number of ``lanes`` blocks (the
    extra ones have zero weights and are cropped; a detection head's 255 or a classifier
    conv's 1000 channels keep full vectors and a register tile instead of TVM's generic
    conv)."""
    return -(-out_channels // lanes) * lanes


def pack_weight(weight: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """OIHW float32 -> (OCp/L, KH, KW, IC, L), zero-filled past OC (:func:`padded_channels`)."""
    oc, ic, kh, kw = weight.shape
    ocp = padded_channels(oc, lanes)
    if ocp != oc:
        weight = np.concatenate([weight, np.zeros((ocp - oc, ic, kh, kw), weight.dtype)])
    return np.ascontiguousarray(weight.reshape(ocp // lanes, lanes, ic, kh, kw).transpose(0, 3, 4, 2, 1))


def padded_width(out_width: int, registers: int = 16) -> int:
    """The output width the kernel computes.  With 16 registers: rounded up to a multiple of
    4 (14 -> 16, 7 -> 8) so that the 4-pixel register tile always fits; the extra columns
    read zero padding and are dropped (7 x 1 tiles on the 14- and 7-wide layers ran at 45-55
    GMAC/s vs 70-80 on AVX2).  With 32 (AVX-512) a width that 4 or 7 divides stays: 7 x 2
    and 7 x 4 tiles fit and ran resnet18's 14-wide 3x3 conv at 110-112 GMAC/s vs 92 for the
    best 16-wide tile (counting real columns; 2-vCPU Zen 4); any other (13, 27, 55: inputs
    that are no multiple of 32, valid convs) goes up to the nearer multiple of 7 or 4, which
    costs a few columns where single-pixel tiles would cost most of the FMA rate."""
    if out_width % 4 == 0 or out_width < 4:
        return out_width
    if registers >= 32:
        if out_width % 7 == 0:
            return out_width
        return min((out_width + 6) // 7 * 7, (out_width + 3) // 4 * 4)
    return (out_width + 3) // 4 * 4


def conv2d_func(shape: ConvShape, lanes: int = LANES, registers: int = 16) -> tirx.PrimFunc:
    """The compute definition: (x NHWC, packed weight) -> float32 NHWC; zero padding;
    ``registers``: the target's (:func:`vector_registers`), which sets the computed width.
    A grouped conv (``shape.groups``; whole lane blocks per group) reduces each block over
    its group's input channels, its weight packed from ``[OC, IC / groups, KH, KW]``."""
    top, left, bottom, right = shape.padding
    oh, ow = shape.out_hw
    owp, ocp = padded_width(ow, registers), padded_channels(shape.oc, lanes)
    (sh, sw), (dh, dw) = shape.stride, shape.dilation
    right += max(0, (owp - 1) * sw + (shape.kw - 1) * dw + 1 - (shape.w + left + right))

    def dims(*values: int) -> tuple:
        return tuple(tirx.IntImm("int64", v) for v in values)  # int64 like LegalizeOps' kernels

    group_in, group_out = shape.ic // shape.groups, shape.oc // shape.groups
    if shape.groups > 1 and (ocp != shape.oc or group_out % lanes):
        raise ValueError(f"a grouped conv needs whole {lanes}-lane blocks per group, not {group_out} channels")
    x = te.placeholder(dims(shape.n, shape.h, shape.w, shape.ic), "float32", name="x")
    w = te.placeholder(dims(ocp // lanes, shape.kh, shape.kw, group_in, lanes), "float32", name="w")
    xp = x
    if any((top, left, bottom, right)):
        def pad(n, y, xx, c):
            inside = tirx.all(y >= top, y < shape.h + top, xx >= left, xx < shape.w + left)
            return tirx.if_then_else(inside, x[n, y - top, xx - left, c], tirx.const(0, "float32"))

        xp = te.compute(dims(shape.n, shape.h + top + bottom, shape.w + left + right, shape.ic), pad, name=PAD)
    rkh, rkw = te.reduce_axis(dims(0, shape.kh), "kh"), te.reduce_axis(dims(0, shape.kw), "kw")
    rc = te.reduce_axis(dims(0, group_in), "ic")

    def first_input(c):
        """The group's first input channel, from the lane block (one block lies in one group),
        so that it is the same for every lane of a vector."""
        if shape.groups == 1:
            return 0
        return c // lanes * lanes // group_out * group_in

    acc = te.compute(
        dims(shape.n, oh, owp, ocp),
        lambda n, y, xx, c: te.sum(
            xp[n, y * sh + rkh * dh, xx * sw + rkw * dw, first_input(c) + rc] * w[c // lanes, rkh, rkw, rc, c % lanes],
            axis=[rkh, rkw, rc]),
        name=ANCHOR)
    out = te.compute(dims(shape.n, oh, ow, shape.oc), lambda n, y, xx, c: acc[n, y, xx, c], name="qc_crop")
    return te.create_prim_func([x, w, out])


def tile_for(out_width: int, blocks: int, registers: int = 16, lanes: int = LANES) -> tuple[int, int]:
    """(P pixels, O channel blocks).  16 registers: 4 x 2 (8 accumulators) where it divides
    (always, but for outputs narrower than 4: see :func:`padded_width`) -- 7 x 2 spills the
    16 AVX2 registers and ran at half speed.  32 registers, 8 lanes: 4 x 4 or 7 x 4 (16 or
    28 accumulators; on resnet18's 3x3 layers 101-113 GMAC/s vs 88-105 for 4 x 2, Zen 4).
    32 registers, 16 lanes: 7 x 2 first (14 accumulators): 7 x 4 leaves too few registers
    for the 4 weight vectors and spills (resnet18's 7- and 14-wide 3x3 layers 79-109
    GMAC/s vs 124-129 for 7 x 2, one Zen 5 core); 4 x 4 and 8 x 2 measured the same as
    7 x 2 on the 56- and 28-wide layers.  Block counts with a factor 3 but not 2 (the 8- or
    16-lane blocks of 24 or 144 channels) take 4 x 3 / 7 x 3 with 32 registers (63-65
    GMAC/s vs 35 for 4 x 1 with 8 lanes, 111-121 vs 88 with 16; one Zen 5 core)."""
    if registers >= 32 and lanes >= WIDE_LANES:
        order = ((7, 2), (4, 4), (8, 2), (4, 3), (7, 3), (7, 1), (8, 1), (4, 2), (4, 1))
    elif registers >= 32:
        order = ((4, 4), (7, 4), (7, 2), (4, 2), (4, 3), (7, 3), (4, 1), (7, 1))
    else:
        order = ((4, 2), (4, 1), (7, 1))
    for pixels, groups in order:
        if out_width % pixels == 0 and blocks % groups == 0:
            return pixels, groups
    # Narrower outputs (3, 2 or 1 wide: the last stage of a CNN on a small input, a conv on a
    # pooled 1x1): more channel blocks per pixel, up to the accumulators the registers hold,
    # so that the FMAs are independent chains rather than one dependent chain.
    budget = 14 if registers >= 32 else 8
    for pixels in (3, 2, 1):
        if out_width % pixels == 0:
            return pixels, next(g for g in (8, 6, 4, 3, 2, 1) if blocks % g == 0 and pixels * g <= budget)
    return 1, 1


def packed_lanes(sch: s_tir.Schedule, anchor) -> int:
    """The lanes ``L`` of the packed weight ``(OC/L, KH, KW, IC, L)`` the conv reads: the
    schedule follows the function, so that a kernel built for 16 lanes is never scheduled
    for 8 (or the other way round)."""
    shapes = [region.source.shape for region in sch.get(anchor).reads]
    return int(next(shape for shape in shapes if len(shape) == 5)[-1])


def schedule(sch: s_tir.Schedule, anchor, fuse_epilogue: Callable[[object], None],
             tile: tuple[int, int] | None = None, registers: int = 16) -> bool:
    """Rows or channel blocks over the cores (``packed_conv2d.rows_outer``);
    per tile, accumulators in registers over (kh, kw, ic); ``fuse_epilogue(loop)`` computes
    the consumers (the crop, then any fused elementwise ops) per tile.  The lanes are the
    packed weight's (:func:`packed_lanes`).  False if ``tile`` does not divide this conv
    (``sch`` is then untouched)."""
    lanes = packed_lanes(sch, anchor)
    n, oh, ow, c, rkh, rkw, rc = sch.get_loops(anchor)
    width, blocks = int(sch.get(ow).extent), int(sch.get(c).extent) // lanes
    pixels, groups = tile or tile_for(width, blocks, registers, lanes)
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
