"""What the local CPU can execute, read from /proc/cpuinfo (not from CPUID).

Virtual machines often hide ISA extensions (AVX-512 on some AMD EPYC guests) while
CPUID still names a CPU model that has them; LLVM's host detection then picks an
``-mcpu`` whose code dies with SIGILL.  The kernel's flag list is what actually runs.
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
    "avxvnni": "avx_vnni",
    "amx-int8": "amx_int8",
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
    except Exception:  # unknown -mcpu for this LLVM: nothing to check
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


def native_target() -> dict:
    """A TVM target dict for this machine, chosen from what the kernel says it runs."""
    flags = cpu_flags()
    cores = os.cpu_count() or 1
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags:
            mcpu = "cascadelake"
        elif {"avx2", "fma", "bmi2"} <= flags:
            mcpu = "haswell"
        elif "sse4_2" in flags:
            mcpu = "nehalem"
        else:
            mcpu = "x86-64"
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}
    if machine in ("aarch64", "arm64"):
        attrs = ["+neon"] + (["+dotprod"] if "asimddp" in flags else [])
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": attrs, "num-cores": cores}
    return {"kind": "llvm", "num-cores": cores}
