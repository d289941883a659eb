"""int8 dot-product tensor intrinsics and the choice of one per target.

Each intrinsic computes ``C[i] += sum_k int32(A[k]) * int32(B[i, k])`` for ``lanes`` output
channels i and 4 reduction elements k: one activation quad broadcast against a
``lanes x 4`` block of the packed weight, accumulated in ``lanes`` int32 lanes.

* ``vnni``: x86 AVX-512 VNNI ``vpdpbusd`` (u8 x s8, 16 lanes), exact.  TVM 0.27's own
  ``dot_16x4_vnni`` passes int32x16 operands that LLVM 22 rejects; this one passes the
  u8x64 / i8x64 vectors the instruction takes.
* ``avx2``: ``vpmaddubsw`` + ``vpmaddwd`` (u8 x s8, 8 lanes).  ``vpmaddubsw`` adds pairs of
  products into int16 with saturation, so it is exact only when every pair of weights
  keeps ``255 * (w0 + w1)`` within int16: true for 7-bit weights (``reduce_range``, as
  ONNX Runtime does on CPUs without VNNI); :func:`Int8Dot.exact_for` checks the weights.
* ``sdot``: aarch64 ``sdot`` (s8 x s8, 4 lanes, needs ``+dotprod``), exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


@dataclass(frozen=True)
class Int8Dot:
    """One dot-product intrinsic: its registered name and operand shapes."""

    name: str
    lanes: int  # output channels per instruction (the packed weight's inner block)
    activation_dtype: str  # uint8 for the x86 forms (u8 x s8), int8 for sdot
    pair_saturates: bool = False  # vpmaddubsw: int16 pair sums saturate

    def exact_for(self, packed_weight: np.ndarray) -> bool:
        """Whether the intrinsic computes exact int32 sums with this packed weight
        (shape ``(..., lanes, 4)``) for every activation of ``activation_dtype``."""
        if not self.pair_saturates:
            return True
        pairs = packed_weight.astype(np.int32).reshape(-1, 2)
        positive = np.maximum(pairs, 0).sum(axis=1) * 255
        negative = np.minimum(pairs, 0).sum(axis=1) * 255
        return bool(positive.max(initial=0) <= 32767 and negative.min(initial=0) >= -32768)


def _desc(lanes: int, a_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), a_dtype, offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _dot_accumulate_impl(lanes: int, a_dtype: str, llvm_intrinsic: str):
    """One instruction that takes the accumulators and adds the quad dot products:
    ``vpdpbusd`` (16 lanes, u8 x s8) and ``sdot`` (4 lanes, s8 x s8)."""
    quad, vec, acc = f"{a_dtype}x4", f"{a_dtype}x{4 * lanes}", f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), a_dtype, offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], quad), dtype="int32"), lanes), dtype=vec)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                C.vload([0], dtype=acc), a, B.vload([0, 0], dtype=f"int8x{4 * lanes}"), dtype=acc)

    return impl


@T.prim_func(s_tir=True)
def _avx2_impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
               C: T.Buffer((8,), "int32", offset_factor=1, scope="local")):
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8), dtype="uint8x32")
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                        a, B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")


VNNI = Int8Dot("qcompile_dot_16x4_u8i8_vnni", 16, "uint8")
AVX2 = Int8Dot("qcompile_dot_8x4_u8i8_avx2", 8, "uint8", pair_saturates=True)
SDOT = Int8Dot("qcompile_dot_4x4_i8i8_sdot", 4, "int8")

# TVM's intrinsic table is process-wide; override=True makes re-import harmless.
TensorIntrin.register(VNNI.name, _desc(16, "uint8"),
                      _dot_accumulate_impl(16, "uint8", "llvm.x86.avx512.vpdpbusd.512"), override=True)
TensorIntrin.register(AVX2.name, _desc(8, "uint8"), _avx2_impl, override=True)
TensorIntrin.register(SDOT.name, _desc(4, "int8"),
                      _dot_accumulate_impl(4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8"), override=True)


def cpu_features(target) -> set[str]:
    """LLVM's feature names for an llvm target (its -mcpu plus -mattr); empty if unknown."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return set()
    try:
        return set(codegen.llvm_get_cpu_features(target))
    except Exception:  # noqa: BLE001 (an -mcpu this LLVM does not know: assume nothing)
        return set()


def int8_dot_for(target) -> Int8Dot | None:
    """The best dot-product intrinsic the target's CPU has, or None."""
    features = cpu_features(target)
    triple = str(target.attrs.get("mtriple", "")) if target.kind.name == "llvm" else ""
    if triple.startswith("aarch64"):
        return SDOT if "dotprod" in features else None
    if "avx512vnni" in features and "avx512bw" in features:
        return VNNI
    if "avx2" in features:
        return AVX2
    return None
