"""What the local CPU can execute, read from /proc/cpuinfo (not from CPUID).

Virtual machines often hide ISA extensions (AVX-512 on some AMD EPYC guests) while
CPUID still names a CPU model that has them; LLVM's host detection then picks an
``-mcpu`` whose code dies with SIGILL.  The kernel's flag list is what actually runs.

On x86 the ``-mcpu`` of ``native`` names the microarchitecture where it is known
(:func:`x86_mcpu`: Zen 4 and 5 by AMD family, Intel's AVX-512 server cores by model or AMX), so
that the kernels can size themselves for it -- e.g. the fp32 conv's 16-lane vectors on the
cores that run zmm code at full clock (:func:`qcompile.kernels.float_conv2d.vector_lanes`) -- and
only if every ISA extension LLVM enables for it is in the flag list; otherwise the ISA
level decides, as for any other CPU.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# LLVM feature name -> /proc/cpuinfo flag, for the features that matter to codegen.
X86_FEATURE_FLAGS = {
    "sse4.2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi2": "bmi2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512cd": "avx512cd",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512ifma": "avx512ifma",
    "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512vp2intersect": "avx512_vp2intersect",
    "avxvnni": "avx_vnni",
    "gfni": "gfni",
    "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
    "amx-fp16": "amx_fp16",  # tells Granite Rapids from Sapphire Rapids
}
AARCH64_FEATURE_FLAGS = {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve", "fullfp16": "fphp"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The kernel's CPU flag list (x86 'flags', aarch64 'Features'); empty if unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def required_features(target) -> list[str]:
    """ISA features (LLVM names) that code for ``target`` (a tvm Target) may use."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return []
    try:
        features = set(codegen.llvm_get_cpu_features(target))
    except Exception:  # noqa: BLE001 -- an -mcpu this LLVM does not know: nothing to check
        return []
    table = AARCH64_FEATURE_FLAGS if str(target.attrs.get("mtriple", "")).startswith("aarch64") else X86_FEATURE_FLAGS
    return sorted(f for f in features if f in table)


def missing_features(required: list[str], triple: str | None) -> list[str]:
    """Which of ``required`` this machine lacks (empty when the artifact can run here)."""
    flags = cpu_flags()
    if not flags or not required:
        return []
    table = AARCH64_FEATURE_FLAGS if (triple or "").startswith("aarch64") else X86_FEATURE_FLAGS
    return [f for f in required if f in table and table[f] not in flags]


def cpu_id(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, int, int] | None:
    """The first x86 CPU's (vendor_id, cpu family, model), or None where unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first CPU's block only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    try:
        return fields["vendor_id"], int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return None


# The AVX-512 set qcompile's AVX-512 kernels need (the int8 ones use VNNI): below it an
# AVX-512 -mcpu is not chosen at all.
X86_AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"})
# AMD cpu family -> -mcpu for its AVX-512 cores (family 25 without AVX-512 is Zen 3).
AMD_FAMILY_MCPU = {25: ("znver4",), 26: ("znver5",)}
# Intel family 6 model -> -mcpu for the AVX-512 server cores, newest first: an older core's
# where a hypervisor hides the newer extensions (AMX, AVX512-FP16).  Model 85 (Skylake-SP,
# Cascade/Cooper Lake) and the client cores get the generic choice below.
_ICX = ("icelake-server",)
_SPR = ("sapphirerapids", *_ICX)
INTEL_MODEL_MCPU = {106: _ICX, 108: _ICX, 143: _SPR, 207: ("emeraldrapids", *_SPR),
                    173: ("graniterapids", *_SPR), 174: ("graniterapids", *_SPR)}
# AMX exists only on Intel's server cores from Sapphire Rapids on, so a family-6 CPU that
# reports it is one of them whatever its model number: hypervisors may pass another (a
# 2-vCPU KVM guest with AMX and AVX512-FP16 reports model 167, a client core's number).
INTEL_AMX_MCPU = ("graniterapids", *_SPR)
GENERIC_AVX512_MCPU = "cascadelake"


def x86_mcpu(flags: set[str], ident: tuple[str, int, int] | None) -> str:
    """The LLVM ``-mcpu`` for an x86 CPU with the kernel flags ``flags`` and CPUID
    ``(vendor, family, model)``: its microarchitecture where it is known (by model, or for
    an Intel model not in the table by AMX, :data:`INTEL_AMX_MCPU`) and every extension LLVM
    enables for it is present (a hypervisor may hide some), else the ISA level (cascadelake
    for AVX-512 with VNNI, haswell for AVX2, nehalem, x86-64)."""
    if X86_AVX512_FLAGS <= flags:
        vendor, family, model = ident or ("", 0, 0)
        named: tuple[str, ...] = ()
        if vendor == "AuthenticAMD":
            named = AMD_FAMILY_MCPU.get(family, ())
        elif vendor == "GenuineIntel" and family == 6:
            named = INTEL_MODEL_MCPU.get(model, INTEL_AMX_MCPU if "amx_tile" in flags else ())
        return next((mcpu for mcpu in named if not _lacks(mcpu, flags)), GENERIC_AVX512_MCPU)
    if {"avx2", "fma", "bmi2"} <= flags:
        return "haswell"
    return "nehalem" if "sse4_2" in flags else "x86-64"


def _lacks(mcpu: str, flags: set[str]) -> list[str]:
    """The extensions (LLVM names) that LLVM enables for ``mcpu`` and ``flags`` lacks."""
    import tvm
    from tvm.target import codegen

    try:
        features = codegen.llvm_get_cpu_features(
            tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}))
    except Exception:  # noqa: BLE001 -- an -mcpu this LLVM does not know: not usable
        return [mcpu]
    return sorted(f for f in map(str, features) if f in X86_FEATURE_FLAGS and X86_FEATURE_FLAGS[f] not in flags)


def native_target() -> dict:
    """A TVM target dict for this machine, chosen from what the kernel says it runs."""
    flags = cpu_flags()
    cores = os.cpu_count() or 1
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        mcpu = x86_mcpu(flags, cpu_id())
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}
    if machine in ("aarch64", "arm64"):
        attrs = ["+neon"] + (["+dotprod"] if "asimddp" in flags else [])
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": attrs, "num-cores": cores}
    return {"kind": "llvm", "num-cores": cores}
