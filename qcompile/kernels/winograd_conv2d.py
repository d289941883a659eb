"""float32 3x3 conv2d (NHWC, stride 1) by Winograd's minimal filtering, F(2x2, 3x3).

Each 2x2 block of output pixels is computed from the 4x4 input patch around it: the patch
is transformed (``V = Bt d B``), multiplied elementwise with the transformed weight
(``U = G g Gt``, computed at compile time) and summed over the input channels, and the
product is transformed back (``Y = At M A``).  The sum over input channels is, for each of
the 16 patch positions, a matrix product (tiles x IC) x (IC x OC): 16 multiply-adds per 4
outputs per channel pair where the direct conv does 36 -- 2.25x fewer -- on the same
register tile as :mod:`qcompile.kernels.float_conv2d` (``P`` tiles x ``O`` blocks of ``L``
output channels, the transformed weight packed ``(4, 4, OC/L, IC, L)``).  This is the
choice of NNPACK, ncnn, oneDNN and TVM's old ARM and CUDA schedules for 3x3 convs; the
transforms' extra rounding (adds and halvings of the inputs and weights) keeps float32
results within ~1e-6 of the direct conv's.

A conv takes this kernel where :func:`applies`: 3x3, stride 1, no dilation, one group,
enough channels and pixels for the products to dominate the transforms.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tvm import s_tir, te, tirx

from qcompile.kernels.float_conv2d import padded_channels, tile_for
from qcompile.kernels.packed_conv2d import ConvShape, has_block
from qcompile.kernels.registry import HandKernel, register

ANCHOR = "conv2d_float_winograd"
INPUT = "qc_winograd_input"
OUTPUT = "qc_winograd_output"
PAD = "qc_winograd_pad"

# F(2x2, 3x3)'s transforms (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks").
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)

# Fewest input and output channels for the kernel: below them the transforms and their
# intermediates (16 x tiles x channels, in and out) cost as much as the multiply-adds they
# save.  16 channels in measured slower inside models than the direct kernel (squeezenet1_1
# at 96x96, 23x23 16->64: the model 7% slower; a U-Net's 16-channel 64x64 layers 4%), though
# faster alone, with the conv's data hot in cache.
MIN_CHANNELS = 32
# Smallest output height and width: a 7x7 output (ResNet's last stage) stays on the direct
# kernel, where 4x4 tiles would waste a quarter of the products and the transformed weight
# (16/9 of the bytes) would grow resnet18's library from 54 to 76 MB for ~10% on those layers
# (`qcompile bench --profile`, 2-vCPU Zen 5).
MIN_OUTPUT = 8

TILES = ((7, 2), (4, 4), (8, 2), (4, 3), (7, 1), (4, 2), (14, 1), (2, 4), (4, 1), (7, 3))
KERNEL = register(HandKernel("winograd_conv2d", ANCHOR, TILES))


def applies(shape: ConvShape) -> bool:
    """Whether ``shape`` runs on this kernel: 3x3, stride 1, no dilation, one group, at least
    :data:`MIN_CHANNELS` in and out and an output of at least :data:`MIN_OUTPUT` square."""
    oh, ow = shape.out_hw
    return ((shape.kh, shape.kw) == (3, 3) and shape.stride == (1, 1) and shape.dilation == (1, 1)
            and shape.groups == 1 and min(shape.ic, shape.oc) >= MIN_CHANNELS and min(oh, ow) >= MIN_OUTPUT)


def tiles(shape: ConvShape) -> tuple[int, int]:
    """Rows and columns of 2x2 output tiles (an odd output's last tile half used)."""
    oh, ow = shape.out_hw
    return -(-oh // 2), -(-ow // 2)


def pack_weight(weight: np.ndarray, lanes: int) -> np.ndarray:
    """OIHW float32 3x3 -> ``U = G g Gt`` as (4, 4, OCp/L, IC, L), zero past OC."""
    oc, ic = weight.shape[:2]
    ocp = padded_channels(oc, lanes)
    u = np.einsum("ai,ocij,bj->abco", G, weight.astype(np.float64), G)  # (4, 4, IC, OC)
    u = np.concatenate([u, np.zeros((4, 4, ic, ocp - oc))], axis=3) if ocp != oc else u
    return np.ascontiguousarray(u.reshape(4, 4, ic, ocp // lanes, lanes).transpose(0, 1, 3, 2, 4), np.float32)


def _combine(matrix: np.ndarray, row, term):
    """``sum_k matrix[row, k] * term(k)`` for a symbolic ``row``: a Select over the rows,
    each a sum of the terms with nonzero coefficient (all +-1), so that once ``row`` is an
    unrolled constant the Selects fold away and only the adds remain."""
    def row_sum(r: int):
        expr = None
        for k, coeff in enumerate(matrix[r]):
            if coeff == 0:
                continue
            value = term(k)
            expr = value if expr is None and coeff > 0 else (-value if expr is None else
                                                             (expr + value if coeff > 0 else expr - value))
        return expr

    expr = row_sum(matrix.shape[0] - 1)
    for r in range(matrix.shape[0] - 2, -1, -1):
        expr = tirx.Select(row == r, row_sum(r), expr)
    return expr


def conv2d_func(shape: ConvShape, lanes: int) -> tirx.PrimFunc:
    """(x NHWC, transformed weight) -> float32 NHWC: the padded input, its transform
    ``V[4, 4, T, IC]`` over the ``T = N * TH * TW`` tiles, the products ``M[4, 4, T, OCp]``
    (the anchor) and the output transform, cropped to the conv's output."""
    top, left, _, _ = shape.padding
    oh, ow = shape.out_hw
    th, tw = tiles(shape)
    ocp = padded_channels(shape.oc, lanes)

    def dims(*values: int) -> tuple:
        return tuple(tirx.IntImm("int64", v) for v in values)

    x = te.placeholder(dims(shape.n, shape.h, shape.w, shape.ic), "float32", name="x")
    u = te.placeholder(dims(4, 4, ocp // lanes, shape.ic, lanes), "float32", name="w")

    def pad(n, y, xx, c):
        inside = tirx.all(y >= top, y < shape.h + top, xx >= left, xx < shape.w + left)
        return tirx.if_then_else(inside, x[n, y - top, xx - left, c], tirx.const(0, "float32"))

    xp = te.compute(dims(shape.n, 2 * th + 2, 2 * tw + 2, shape.ic), pad, name=PAD)
    count = shape.n * th * tw  # tiles, flat: a register tile's pixels span rows and images

    def patch(t, i, j, c):
        return xp[t // (th * tw), t // tw % th * 2 + i, t % tw * 2 + j, c]

    v = te.compute(
        dims(4, 4, count, shape.ic),
        lambda a, b, t, c: _combine(BT, a, lambda i: _combine(BT, b, lambda j: patch(t, i, j, c))),
        name=INPUT)
    rc = te.reduce_axis(dims(0, shape.ic), "ic")
    m = te.compute(
        dims(4, 4, count, ocp),
        lambda a, b, t, o: te.sum(v[a, b, t, rc] * u[a, b, o // lanes, rc, o % lanes], axis=[rc]),
        name=ANCHOR)
    out = te.compute(
        dims(shape.n, oh, ow, shape.oc),
        lambda n, y, xx, o: _combine(AT, y % 2, lambda a: _combine(
            AT, xx % 2, lambda b: m[a, b, (n * th + y // 2) * tw + xx // 2, o])),
        name=OUTPUT)
    return te.create_prim_func([x, u, out])


def schedule(sch: s_tir.Schedule, anchor, epilogue: Sequence[str], tile: tuple[int, int] | None = None,
             registers: int = 32) -> bool:
    """Schedule the three stages in ``sch``: the input transform per tile over the cores
    (channels in vectors, the 16 positions unrolled); the products per (position, channel
    block group) over the cores, a register tile of ``P`` tiles x ``O`` blocks accumulated over
    the input channels; the output transform with ``epilogue`` (the fused elementwise ops
    after it, by block name) inlined, 2x2 pixels per step, channels in vectors.  False if
    ``tile`` does not divide this conv (``sch`` is then untouched)."""
    lanes = int(next(r.source.shape for r in sch.get(anchor).reads if len(r.source.shape) == 5)[-1])
    a, b, t, o, rc = sch.get_loops(anchor)
    count, blocks = int(sch.get(t).extent), int(sch.get(o).extent) // lanes
    pixels, groups = tile or tile_for(count, blocks, registers, lanes)
    if count % pixels or blocks % groups:
        return False
    # products: (position, block group) over the cores, tiles x blocks in registers
    t_o, t_i = sch.split(t, [None, pixels])
    co, ci = sch.split(o, [None, lanes])
    co_o, co_i = sch.split(co, [None, groups])
    sch.reorder(a, b, co_o, t_o, rc, t_i, co_i, ci)
    sch.parallel(sch.fuse(a, b, co_o))
    acc = sch.cache_write(anchor, 0, "local")
    sch.reverse_compute_at(acc, t_o, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(ci)
    init = sch.decompose_reduction(anchor, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(co_i)
    sch.unroll(t_i)
    # input transform: the padding inlined, one tile's 16 positions per channel vector
    if has_block(sch, PAD):
        sch.compute_inline(sch.get_sblock(PAD))
    block = sch.get_sblock(INPUT)
    a, b, t, c = sch.get_loops(block)
    c_o, c_i = sch.split(c, [None, _vector(int(sch.get(c).extent))])
    sch.reorder(t, c_o, a, b, c_i)
    sch.parallel(t)
    sch.unroll(a)
    sch.unroll(b)
    sch.vectorize(c_i)
    # output transform and epilogue: one block, 2x2 pixels per step
    for name in epilogue[:-1]:
        sch.compute_inline(sch.get_sblock(name))
    last = sch.get_sblock(epilogue[-1])
    n, y, xx, c = sch.get_loops(last)
    y_o, y_i = sch.split(y, [None, 2])
    x_o, x_i = sch.split(xx, [None, 2])
    c_o, c_i = sch.split(c, [None, _vector(int(sch.get(c).extent))])
    sch.reorder(n, y_o, x_o, c_o, y_i, x_i, c_i)
    sch.parallel(sch.fuse(n, y_o))
    sch.unroll(y_i)
    sch.unroll(x_i)
    sch.vectorize(c_i)
    return True


def _vector(extent: int) -> int:
    """The widest vector (16, 8, 4 floats) that divides ``extent``, else 1."""
    return next((v for v in (16, 8, 4) if extent % v == 0), 1)

