"""This CPU's measured fp32 FMA and int8 dot-product peaks (GMAC/s), per thread count.

The kernels (:mod:`qcompile.runtime.peak`): independent accumulator chains in vector registers,
one parallel task per thread, compiled by TVM for the target -- ``vfmadd*ps`` as wide as the
target's vectors, and the dot-product instruction qcompile's int8 conv uses (``vpdpbusd``, AVX2's
``vpmaddubsw`` sequence, ``sdot``).  Each peak is the best of ``--repeat`` timed calls, after
waiting for idle CPUs (another process on a core halves a 2-thread peak).  Writes
out/benchmarks/peak.{md,json}, or benchmarks/results/ with ``--save``; the JSON records the machine.

    .venv/bin/python benchmarks/peak.py                      # 1 thread and TVM's pool
    .venv/bin/python benchmarks/peak.py --target x86-avx2    # the AVX2 kernels' peaks on this CPU
"""
from __future__ import annotations

import argparse
import json
import os

from latency import wait_for_idle_cpus
from machine import add_save_option, describe, machine_info, results_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="native", help="qcompile target whose instructions are timed")
    parser.add_argument("--threads", type=int, default=2, help="TVM's thread pool (TVM_NUM_THREADS), default 2")
    parser.add_argument("--repeat", type=int, default=100, help="timed calls per kernel; the best counts")
    add_save_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from qcompile.runtime.peak import measure_peaks

    counts = sorted({1, int(os.environ["TVM_NUM_THREADS"])})
    print(f"waited {wait_for_idle_cpus():.1f} s for idle CPUs")
    peaks = [measure_peaks(args.target, threads=n, repeat=args.repeat) for n in counts]
    machine = machine_info(counts[-1])
    lines = [f"Measured compute peaks, qcompile target {args.target} (best of {args.repeat} calls per kernel)",
             "", describe(machine), "",
             "| threads | fp32 GMAC/s | fp32 instruction | int8 GMAC/s | int8 instruction | int8 / fp32 |",
             "|---|---|---|---|---|---|"]
    for p in peaks:
        int8 = (f"{p.int8.gmacs:.1f} | {p.int8.instruction} | {p.int8.gmacs / p.fp32.gmacs:.2f}x"
                if p.int8 is not None else f"- | {p.int8_note} | -")
        lines.append(f"| {p.threads} | {p.fp32.gmacs:.1f} | {p.fp32.instruction} | {int8} |")
    table = "\n".join(lines) + "\n"
    results = results_dir(args.save)
    (results / "peak.md").write_text(table)
    (results / "peak.json").write_text(json.dumps(
        {"target": args.target, "repeat": args.repeat, "machine": machine, "peaks": [p.to_json() for p in peaks]},
        indent=2) + "\n")
    print(table)
    print(f"written to {results}/peak.{{md,json}}")


if __name__ == "__main__":
    main()
