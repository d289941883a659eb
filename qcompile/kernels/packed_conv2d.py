"""int8 conv2d (NHWC) on a packed weight, tensorized with the target's dot-product instruction.

Layouts (``L`` = the intrinsic's lanes, ``C4`` = input channels rounded up to 4):

* weight ``W[OC, IC, KH, KW]`` is packed once, at compile time, to
  ``Wp[OC/L, KH, KW, C4/4, L, 4]``: one instruction's ``L x 4`` block is 4*L contiguous bytes.
  Leaving the weight in (OC, IC) order tensorizes but reads the wrong bytes (seen with TVM's
  own VNNI intrinsic), so the layout and the intrinsic are defined together here.
* the input is NHWC, so the 4 input channels of one quad are adjacent; where the conv pads
  (or C4 > IC) a padded copy is made first (block ``qc_pad``), filled with the input zero
  point -- a tensor argument, so the kernel does not change with the calibration.
* the int32 accumulator ``[N, OH, OW, OC/L, L]`` (block ``conv2d_int8_packed``) has the
  memory order of the NHWC output, which the fused requantize epilogue reads.

The schedule (:func:`schedule`) keeps a tile of ``P`` output pixels x ``O`` lane-groups of
accumulators in registers, reduces over (kh, kw, channel quads) with one intrinsic per
(pixel, lane-group) and computes the epilogue per tile, vectorized along the channels.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import s_tir, te, tirx

from qcompile.kernels.int8_dot import Int8Dot
from qcompile.kernels.registry import HandKernel, register

ANCHOR = "conv2d_int8_packed"
PAD = "qc_pad"


@dataclass(frozen=True)
class ConvShape:
    """A conv2d's static shape (NHWC input); ``groups`` > 1 for grouped convs (RegNet's,
    ResNeXt's; ``ic`` counts all input channels, see :func:`block_inputs`)."""

    n: int
    ic: int
    h: int
    w: int
    oc: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int = 1

    @property
    def folds_rows(self) -> bool:
        """Fewer than 4 input channels (an RGB stem): reduce over (kw, c) together, the
        ``KW * C`` adjacent bytes of an NHWC row, instead of padding C to 4."""
        return self.ic < 4 and self.dilation[1] == 1

    @property
    def out_hw(self) -> tuple[int, int]:
        top, left, bottom, right = self.padding
        oh = (self.h + top + bottom - (self.kh - 1) * self.dilation[0] - 1) // self.stride[0] + 1
        ow = (self.w + left + right - (self.kw - 1) * self.dilation[1] - 1) // self.stride[1] + 1
        return oh, ow


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def padded_width(out_width: int) -> int:
    """The output width the kernel computes: an odd width that 7 does not divide (13, 27, 55,
    111: inputs that are no multiple of 32, valid 3x3 convs, ceil-mode pools) one column
    wider, so that a 2- or 4-pixel register tile fits instead of single pixels; the extra
    column reads the zero point and is dropped."""
    if out_width > 2 and out_width % 2 and out_width % 7:
        return out_width + 1
    return out_width


def _right_padding(shape: ConvShape, out_width: int) -> int:
    """``shape``'s right padding, widened so that ``out_width`` columns read inside the input."""
    left, right = shape.padding[1], shape.padding[3]
    need = (out_width - 1) * shape.stride[1] + (shape.kw - 1) * shape.dilation[1] + 1
    return right + max(0, need - (shape.w + left + right))


def block_inputs(shape: ConvShape, lanes: int) -> int:
    """The input channels one block of ``lanes`` output channels reduces over: all of them
    (one group), its group's (groups of whole blocks), or those of the groups it holds (groups
    narrower than a block: RegNet's width 8 under 16 lanes reduces over 16 channels, half of
    each output channel's weights zero -- twice the multiply-adds, but on the dot-product
    tile, where TVM's grouped int8 conv ran regnet_y_400mf's at a few GMAC/s)."""
    if shape.groups == 1:
        return shape.ic
    group_in, group_out = shape.ic // shape.groups, shape.oc // shape.groups
    return group_in * max(1, lanes // group_out)


def fits_groups(shape: ConvShape, lanes: int) -> bool:
    """Whether the kernel computes the grouped conv ``shape``: whole blocks per group or
    whole groups per block, and blocks of whole channel quads."""
    if shape.oc % shape.groups or shape.ic % shape.groups or shape.oc % lanes:
        return False
    group_out = shape.oc // shape.groups
    return (group_out % lanes == 0 or lanes % group_out == 0) and block_inputs(shape, lanes) % 4 == 0


def _first_input(shape: ConvShape, lanes: int, block):
    """The first input channel that output block ``block`` reduces over (grouped convs)."""
    group_in, group_out = shape.ic // shape.groups, shape.oc // shape.groups
    if lanes % group_out == 0:  # whole groups per block: the blocks' input spans are adjacent
        return block * (lanes // group_out * group_in)
    return block // (group_out // lanes) * group_in


def pack_weight(weight: np.ndarray, lanes: int, fold_rows: bool = False, groups: int = 1) -> np.ndarray:
    """OIHW int8 -> (OC/L, KH, KW, C4/4, L, 4), zero-filled where OC or IC is padded;
    ``fold_rows`` (see ``ConvShape.folds_rows``): (OC/L, KH, R4/4, L, 4) over r = kw * C + c;
    ``groups`` > 1: the weight is [OC, IC / groups, KH, KW] and each block's C4 are its
    :func:`block_inputs`, zero outside each output channel's group."""
    if groups > 1:
        return _pack_grouped_weight(weight, lanes, groups)
    oc, ic, kh, kw = weight.shape
    if fold_rows:
        ocp, r4 = _round_up(oc, lanes), _round_up(kw * ic, 4)
        rows = np.zeros((ocp, kh, r4), np.int8)
        rows[:oc, :, :kw * ic] = weight.transpose(0, 2, 3, 1).reshape(oc, kh, kw * ic)
        return np.ascontiguousarray(rows.reshape(ocp // lanes, lanes, kh, r4 // 4, 4).transpose(0, 2, 3, 1, 4))
    ocp, icp = _round_up(oc, lanes), _round_up(ic, 4)
    padded = np.zeros((ocp, icp, kh, kw), np.int8)
    padded[:oc, :ic] = weight
    blocks = padded.reshape(ocp // lanes, lanes, icp // 4, 4, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 4, 5, 2, 1, 3))


def _pack_grouped_weight(weight: np.ndarray, lanes: int, groups: int) -> np.ndarray:
    oc, group_in, kh, kw = weight.shape
    shape = ConvShape(1, group_in * groups, 1, 1, oc, kh, kw, (1, 1), (0, 0, 0, 0), (1, 1), groups)
    span, group_out = block_inputs(shape, lanes), oc // groups
    dense = np.zeros((oc, span, kh, kw), np.int8)
    for o in range(oc):  # each output channel's weights at its group's place in its block's span
        start = o // group_out * group_in - _first_input(shape, lanes, o // lanes)
        dense[o, start:start + group_in] = weight[o]
    blocks = dense.reshape(oc // lanes, lanes, span // 4, 4, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 4, 5, 2, 1, 3))


def conv2d_func(shape: ConvShape, dot: Int8Dot) -> tirx.PrimFunc:
    """The kernel's compute definition: (x NHWC, zero point, packed weight) -> int32 NHWC;
    a grouped ``shape`` (:func:`fits_groups`) reduces each block over its
    :func:`block_inputs`."""
    lanes = dot.lanes
    icp, ocp = _round_up(shape.ic, 4), _round_up(shape.oc, lanes)
    if shape.groups > 1 and not fits_groups(shape, lanes):
        raise ValueError(f"grouped conv {shape} does not fit {lanes}-lane blocks of whole groups or whole quads")
    span = _round_up(block_inputs(shape, lanes), 4)  # icp for one group
    oh, ow = shape.out_hw
    owp = padded_width(ow)
    top, left, bottom = shape.padding[:3]
    right = _right_padding(shape, owp)
    hp, wp = shape.h + top + bottom, shape.w + left + right
    (sh, sw), (dh, dw) = shape.stride, shape.dilation

    def dims(*values: int) -> tuple:
        # int64 like LegalizeOps' kernels: FuseTIR maps buffers across kernels by type
        return tuple(tirx.IntImm("int64", v) for v in values)

    if shape.folds_rows:
        return _folded_conv2d_func(shape, dot, dims)
    x = te.placeholder(dims(shape.n, shape.h, shape.w, shape.ic), dot.activation_dtype, name="x")
    zx = te.placeholder(dims(1), dot.activation_dtype, name="zero_point")
    w = te.placeholder(dims(ocp // lanes, shape.kh, shape.kw, span // 4, lanes, 4), "int8", name="w")
    xp = x
    if any((top, left, bottom, right)) or icp != shape.ic:
        def pad(n, y, xx, c):
            inside = tirx.all(y >= top, y < shape.h + top, xx >= left, xx < shape.w + left, c < shape.ic)
            return tirx.if_then_else(inside, x[n, y - top, xx - left, tirx.min(c, shape.ic - 1)], zx[0])

        xp = te.compute(dims(shape.n, hp, wp, icp), pad, name=PAD)
    rkh, rkw = te.reduce_axis(dims(0, shape.kh), "kh"), te.reduce_axis(dims(0, shape.kw), "kw")
    rco, rci = te.reduce_axis(dims(0, span // 4), "ico"), te.reduce_axis(dims(0, 4), "ici")

    def channel(co, rco, rci):
        if shape.groups == 1:  # (the one-group kernels' TIR, and so their records, unchanged)
            return rco * 4 + rci
        return _first_input(shape, lanes, co) + rco * 4 + rci

    acc = te.compute(
        dims(shape.n, oh, owp, ocp // lanes, lanes),
        lambda n, y, xx, co, ci: te.sum(
            xp[n, y * sh + rkh * dh, xx * sw + rkw * dw, channel(co, rco, rci)].astype("int32")
            * w[co, rkh, rkw, rco, ci, rci].astype("int32"),
            axis=[rkh, rkw, rco, rci]),
        name=ANCHOR)
    out = te.compute(dims(shape.n, oh, ow, shape.oc), lambda n, y, xx, c: acc[n, y, xx, c // lanes, c % lanes],
                     name="qc_unpack")
    return te.create_prim_func([x, zx, w, out])


# (P, O) register tiles that `qcompile tune` measures for each packed conv (the default is
# `tile_for`'s); the fastest is committed as the kernel's record.
TILES = ((4, 2), (2, 4), (2, 2), (8, 1), (7, 1), (7, 2), (14, 1), (4, 1))
KERNEL = register(HandKernel("packed_conv2d", ANCHOR, TILES))


def _folded_conv2d_func(shape: ConvShape, dot: Int8Dot, dims) -> tirx.PrimFunc:
    """``conv2d_func`` for ``shape.folds_rows``: the padded input is viewed as rows of
    ``W * C`` bytes; output column ``ow`` reduces over ``R = KW * C`` bytes from
    ``ow * stride * C``, in quads (weights past R are zero; the row is padded so every quad
    reads inside it)."""
    lanes, c = dot.lanes, shape.ic
    ocp, r4 = _round_up(shape.oc, lanes), _round_up(shape.kw * c, 4)
    top, left, bottom, right = shape.padding
    hp, wp = shape.h + top + bottom, shape.w + left + right
    oh, ow = shape.out_hw
    owp = padded_width(ow)
    sh, sw = shape.stride
    row = max(wp * c, (owp - 1) * sw * c + r4)
    x = te.placeholder(dims(shape.n, shape.h, shape.w, c), dot.activation_dtype, name="x")
    zx = te.placeholder(dims(1), dot.activation_dtype, name="zero_point")
    w = te.placeholder(dims(ocp // lanes, shape.kh, r4 // 4, lanes, 4), "int8", name="w")

    def pad(n, y, j):
        col = tirx.floordiv(j, c)
        inside = tirx.all(y >= top, y < shape.h + top, col >= left, col < shape.w + left, j < wp * c)
        return tirx.if_then_else(inside, x[n, y - top, tirx.min(tirx.max(col - left, 0), shape.w - 1),
                                           tirx.floormod(j, c)], zx[0])

    xp = te.compute(dims(shape.n, hp, row), pad, name=PAD)
    rkh, rq, ri = (te.reduce_axis(dims(0, shape.kh), "kh"), te.reduce_axis(dims(0, r4 // 4), "rq"),
                   te.reduce_axis(dims(0, 4), "ri"))
    acc = te.compute(
        dims(shape.n, oh, owp, ocp // lanes, lanes),
        lambda n, y, xx, co, ci: te.sum(
            xp[n, y * sh + rkh * shape.dilation[0], xx * sw * c + rq * 4 + ri].astype("int32")
            * w[co, rkh, rq, ci, ri].astype("int32"),
            axis=[rkh, rq, ri]),
        name=ANCHOR)
    out = te.compute(dims(shape.n, oh, ow, shape.oc), lambda n, y, xx, o: acc[n, y, xx, o // lanes, o % lanes],
                     name="qc_unpack")
    return te.create_prim_func([x, zx, w, out])


def tile_for(out_width: int, lane_groups: int, chains: int = 8) -> tuple[int, int]:
    """(P pixels, O lane-groups) of accumulators per register tile.

    Eight accumulators (4 x 2, or 2 x 4 where 4 does not divide the width) leave room in 16
    vector registers for the weights, the broadcast activation and the intrinsic's
    temporaries; P must divide the output width (a partial tile cannot be tensorized).  On
    the 14-wide layers 2 x 4 measured 1.3-1.8x faster than 7 x 1 for 1x1 convs (mobilenet_v2
    64->384: 0.062 vs 0.112 ms, resnet18's 128->256 stride-2 shortcut: 0.060 vs 0.104 ms) and
    level for 3x3; 7-wide layers keep 7 x 1.  ``chains`` (:func:`dot_chains`) of 14 take
    7 x 2 first where it divides."""
    if chains >= 14 and out_width % 7 == 0 and lane_groups % 2 == 0:
        return 7, 2
    if out_width % 4 == 0:
        return 4, 2 if lane_groups % 2 == 0 else 1
    if out_width % 2 == 0:  # 3 groups where 2 does not divide them (1000 channels: 63 groups of 16)
        return 2, next(g for g in (4, 2, 3, 1) if lane_groups % g == 0)
    if out_width % 7 == 0:
        return 7, 1
    return 1, next(g for g in (4, 2, 3, 1) if lane_groups % g == 0)  # one pixel: independent chains


# LLVM -mcpu names of the x86 cores that run 512-bit FMAs and dot products at full rate, two
# per cycle: Zen 5 and Intel's server cores from Ice Lake-SP on (Zen 4 splits each in two
# halves).  At a latency of 4-5 cycles they need 10 independent accumulator chains to stay busy.
FULL_RATE_ZMM_CPUS = frozenset({"znver5", "icelake-server", "sapphirerapids", "emeraldrapids", "graniterapids"})


def avx512_core_in(target, cpus: frozenset[str]) -> bool:
    """Whether ``target`` is an LLVM CPU target with AVX-512 whose ``-mcpu`` is in ``cpus``."""
    from qcompile.kernels.int8_dot import cpu_features

    return (target.kind.name == "llvm" and str(target.attrs.get("mcpu", "")) in cpus
            and "avx512f" in cpu_features(target))


def dot_chains(target) -> int:
    """Independent accumulators the default tile aims for on ``target``: 14 (7 x 2) on the
    AVX-512 cores of :data:`FULL_RATE_ZMM_CPUS`, else 8.  Seeding on a 2-vCPU Xeon (family 6,
    AVX-512 VNNI and AMX), every tile measured and the 8-accumulator default kept unless
    another was 3% faster, picked 7 x 2 for 29 of resnet18's and mobilenet_v2's 40 int8 conv
    workloads; resnet18 int8 ran in 5.15 ms untuned vs 3.72 ms seeded there
    (benchmarks/latency.py)."""
    return 14 if avx512_core_in(target, FULL_RATE_ZMM_CPUS) else 8


def schedule(sch: s_tir.Schedule, anchor, dot: Int8Dot, fuse_epilogue: Callable[[object], None],
             tile: tuple[int, int] | None = None, chains: int = 8) -> bool:
    """Tile, tensorize and parallelise the packed conv in ``sch``; ``fuse_epilogue(loop)``
    moves the consumers into the tile loop (before tensorizing, which it must precede).
    ``tile``: (pixels, lane groups), default :func:`tile_for` for ``chains``
    (:func:`dot_chains`); False if it does not divide
    this conv's output (``sch`` is then untouched)."""
    n, oh, ow, co, ci, *reduction = sch.get_loops(anchor)  # (kh, kw, ico, ici) or (kh, rq, ri)
    width, lane_groups = int(sch.get(ow).extent), int(sch.get(co).extent)
    pixels, groups = tile or tile_for(width, lane_groups, chains)
    if width % pixels or lane_groups % groups:
        return False
    co_o, co_i = sch.split(co, [None, groups])
    ow_o, ow_i = sch.split(ow, [None, pixels])
    outer = (n, oh, co_o) if rows_outer(sch, anchor) else (n, co_o, oh)
    sch.reorder(*outer, ow_o, *reduction[:-1], co_i, ow_i, ci, reduction[-1])
    sch.parallel(sch.fuse(*outer))
    sch.set_scope(anchor, 0, "local")  # accumulators: compacted to one tile, kept in registers
    # (.., OC/L, L) -> (.., OC): the epilogue's index c // L, c % L becomes plain c, so its
    # channel vectors load straight from the accumulators instead of being scalarised
    sch.transform_layout(anchor, ("write", 0), lambda n_, y, x, co_, ci_: (n_, y, x, co_ * dot.lanes + ci_))
    fuse_epilogue(ow_o)
    init = sch.decompose_reduction(anchor, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ci, dot.name)
    sch.unroll(co_i)
    sch.unroll(ow_i)
    vectorize_pad(sch)
    return True


def rows_outer(sch: s_tir.Schedule, anchor) -> bool:
    """Whether to spread a conv's output rows over the cores rather than its output-channel
    blocks: rows where the input is at least as large as the weight (the early, wide layers),
    so that each core reads mostly the rows it wrote in the layer before; channel blocks
    where the weight is larger, so that each core reads only its blocks' weights.  Measured
    in one process, builds A/B, 20 interleaved rounds: int8 resnet18 0.95x and mobilenet_v2
    0.94x the latency of channel blocks everywhere; rows everywhere: 1.01x of this rule."""
    sizes = [(int(np.prod([int(d) for d in region.source.shape])), len(region.source.shape))
             for region in sch.get(anchor).reads]
    activation = max(size for size, ndim in sizes if ndim in (3, 4))  # (N, H, W, C) or folded rows
    weight = max(size for size, ndim in sizes if ndim in (5, 6))  # the packed weight
    return activation >= weight


def has_block(sch: s_tir.Schedule, name: str) -> bool:
    """Whether the function in ``sch`` has a top-level block called ``name`` (e.g. ``PAD``)."""
    return name in [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def vectorize_pad(sch: s_tir.Schedule, name: str = PAD) -> None:
    """Rows of the padded-input block ``name`` (if any) over the cores, channels in 32- or
    16-byte vectors: vectorizing all C at once (C = 96, 144 ...) measured 20x slower."""
    if not has_block(sch, name):
        return
    loops = sch.get_loops(sch.get_sblock(name))
    sch.parallel(sch.fuse(*loops[:2]))
    extent = int(sch.get(loops[-1]).extent)
    lanes = next((v for v in (32, 16, 8) if extent % v == 0), None)
    if lanes:
        sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
