"""Default CPU schedules for kernels without a tuning record.

TVM 0.27's untuned CPU code runs conv2d and matmul as plain scalar loop nests on one
thread (dlight's CPU rules cover only GEMV and reductions), ~50-100x slower than a tuned
build.  This rule gives every fused kernel whose anchor is a conv2d (NCHW) or a matmul a
fixed, reasonable schedule: output rows spread over the cores, a register tile of output
channels x output columns accumulated in vector registers, the elementwise epilogue
(bias, requantize, residual add, activation) fused into the tile.  It never replaces a
tuning record: MetaSchedule's applied kernels are marked scheduled and skipped.
convs rewritten by :mod:`qcompile.passes.pack_conv` get the schedules of their kernels
instead (:mod:`qcompile.kernels`).

:class:`InjectiveCPU` schedules the kernels without a reduction (layout changes, concat,
quantize, gathers, elementwise chains that no conv took in): one loop nest with the
intermediate blocks inlined, instead of TVM's unscheduled form, which writes every
intermediate to a buffer in loops LLVM then unrolls and versions (squeezenet1_1's int8
``concat -> transpose -> quantize -> transpose`` kernel: 23.6 KB of code).

:class:`ReductionCPU` schedules the other reductions (LayerNorm, Softmax, sums, a tensor's
min/max): rows over the cores, partial results in vectors.
"""
from __future__ import annotations

import contextlib
import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.target import Target

from qcompile.kernels import (
    depthwise_conv2d,
    float_conv2d,
    packed_conv2d,
    winograd_conv2d,
)
from qcompile.kernels.int8_dot import int8_dot_for

# Output-column vector lengths, best first: powers of two keep LLVM from scalarising
# (14 int32 lanes measured 1.8x slower than 4 on a 28x28 int8 conv here).
VEC_PREF = (16, 8, 4, 7, 2)


# A matmul with fewer rows than this (all leading axes together) is a matrix-vector product
# (ConvMatmulCPU._gemv).
GEMV_ROWS = 4


def _largest_factor(extent: int, preferred: tuple[int, ...]) -> int:
    for factor in preferred:
        if factor <= extent and extent % factor == 0:
            return factor
    return 1


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(int(iv.iter_type) == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


class _CPURule(dl.ScheduleRule):
    """A dlight rule for LLVM (CPU) targets only."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    @staticmethod
    def applies(func, target: Target) -> bool:
        """Whether ``func`` is a PrimFunc built for a CPU (what every CPU rule checks first)."""
        return isinstance(func, tirx.PrimFunc) and target.kind.name == "llvm"


class ConvMatmulCPU(_CPURule):
    """A dlight rule for fused conv2d / matmul kernels on LLVM CPU targets.

    ``tile`` overrides the register tile of qcompile's own conv kernels (their ``TILES``,
    see :mod:`qcompile.kernels`); `qcompile tune` measures each and keeps the fastest."""

    def __init__(self, tile: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.tile = tile

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.applies(func, target):
            return None
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
        except s_tir.ScheduleError:  # no root block: e.g. a call_packed of an external sort (topk)
            return None
        anchors = [b for b in blocks if _is_reduction(sch, b)]
        if len(anchors) != 1:
            return None
        anchor = anchors[0]
        kinds = "".join("R" if int(iv.iter_type) == tirx.IterVar.CommReduce else "S"
                        for iv in sch.get(anchor).iter_vars)
        if len(sch.get_loops(anchor)) != len(kinds):
            return None
        name = sch.get(anchor).name_hint
        names = [sch.get(b).name_hint for b in blocks]  # block handles go stale as we schedule
        epilogue = names[names.index(name) + 1:]
        try:
            if name.startswith(packed_conv2d.ANCHOR):
                dot = int8_dot_for(target)
                if dot is None or int(sch.get(sch.get_loops(anchor)[4]).extent) != dot.lanes:
                    return None
                done = packed_conv2d.schedule(sch, anchor, dot,
                                              lambda loop: self._fuse_epilogue(sch, epilogue, loop, dot.lanes),
                                              self.tile, packed_conv2d.dot_chains(target))
                return sch if done else None
            if name.startswith(depthwise_conv2d.ANCHOR):
                fuse = (lambda loop: self._fuse_epilogue(sch, epilogue, loop)) if epilogue else None
                return sch if depthwise_conv2d.schedule(sch, anchor, fuse, self.tile) else None
            if name.startswith(winograd_conv2d.ANCHOR):
                registers = float_conv2d.vector_registers(target)
                return sch if winograd_conv2d.schedule(sch, anchor, epilogue, self.tile, registers) else None
            if name.startswith(float_conv2d.ANCHOR):
                fuse = lambda loop: self._fuse_epilogue(sch, epilogue, loop, float_conv2d.LANES)
                registers = float_conv2d.vector_registers(target)
                return sch if float_conv2d.schedule(sch, anchor, fuse, self.tile, registers=registers) else None
            elif kinds == "SSSSRRR" and "conv2d_nhwc" in name:
                tile_loop = self._conv_nhwc(sch, anchor, names[:names.index(name)], bool(epilogue))
            elif kinds == "SSSSRRR" and "conv2d" in name:
                tile_loop = self._conv(sch, anchor)
            elif kinds.endswith("SSR") and kinds.count("R") == 1 and "matmul" in name:
                for before in names[:names.index(name)]:
                    # elementwise producers (an attention mask the epilogue adds): into
                    # their consumers, so that the epilogue can move into the tile
                    with contextlib.suppress(s_tir.ScheduleError):
                        sch.compute_inline(sch.get_sblock(before))
                tile_loop = self._matmul(sch, anchor)
            elif kinds == "SSSSRR" and name.startswith("pool"):
                return self._pool_nhwc(sch, anchor, names[:names.index(name)], epilogue)
            else:
                return None
            self._fuse_epilogue(sch, epilogue, tile_loop)
        except s_tir.ScheduleError:
            return None  # an unusual fused pattern: leave it to TVM's default lowering
        return sch

    @staticmethod
    def _conv(sch: s_tir.Schedule, anchor):
        n, oc, oh, ow, ic, kh, kw = sch.get_loops(anchor)
        ow_extent, oc_extent = int(sch.get(ow).extent), int(sch.get(oc).extent)
        vec = _largest_factor(ow_extent, VEC_PREF)
        # Accumulators of one tile (oc_block x vec values) must fit the 16 vector registers.
        oc_block = _largest_factor(oc_extent, (4, 2) if vec > 8 else (8, 4, 2))
        oc_o, oc_i = sch.split(oc, [None, oc_block])
        ow_o, ow_i = sch.split(ow, [None, vec])
        sch.reorder(n, oc_o, oh, ow_o, ic, kh, kw, oc_i, ow_i)
        sch.parallel(sch.fuse(n, oc_o, oh))
        sch.unroll(oc_i)
        sch.vectorize(ow_i)
        init = sch.decompose_reduction(anchor, ic)
        sch.vectorize(sch.get_loops(init)[-1])
        return ow_o

    @staticmethod
    def _conv_nhwc(sch: s_tir.Schedule, anchor, before: list[str], has_epilogue: bool):
        """NHWC (weight HWIO, see qcompile.passes.pack_conv): a tile of output pixels x
        a vector of output channels, accumulated in registers."""
        n, oh, ow, oc, rh, rw, rc = sch.get_loops(anchor)
        pixels = _largest_factor(int(sch.get(ow).extent), (4, 7, 2))
        # pixels x vec/8 accumulators (+ weights, a broadcast) within 16 vector registers
        vec = _largest_factor(int(sch.get(oc).extent), (16, 8, 4, 2) if pixels <= 4 else (8, 4, 2))
        oc_o, oc_i = sch.split(oc, [None, vec])
        ow_o, ow_i = sch.split(ow, [None, pixels])
        # channel blocks outermost: one block's weights stay in cache across all rows
        sch.reorder(n, oc_o, oh, ow_o, rh, rw, rc, ow_i, oc_i)
        sch.parallel(sch.fuse(n, oc_o, oh))
        if has_epilogue:  # (a function's output buffer keeps its scope)
            sch.set_scope(anchor, 0, "local")
        sch.unroll(ow_i)
        sch.vectorize(oc_i)
        init = sch.decompose_reduction(anchor, rh)
        sch.vectorize(sch.get_loops(init)[-1])
        for name in before:  # the input's padding
            packed_conv2d.vectorize_pad(sch, name)
        return ow_o

    def _pool_nhwc(self, sch: s_tir.Schedule, anchor, before: list[str], after: list[str]) -> s_tir.Schedule | None:
        """A pooling window, made for NHWC (ConvertLayout makes pools NHWC, see
        qcompile.passes.pack_conv): rows over the cores, the last axis (channels) in vectors;
        TVM's default lowering ran resnet18's 112x112x64 max pool as scalar code on one core
        (0.4 ms vs 0.05).  An NCHW pool gets the same (valid) schedule, vectorized along its
        width.  An elementwise epilogue (the quantize of an int8 layer's input) is computed
        per output pixel from the pooled channels, which stay on the stack."""
        n, oh, ow, c, rh, rw = sch.get_loops(anchor)
        lanes = _largest_factor(int(sch.get(c).extent), (16, 8, 4))
        if lanes == 1:
            return None  # the last axis does not split into vectors: leave it to TVM
        for name in before:  # the input's padding (with the pool's identity value)
            sch.compute_inline(sch.get_sblock(name))
        c_o, c_i = sch.split(c, [None, lanes])
        sch.reorder(n, oh, ow, c_o, rh, rw, c_i)
        sch.parallel(sch.fuse(n, oh))
        sch.vectorize(c_i)
        if after:
            sch.set_scope(anchor, 0, "local")
            self._fuse_epilogue(sch, after, ow, lanes)
        init = sch.decompose_reduction(anchor, rh)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch

    @staticmethod
    def _matmul(sch: s_tir.Schedule, anchor):
        """A register tile of ``rows`` output rows x ``vectors`` output vectors, accumulated
        over the whole reduction (independent FMA chains: one chain per output vector runs
        at the FMA's latency, not its throughput), rows over the cores."""
        loops = sch.get_loops(anchor)
        spatial, i, j, k = loops[:-3], loops[-3], loops[-2], loops[-1]
        if math.prod(int(sch.get(loop).extent) for loop in (*spatial, i)) < GEMV_ROWS:
            return ConvMatmulCPU._gemv(sch, anchor)
        vec = _largest_factor(int(sch.get(j).extent), (16, 8, 4, 2))
        j_o, j_v = sch.split(j, [None, vec])
        vectors = _largest_factor(int(sch.get(j_o).extent), (2,))
        j_o, j_t = sch.split(j_o, [None, vectors])
        rows = _largest_factor(int(sch.get(i).extent), (6, 4, 3, 2) if vectors == 2 else (8, 6, 4, 2))
        i_o, i_t = sch.split(i, [None, rows])
        sch.reorder(*spatial, i_o, j_o, k, i_t, j_t, j_v)
        sch.parallel(sch.fuse(*spatial, i_o) if spatial else i_o)
        sch.unroll(i_t)
        sch.unroll(j_t)
        sch.vectorize(j_v)
        init = sch.decompose_reduction(anchor, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch.get_loops(anchor)[-5]

    @staticmethod
    def _gemv(sch: s_tir.Schedule, anchor):
        """A product with fewer than :data:`GEMV_ROWS` rows (a classifier on one image): no
        rows to share a weight vector between, so the work is split along the output columns
        instead, in chunks of up to 8 vectors accumulated over the whole reduction
        (independent FMA chains; each reduction step reads the chunk's contiguous weights),
        the chunks over the cores.  The row tile above ran shufflenet_v2's 1024 x 1000
        classifier on one core, one dependent FMA chain per vector: 0.35 ms of a 0.45 ms model."""
        loops = sch.get_loops(anchor)
        spatial, i, j, k = loops[:-3], loops[-3], loops[-2], loops[-1]
        vec = _largest_factor(int(sch.get(j).extent), (8, 4, 2))
        j_o, j_v = sch.split(j, [None, vec])
        vectors = _largest_factor(int(sch.get(j_o).extent), (8, 6, 5, 4, 3, 2))
        j_o, j_t = sch.split(j_o, [None, vectors])
        sch.reorder(*spatial, i, j_o, k, j_t, j_v)
        chunks = sch.fuse(*spatial, i, j_o)
        sch.parallel(chunks)
        sch.unroll(j_t)
        sch.vectorize(j_v)
        init = sch.decompose_reduction(anchor, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return chunks

    @staticmethod
    def _fuse_epilogue(sch: s_tir.Schedule, after: list[str], tile_loop, lanes: int | None = None) -> None:
        """Inline the elementwise chain ``after`` the anchor and compute it per tile,
        vectorized along its last axis (in ``lanes``-wide pieces where given: the packed
        accumulator's lane blocks, so that each vector reads one block)."""
        for name in after[:-1]:
            sch.compute_inline(sch.get_sblock(name))
        if after:
            last = sch.get_sblock(after[-1])
            sch.reverse_compute_at(last, tile_loop, preserve_unit_loops=True)
            inner = sch.get_loops(last)[-1]
            if lanes and int(sch.get(inner).extent) % lanes == 0:
                inner = sch.split(inner, [None, lanes])[1]
            sch.vectorize(inner)


# An injective kernel runs on several cores only from this many output elements: below it
# the parallel launch costs more than the loop (and adds a closure to the library).
PARALLEL_MIN_ELEMENTS = 1 << 15


class InjectiveCPU(_CPURule):
    """A dlight rule for CPU kernels without a reduction: every block inlined into the one
    that writes the output, its rows over the cores (large outputs only), the innermost axis
    in vectors where a vector width divides it.  A kernel that does not inline to one
    block (several outputs, an opaque block) is left to TVM's default lowering."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.applies(func, target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        try:
            infos = try_inline(sch, infos)
            if len(infos) != 1:
                return None
            block = infos[0].block_rv
            loops = sch.get_loops(block)
            if not loops:
                return None
            extents = [int(sch.get(loop).extent) for loop in loops]
            inner = loops[-1]
            lanes = _largest_factor(extents[-1], (16, 8, 4))
            if lanes > 1:
                inner = sch.split(inner, [None, lanes])[1]
            elif len(loops) > 2 and extents[-1] <= 4 and _largest_factor(extents[-2], (16, 8)) > 1:
                # a short last axis (the 3 channels of an image going NCHW -> NHWC): vectors
                # along the axis before it, which the input is contiguous in, the short axis
                # inside the vector loop's parent
                lanes = _largest_factor(extents[-2], (16, 8))
                outer_w, inner = sch.split(loops[-2], [None, lanes])
                sch.reorder(outer_w, loops[-1], inner)
                loops = [*loops[:-2], outer_w, loops[-1]]
            outer = loops[:-1] if len(loops) > 1 else []
            total = 1
            for extent in extents:
                total *= extent
            if outer and total >= PARALLEL_MIN_ELEMENTS:
                sch.parallel(sch.fuse(*outer))
            if lanes > 1:
                sch.vectorize(inner)
        except (s_tir.ScheduleError, TypeError, ValueError):
            return None  # symbolic extents or an unusual block: TVM's default lowering
        return sch


# Reductions accumulate partial results in vectors of this many lanes (widest first: 16
# float32 lanes fill a 512-bit register, and a 256-bit target splits them in two).
REDUCE_LANES = (16, 8, 4)
# A reduction of a whole tensor to one value is split into this many contiguous parts,
# reduced on the cores in parallel (the parts, not the threads: the thread count is the
# loading process's).
REDUCE_PARTS = (16, 8, 4, 2)
# Anchors ConvMatmulCPU schedules (or leaves to TVM on purpose).
_ANCHOR_NAMES = ("conv", "matmul", "dense", "pool")


class ReductionCPU(_CPURule):
    """A dlight rule for CPU kernels whose reductions have no conv/matmul anchor: LayerNorm,
    Softmax, sums and means over the last axes, a whole tensor's min/max (the range dynamic
    quantization measures at run time).

    TVM's default lowering runs them on one core, each sum a chain of dependent scalar adds
    that LLVM may not reorder (a MiniLM encoder's LayerNorm over 128x384 floats: 65 us).
    Here the rows (the leading spatial axes) go over the cores, every block of a row is
    computed under its row loop, and each reduction accumulates ``lanes`` partial results in
    one vector (``rfactor``), added up at the end of the row.  A whole-tensor reduction is
    split into contiguous parts over the cores first.  Kernels it cannot express that way
    (symbolic extents, blocks that do not share their rows) are left to TVM's default lowering."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.applies(func, target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or all(info.is_injective() for info in infos):
            return None
        if any(name in sch.get(info.block_rv).name_hint for info in infos for name in _ANCHOR_NAMES
               if not info.is_injective()):
            return None
        try:
            for info in infos:  # an elementwise boolean (softmax's isnan mask) into its consumer
                if info.is_injective() and sch.get(info.block_rv).writes[0].source.dtype == "bool":
                    sch.compute_inline(info.block_rv)
            infos = normalize_prim_func(sch)
            if not infos or _has_bool_buffer(sch, infos):
                return None
            if any(_rows_of(sch, info) == 1 for info in infos if not info.is_injective()):
                return self._whole(sch, infos)
            if _column_axis(sch, infos) is not None:
                return self._columns(sch, infos)
            return self._rows(sch, infos)
        except (s_tir.ScheduleError, TypeError, ValueError):
            return None

    @staticmethod
    def _whole(sch: s_tir.Schedule, infos) -> s_tir.Schedule | None:
        """One reduction of every axis (after inlining its elementwise prologue)."""
        infos = try_inline(sch, infos)
        reductions = [info for info in infos if not info.is_injective()]
        if len(reductions) != 1 or any(info.dom_kind() for info in infos if info.is_injective()):
            return None  # several reductions, or an epilogue over a tensor
        block = reductions[0].block_rv
        kind = reductions[0].dom_kind()
        loops = sch.get_loops(block)[len(kind) - kind.count("R"):]  # after the unit spatial loops
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        extent = int(sch.get(fused).extent)
        lanes = _largest_factor(extent, REDUCE_LANES)
        if lanes == 1 or extent == lanes:
            return None
        parts = _largest_factor(extent // lanes, REDUCE_PARTS) if extent >= PARALLEL_MIN_ELEMENTS else 1
        if parts > 1:
            part, middle, lane = sch.split(fused, [parts, None, lanes])
            sch.reorder(part, lane, middle)
            partial = sch.rfactor(sch.fuse(part, lane), factor_axis=0)
            part_lane, middle = sch.get_loops(partial)[-2:]
            part, lane = sch.split(part_lane, [parts, lanes])
            sch.reorder(part, middle, lane)
            sch.parallel(part)
        else:
            middle, lane = sch.split(fused, [None, lanes])
            partial = sch.rfactor(lane, factor_axis=0)
            middle = sch.get_loops(partial)[-2]
        sch.vectorize(sch.get_loops(partial)[-1])
        init = sch.decompose_reduction(partial, middle)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch

    @staticmethod
    def _columns(sch: s_tir.Schedule, infos) -> s_tir.Schedule | None:
        """One reduction whose input's innermost axis is a spatial one (a global pooling in
        NHWC: the mean over H and W, channels last).  As rows, each channel would be one
        scalar chain reading elements a row apart; here the leading axes and blocks of
        ``lanes`` channels go over the cores and every reduction step adds one vector of
        contiguous channels.  The elementwise epilogue follows each block of channels."""
        axis = _column_axis(sch, infos)
        infos = try_inline(sch, infos)
        if not infos or infos[0].is_injective() or any(not info.is_injective() for info in infos[1:]):
            return None  # a prologue that stays a block, or several reductions
        block = infos[0].block_rv
        kind = infos[0].dom_kind()
        loops = sch.get_loops(block)
        spatial, reduce = loops[:len(kind) - kind.count("R")], loops[len(kind) - kind.count("R"):]
        extent = int(sch.get(spatial[axis]).extent)
        lanes = _largest_factor(extent, REDUCE_LANES)
        if lanes == 1:
            return None
        others = [loop for i, loop in enumerate(spatial) if i != axis]
        block_of_lanes, lane = sch.split(spatial[axis], [None, lanes])
        sch.reorder(*others, block_of_lanes, *reduce, lane)
        outer = sch.fuse(*others, block_of_lanes)
        total = 1
        for loop in sch.get_loops(block):
            total *= int(sch.get(loop).extent)
        if total >= PARALLEL_MIN_ELEMENTS // 4:
            sch.parallel(outer)
        sch.vectorize(lane)
        init = sch.decompose_reduction(block, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])
        for info in infos[1:]:
            epilogue = sch.get_sblock(sch.get(info.block_rv).name_hint)
            sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
            _vectorize_inner(sch, epilogue)
        return sch

    @staticmethod
    def _rows(sch: s_tir.Schedule, infos) -> s_tir.Schedule | None:
        """Blocks that share their leading spatial axes (the rows), each reduction over its
        trailing axes."""
        kinds = [info.dom_kind() for info in infos]
        if any(not kind or kind[0] != "S" for kind in kinds):
            return None
        if any("S" in kind.lstrip("S") for kind, info in zip(kinds, infos) if not info.is_injective()):
            return None  # a reduction over a middle axis
        rows = min(len(kind) - len(kind.lstrip("S")) for kind in kinds)
        names = [sch.get(info.block_rv).name_hint for info in infos]
        partials: list[str] = []
        for info, kind in zip(infos, kinds):
            if info.is_injective():
                continue
            loops = sch.get_loops(info.block_rv)
            reduce_loops = loops[len(kind) - kind.count("R"):]
            fused = sch.fuse(*reduce_loops) if len(reduce_loops) > 1 else reduce_loops[0]
            extent = int(sch.get(fused).extent)
            lanes = _largest_factor(extent, REDUCE_LANES)
            if lanes == 1 or extent == lanes:
                continue  # a short row: its scalar chain is cheap
            _, lane = sch.split(fused, [None, lanes])
            # the lanes as the partial buffer's last axis: one vector store per row step
            axis = len(sch.get(info.block_rv).writes[0].source.shape)
            partials.append(sch.get(sch.rfactor(lane, factor_axis=axis)).name_hint)
        last = sch.get_sblock(names[-1])
        loops = sch.get_loops(last)
        row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        total = 1
        for loop in sch.get_loops(last):
            total *= int(sch.get(loop).extent)
        if total >= PARALLEL_MIN_ELEMENTS // 4:
            sch.parallel(row)
        order = list(names[:-1])
        for name in partials:  # each partial block runs before the block it was factored from
            order.insert(order.index(name[:-len("_rf")]) if name[:-len("_rf")] in order else len(order), name)
        for name in reversed(order):
            sch.compute_at(sch.get_sblock(name), row, preserve_unit_loops=True)
        for name in order + [names[-1]]:
            block = sch.get_sblock(name)
            if name in partials:
                # compute_at made one loop per block variable, in their order: the lanes
                # (rfactor's new variable) first, the row's unit loops, the reduction last
                below = sch.get_loops(block)[1:]
                lane, steps = below[0], below[-1]
                sch.reorder(steps, lane)
                sch.vectorize(lane)
                init = sch.decompose_reduction(block, steps)
                sch.vectorize(sch.get_loops(init)[-1])
            elif _is_reduction(sch, block):
                continue  # the sum of a row's partial results, or a short row
            else:
                _vectorize_inner(sch, block)
        return sch


def _column_axis(sch: s_tir.Schedule, infos) -> int | None:
    """For a kernel with one reduction whose input's innermost index is one of its spatial
    variables (a reduction over middle axes) of a length vectors divide, that variable's
    position among the spatial ones; else None."""
    reductions = [info for info in infos if not info.is_injective()]
    if len(reductions) != 1:
        return None
    block = sch.get(reductions[0].block_rv)
    spatial = [iv for iv in block.iter_vars if int(iv.iter_type) == tirx.IterVar.DataPar]
    written = {region.source.name for region in block.writes}
    reads = [region for region in block.reads if region.source.name not in written]
    if len(reads) != 1 or not reads[0].region:
        return None
    innermost = reads[0].region[-1].min
    for i, iv in enumerate(spatial):
        if innermost.same_as(iv.var):
            extent = iv.dom.extent
            return i if isinstance(extent, tirx.IntImm) and _largest_factor(int(extent), REDUCE_LANES) > 1 else None
    return None


def _rows_of(sch: s_tir.Schedule, info) -> int:
    """How many rows (the product of the spatial loop extents) a reduction block has."""
    kind = info.dom_kind()
    rows = 1
    for loop in sch.get_loops(info.block_rv)[:len(kind) - kind.count("R")]:
        rows *= int(sch.get(loop).extent)
    return rows


def _vectorize_inner(sch: s_tir.Schedule, block) -> None:
    """The innermost loop of an elementwise block under a row loop in vectors, where a vector
    width divides it (never the row loop itself: the row's reductions run under it)."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    extent = int(sch.get(loops[-1]).extent)
    lanes = _largest_factor(extent, REDUCE_LANES)
    if lanes > 1:
        sch.vectorize(sch.split(loops[-1], [None, lanes])[1] if extent > lanes else loops[-1])


def _has_bool_buffer(sch: s_tir.Schedule, infos) -> bool:
    """Whether a kernel's blocks read or write booleans (TVM's vectorizer emits stores of
    i8 vectors to them, which LLVM rejects: such a kernel keeps TVM's default lowering)."""
    for info in infos:
        block = sch.get(info.block_rv)
        if any(region.source.dtype == "bool" for region in list(block.reads) + list(block.writes)):
            return True
    return False
