"""This CPU's measured compute peaks: fp32 FMA and int8 dot-product multiply-accumulates per second.

Each peak kernel is compiled with TVM for the target and run here over the thread pool: one
parallel task per thread, each running independent accumulator chains held in vector registers
(16; 12 where there are only 16 vector registers, still enough for a 4-cycle FMA on 2 pipes).  The
inner loop has no loads or stores, so it measures the execution units, not the caches.  The fp32
kernel is one ``llvm.fma`` per chain and step, as wide as the target's vectors (``vfmadd*ps zmm``
on AVX-512, ``ymm`` on AVX2, NEON ``fmla`` on aarch64); the int8 kernel runs the dot-product
instruction qcompile's int8 conv uses on the target (:func:`qcompile.kernels.int8_dot.int8_dot_for`:
``vpdpbusd zmm``, AVX2's ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``, or aarch64 ``sdot``); a
target without one has no int8 peak.  :func:`peak_assembly` returns the kernels' assembly, to
check what runs.  A peak is the best of ``repeat`` timed calls (TVM's time evaluator): on a
shared machine the other calls read low.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from qcompile.errors import ConfigError

CHAINS = 16  # independent accumulators per thread where there are 32 vector registers
NARROW_CHAINS = 12  # with 16 (x86 without AVX-512): the accumulators and operands must fit
STEPS = 1 << 18  # loop trips per call: about 0.5 ms at 150 GMAC/s per thread (short: fits between other processes)
FP32_ENTRY = "qc_peak_fp32_fma"
INT8_ENTRY = "qc_peak_int8_dot"


@dataclass(frozen=True)
class Peak:
    """One measured peak: ``gmacs`` billion multiply-accumulates per second over all threads."""

    gmacs: float
    instruction: str  # what the inner loop runs, e.g. "vfmadd*ps zmm"
    macs_per_step: int  # multiply-accumulates one chain adds per loop step
    chains: int  # independent accumulators per thread

    def to_json(self) -> dict[str, Any]:
        return {"gmacs": round(self.gmacs, 2), "instruction": self.instruction, "macs_per_step": self.macs_per_step,
                "chains": self.chains}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Peak:
        return cls(float(obj["gmacs"]), str(obj["instruction"]), int(obj["macs_per_step"]), int(obj["chains"]))


@dataclass(frozen=True)
class Peaks:
    """The fp32 and int8 peaks of ``target`` over ``threads`` threads; ``int8`` is None where the
    target has no dot-product instruction (``int8_note`` says why)."""

    target: str
    threads: int
    fp32: Peak
    int8: Peak | None
    int8_note: str = ""

    @property
    def fp32_gmacs(self) -> float:
        return self.fp32.gmacs

    @property
    def int8_gmacs(self) -> float | None:
        return self.int8.gmacs if self.int8 is not None else None

    def for_dtype(self, dtype: str) -> Peak | None:
        """The peak that bounds a model computing in ``dtype`` (``float32`` or ``int8``)."""
        return self.fp32 if dtype in ("fp32", "float32") else self.int8 if dtype in ("int8", "uint8") else None

    def fraction(self, macs: int, seconds: float, dtype: str) -> float | None:
        """The share of the ``dtype`` peak that ``macs`` multiply-accumulates in ``seconds`` reach."""
        peak = self.for_dtype(dtype)
        if peak is None or seconds <= 0 or peak.gmacs <= 0:
            return None
        return macs / seconds / (peak.gmacs * 1e9)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "threads": self.threads, "fp32": self.fp32.to_json(),
                "int8": self.int8.to_json() if self.int8 is not None else None, "int8_note": self.int8_note}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Peaks:
        int8 = obj.get("int8")
        return cls(str(obj["target"]), int(obj["threads"]), Peak.from_json(obj["fp32"]),
                   Peak.from_json(int8) if int8 else None, str(obj.get("int8_note", "")))

    def to_text(self) -> str:
        lines = [f"measured peaks, {self.target}, {self.threads} threads:",
                 f"  fp32 {self.fp32.gmacs:8.1f} GMAC/s  ({self.fp32.instruction})"]
        if self.int8 is not None:
            lines.append(f"  int8 {self.int8.gmacs:8.1f} GMAC/s  ({self.int8.instruction}; "
                         f"{self.int8.gmacs / self.fp32.gmacs:.2f}x fp32)")
        else:
            lines.append(f"  int8        -          ({self.int8_note})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Isa:
    """What the peak kernels run on one target."""

    fp32_lanes: int
    fp32_instruction: str
    chains: int
    dot: Any  # qcompile.kernels.int8_dot.Int8Dot | None
    int8_instruction: str | None
    int8_note: str


def _isa(target) -> _Isa:
    from qcompile.kernels.int8_dot import AVX2, SDOT, VNNI, cpu_features, int8_dot_for

    features = cpu_features(target)
    aarch64 = str(target.attrs.get("mtriple", "")).startswith("aarch64")
    if aarch64:
        lanes, fp32 = 4, "fmla v.4s"
    elif "avx512f" in features:
        lanes, fp32 = 16, "vfmadd*ps zmm"
    elif "avx2" in features or "avx" in features:
        lanes, fp32 = 8, "vfmadd*ps ymm" if "fma" in features else "vmulps + vaddps ymm"
    else:
        lanes, fp32 = 4, "mulps + addps xmm"
    dot = int8_dot_for(target)
    instruction = {VNNI.name: "vpdpbusd zmm", AVX2.name: "vpmaddubsw + vpmaddwd + vpaddd ymm",
                   SDOT.name: "sdot v.4s"}.get(dot.name) if dot is not None else None
    note = "" if dot is not None else ("no dotprod on this aarch64 target" if aarch64
                                       else "no AVX2 or VNNI dot-product instruction on this target")
    chains = CHAINS if aarch64 or "avx512f" in features else NARROW_CHAINS
    return _Isa(lanes, fp32, chains, dot, instruction, note)


def _fp32_kernel(threads: int, lanes: int, chains: int, steps: int):
    """``chains`` independent ``acc = fma(acc, x, y)`` chains of ``lanes`` floats per thread.
    The accumulators live in two small buffers (each under TVM's 1 KiB stack-allocation limit,
    so they become registers, not a heap workspace)."""
    from tvm.script import tirx as T

    half = chains // 2
    vec = f"float32x{lanes}"
    fma = f"llvm.fma.v{lanes}f32"

    @T.prim_func
    def kernel(A: T.Buffer((threads, chains * lanes), "float32"), X: T.Buffer((2 * lanes,), "float32"),
               C: T.Buffer((threads, chains * lanes), "float32")):
        T.func_attr({"global_symbol": FP32_ENTRY, "tir.noalias": True})
        for t in T.parallel(threads):
            lo = T.alloc_buffer((half,), vec, scope="global")
            hi = T.alloc_buffer((half,), vec, scope="global")
            xy = T.alloc_buffer((2,), vec, scope="global")
            xy[0] = X[T.ramp(0, 1, lanes)]
            xy[1] = X[T.ramp(lanes, 1, lanes)]
            for c in T.unroll(half):
                lo[c] = A[t, T.ramp(c * lanes, 1, lanes)]
                hi[c] = A[t, T.ramp((half + c) * lanes, 1, lanes)]
            for _ in T.serial(steps):
                for c in T.unroll(half):
                    lo[c] = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(fma), lo[c], xy[0], xy[1], dtype=vec)
                    hi[c] = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(fma), hi[c], xy[0], xy[1], dtype=vec)
            for c in T.unroll(half):
                C[t, T.ramp(c * lanes, 1, lanes)] = lo[c]
                C[t, T.ramp((half + c) * lanes, 1, lanes)] = hi[c]

    return kernel


def _dot_kernel(threads: int, lanes: int, a_dtype: str, llvm_intrinsic: str, chains: int, steps: int):
    """``chains`` independent ``acc = dot(acc, a, b)`` chains (``vpdpbusd``, ``sdot``: one
    instruction that takes the accumulator) of ``lanes`` int32 lanes, 4 products per lane."""
    from tvm.script import tirx as T

    half = chains // 2
    acc, ops, wts = f"int32x{lanes}", f"{a_dtype}x{4 * lanes}", f"int8x{4 * lanes}"

    @T.prim_func
    def kernel(A: T.Buffer((threads, chains * lanes), "int32"), X: T.Buffer((4 * lanes,), a_dtype),
               W: T.Buffer((4 * lanes,), "int8"), C: T.Buffer((threads, chains * lanes), "int32")):
        T.func_attr({"global_symbol": INT8_ENTRY, "tir.noalias": True})
        for t in T.parallel(threads):
            lo = T.alloc_buffer((half,), acc, scope="global")
            hi = T.alloc_buffer((half,), acc, scope="global")
            x = T.alloc_buffer((1,), ops, scope="global")
            w = T.alloc_buffer((1,), wts, scope="global")
            x[0] = X[T.ramp(0, 1, 4 * lanes)]
            w[0] = W[T.ramp(0, 1, 4 * lanes)]
            for c in T.unroll(half):
                lo[c] = A[t, T.ramp(c * lanes, 1, lanes)]
                hi[c] = A[t, T.ramp((half + c) * lanes, 1, lanes)]
            for _ in T.serial(steps):
                for c in T.unroll(half):
                    lo[c] = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm_intrinsic), lo[c], x[0], w[0],
                                                    dtype=acc)
                    hi[c] = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm_intrinsic), hi[c], x[0], w[0],
                                                    dtype=acc)
            for c in T.unroll(half):
                C[t, T.ramp(c * lanes, 1, lanes)] = lo[c]
                C[t, T.ramp((half + c) * lanes, 1, lanes)] = hi[c]

    return kernel


def _avx2_kernel(threads: int, chains: int, steps: int):
    """AVX2's u8 x s8 dot product as qcompile's int8 conv runs it without VNNI:
    ``acc += vpmaddwd(vpmaddubsw(a, w), 1)``, 8 int32 lanes.  ``a`` is the accumulator's own
    bytes, so the products depend on the chain and cannot be hoisted out of the loop."""
    from tvm.script import tirx as T

    half = chains // 2

    @T.prim_func
    def kernel(A: T.Buffer((threads, chains * 8), "int32"), X: T.Buffer((32,), "uint8"),
               W: T.Buffer((32,), "int8"), C: T.Buffer((threads, chains * 8), "int32")):
        T.func_attr({"global_symbol": INT8_ENTRY, "tir.noalias": True})
        for t in T.parallel(threads):
            lo = T.alloc_buffer((half,), "int32x8", scope="global")
            hi = T.alloc_buffer((half,), "int32x8", scope="global")
            w = T.alloc_buffer((1,), "int8x32", scope="global")
            w[0] = W[T.ramp(0, 1, 32)]
            for c in T.unroll(half):
                lo[c] = A[t, T.ramp(c * 8, 1, 8)] + T.reinterpret(X[T.ramp(0, 1, 32)], dtype="int32x8")
                hi[c] = A[t, T.ramp((half + c) * 8, 1, 8)]
            for _ in T.serial(steps):
                for c in T.unroll(half):
                    lo[c] = lo[c] + T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                        T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                                T.reinterpret(lo[c], dtype="uint8x32"), w[0], dtype="int16x16"),
                        T.int16x16(1), dtype="int32x8")
                    hi[c] = hi[c] + T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                        T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                                T.reinterpret(hi[c], dtype="uint8x32"), w[0], dtype="int16x16"),
                        T.int16x16(1), dtype="int32x8")
            for c in T.unroll(half):
                C[t, T.ramp(c * 8, 1, 8)] = lo[c]
                C[t, T.ramp((half + c) * 8, 1, 8)] = hi[c]

    return kernel


def _int8_kernel(isa: _Isa, threads: int, chains: int, steps: int):
    from qcompile.kernels.int8_dot import AVX2, SDOT, VNNI

    if isa.dot is None:
        return None
    if isa.dot.name == VNNI.name:
        return _dot_kernel(threads, 16, "uint8", "llvm.x86.avx512.vpdpbusd.512", chains, steps)
    if isa.dot.name == SDOT.name:
        return _dot_kernel(threads, 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", chains, steps)
    if isa.dot.name == AVX2.name:
        return _avx2_kernel(threads, chains, steps)
    return None


def _tvm_target(target):
    from qcompile.target import resolve_target

    if isinstance(target, str):
        spec = resolve_target(target)
        if spec.kind != "llvm":
            raise ConfigError(f"peaks are measured on CPU targets; {target!r} is {spec.kind}")
        return spec.to_tvm(), spec.name
    return target, str(target.attrs.get("mcpu", "") or target.kind.name)


def _pool_threads() -> int:
    import tvm

    return int(tvm.runtime.num_threads())


def build_peak_kernels(target="native", threads: int | None = None, steps: int = STEPS):
    """The compiled peak kernels for ``target`` (entries ``qc_peak_fp32_fma`` and, where the
    target has a dot product, ``qc_peak_int8_dot``), with what they run."""
    import tvm

    tvm_target, _ = _tvm_target(target)
    threads = threads or _pool_threads()
    isa = _isa(tvm_target)
    chains = isa.chains
    funcs = {FP32_ENTRY: _fp32_kernel(threads, isa.fp32_lanes, chains, steps)}
    int8 = _int8_kernel(isa, threads, chains, steps)
    if int8 is not None:
        funcs[INT8_ENTRY] = int8
    return tvm.tirx.build(tvm.IRModule(funcs), target=tvm_target), isa, threads


def peak_assembly(target="native") -> str:
    """The peak kernels' assembly for ``target`` (to check their inner loops)."""
    lib, _, _ = build_peak_kernels(target, threads=1, steps=64)
    module = lib.mod if hasattr(lib, "mod") else lib
    return module.inspect_source("asm")


def _check_runs_here(tvm_target) -> None:
    triple = str(tvm_target.attrs.get("mtriple", ""))
    if triple and not triple.startswith(platform.machine()):
        raise ConfigError(f"peaks are measured on this machine ({platform.machine()}); the target is {triple}")
    from qcompile.target.hostcpu import cpu_flags, missing_features, required_features

    if cpu_flags():
        missing = missing_features(required_features(tvm_target), triple)
        if missing:
            raise ConfigError(f"this CPU lacks {', '.join(missing)}, which the target uses: measure with --target native")


def measure_peaks(target="native", threads: int | None = None, repeat: int = 100) -> Peaks:
    """Measure the fp32 FMA and int8 dot-product peaks (GMAC/s over ``threads`` threads;
    default: TVM's thread pool, ``TVM_NUM_THREADS``) of this CPU with ``target``'s code."""
    import numpy as np
    import tvm

    if repeat < 1:
        raise ConfigError(f"repeat must be >= 1, got {repeat}")
    tvm_target, name = _tvm_target(target)
    _check_runs_here(tvm_target)
    pool = _pool_threads()
    if threads is not None and not 1 <= threads <= pool:
        raise ConfigError(f"threads={threads}: TVM's thread pool here has {pool} threads "
                          f"(set TVM_NUM_THREADS before starting Python to change it)")
    lib, isa, threads = build_peak_kernels(tvm_target, threads)
    dev = tvm.cpu(0)

    def best_seconds(entry: str, *arrays) -> float:
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        lib[entry](*args)  # warm-up: thread pool started, code paged in
        timer = lib.time_evaluator(entry, dev, number=1, repeat=repeat)
        return min(timer(*args).results)

    chains = isa.chains
    width = chains * isa.fp32_lanes
    seconds = best_seconds(FP32_ENTRY, np.zeros((threads, width), "float32"), np.full(2 * isa.fp32_lanes, 1e-7, "float32"),
                           np.zeros((threads, width), "float32"))
    fp32 = Peak(threads * chains * STEPS * isa.fp32_lanes / seconds / 1e9, isa.fp32_instruction, isa.fp32_lanes, chains)
    int8 = None
    if isa.dot is not None:
        lanes = isa.dot.lanes
        width = chains * lanes
        seconds = best_seconds(INT8_ENTRY, np.zeros((threads, width), "int32"), np.ones(4 * lanes, isa.dot.activation_dtype),
                               np.ones(4 * lanes, "int8"), np.zeros((threads, width), "int32"))
        int8 = Peak(threads * chains * STEPS * 4 * lanes / seconds / 1e9, isa.int8_instruction, 4 * lanes, chains)
    return Peaks(name, threads, fp32, int8, isa.int8_note)
