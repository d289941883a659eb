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
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.target import Target

from qcompile.kernels import depthwise_conv2d, float_conv2d, packed_conv2d
from qcompile.kernels.int8_dot import int8_dot_for

# Output-column vector lengths, best first: powers of two keep LLVM from scalarising
# (14 int32 lanes measured 1.8x slower than 4 on a 28x28 int8 conv here).
VEC_PREF = (16, 8, 4, 7, 2)


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
                                              self.tile)
                return sch if done else None
            if name.startswith(depthwise_conv2d.ANCHOR):
                fuse = (lambda loop: self._fuse_epilogue(sch, epilogue, loop)) if epilogue else None
                return sch if depthwise_conv2d.schedule(sch, anchor, fuse, self.tile) else None
            if name.startswith(float_conv2d.ANCHOR):
                fuse = lambda loop: self._fuse_epilogue(sch, epilogue, loop, float_conv2d.LANES)
                registers = float_conv2d.vector_registers(target)
                return sch if float_conv2d.schedule(sch, anchor, fuse, self.tile, registers=registers) else None
            elif kinds == "SSSSRRR" and "conv2d_nhwc" in name:
                tile_loop = self._conv_nhwc(sch, anchor, names[:names.index(name)], bool(epilogue))
            elif kinds == "SSSSRRR" and "conv2d" in name:
                tile_loop = self._conv(sch, anchor)
            elif kinds.endswith("SSR") and kinds.count("R") == 1 and "matmul" in name:
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
        loops = sch.get_loops(anchor)
        spatial, j, k = loops[:-2], loops[-2], loops[-1]
        vec = _largest_factor(int(sch.get(j).extent), (16, 8, 4, 2))
        j_o, j_i = sch.split(j, [None, vec])
        k_o, k_i = sch.split(k, [None, _largest_factor(int(sch.get(k).extent), (4, 2))])
        sch.reorder(*spatial, j_o, k_o, k_i, j_i)
        sch.parallel(sch.fuse(*spatial, j_o))
        sch.unroll(k_i)
        sch.vectorize(j_i)
        init = sch.decompose_reduction(anchor, k_o)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch.get_loops(anchor)[0]

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
