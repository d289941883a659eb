"""What a benchmark result was measured on, and where it is written.

``machine_info()`` goes into every result JSON (and its first line into the Markdown table):
CPU model and family, the CPU flags that decide which kernels run, CPU and thread counts,
the git commit and the date.  ``results_dir(save)`` is ``out/benchmarks/`` (ignored by git)
unless ``--save`` asks for ``benchmarks/results/``, the results the README quotes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAVED = REPO / "benchmarks" / "results"
SCRATCH = REPO / "out" / "benchmarks"

# Flags that change which kernels qcompile (and its peers) run: x86 and aarch64 names as
# /proc/cpuinfo spells them.
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
         "avx512_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "sve", "hypervisor")


def add_save_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save", action="store_true",
                        help=f"write the results into {SAVED.relative_to(REPO)}/ (default: "
                             f"{SCRATCH.relative_to(REPO)}/)")


def results_dir(save: bool) -> Path:
    """Where a run writes: benchmarks/results/ with --save, else out/benchmarks/."""
    path = SAVED if save else SCRATCH
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if "flags" in fields or "Features" in fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info(threads: int | None = None) -> dict:
    """The machine, build and moment a result belongs to."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commit = _git("rev-parse", "HEAD")
    dirty = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return {
        "cpu": {
            "model": info.get("model name") or info.get("CPU part") or platform.processor() or None,
            "vendor": info.get("vendor_id") or info.get("CPU implementer"),
            "family": info.get("cpu family") or info.get("CPU architecture"),
            "model_number": info.get("model") or info.get("CPU variant"),
            "flags": [f for f in FLAGS if f in flags],
            "machine": platform.machine(),
            "cpus_available": cpus,
            "cpus_total": os.cpu_count(),
        },
        "threads": threads,
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe(machine: dict) -> str:
    """One line for a Markdown result: CPU, flags, threads, commit, date."""
    cpu = machine["cpu"]
    family = f", family {cpu['family']} model {cpu['model_number']}" if cpu.get("family") else ""
    commit = (machine.get("git_commit") or "unknown")[:10] + (" (modified)" if machine.get("git_dirty") else "")
    return (f"CPU: {cpu.get('model') or cpu['machine']}{family}; flags: {' '.join(cpu['flags']) or '-'}; "
            f"{cpu['cpus_available']} CPUs available, {machine.get('threads')} threads; "
            f"commit {commit}; {machine['date']}")


def run_and_write(stem: str, description: str, run, to_markdown, threads: int) -> None:
    """The main of an accuracy benchmark: ``--save``, ``report = run()`` with the machine
    record added, ``STEM.json`` and ``STEM.md`` (``to_markdown(report)``) into
    :func:`results_dir`, the table on stdout."""
    import json
    import sys

    parser = argparse.ArgumentParser(description=description)
    add_save_option(parser)
    args = parser.parse_args()
    report = run()
    report["machine"] = machine_info(threads)
    results = results_dir(args.save)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{stem}.md").write_text(to_markdown(report))
    sys.stdout.write(to_markdown(report))
    print(f"written to {results}/{stem}.{{md,json}}")
