"""Batch-1 latency over the model zoo: qcompile against ONNX Runtime, float32 and int8, untuned.

For every zoo model (``zoo.py``'s cases, exports and calibration samples):

- qcompile fp32: the untuned float32 build of the zoo's form of the model (torchvision name,
  ONNX file or .pt2);
- ONNX Runtime fp32: the same model's ONNX file (the zoo's ONNX twin for a torchvision name or
  a .pt2), default graph optimizations;
- qcompile int8: the untuned int8 PTQ build, calibrated as ``zoo.py`` calibrates;
- ONNX Runtime int8: the zoo's ``quantize_static`` of the ONNX file (QDQ, U8S8, per-channel,
  the same calibration samples).  Where ONNX Runtime's pre-processing or quantizer fails the
  cell says "failed" and the model is left out of the int8 geometric mean (named under the table);
- pre-quantized entries (ONNX Runtime's QDQ, QOperator and dynamic files): qcompile built from
  that file against ONNX Runtime running the same file, in the int8 columns; their float32 is
  the base model's.

Every contender runs standalone in its own long-lived process (``standalone.py``'s servers: qcompile on
``TVM_NUM_THREADS``, ONNX Runtime on ``intra_op_num_threads``, both ``--threads``), one
measurement at a time with ``throughput.py``'s loader and timer: load the artifact, warm up,
wait for idle CPUs, run for ``--seconds``, median ms.  Per model the builds run first in a
subprocess (``zoo.py``'s guard: a crash or a hang costs that model's row), then ``--rounds``
rounds interleave the contenders: in each round the two contenders of a precision run back to
back (which of the two first, and which precision first, alternate over rounds).  Each ms
figure is the median over rounds; each ratio is the median over rounds of that round's
qcompile ms / ONNX Runtime ms (<1: qcompile is faster): on a shared VM the speed of both
vCPUs together drifts by up to 1.5x for seconds at a time, so a ratio of two measurements
taken back to back holds where a ratio of medians from different moments does not.  Under the table: the
geometric mean of each ratio column, its worst ratio and model, and how many models are over
1.5x.  Output: ``out/benchmarks/zoo_latency.{md,json}`` (``benchmarks/results/`` with
``--save``; ``zoo_latency_<target>.*`` for a ``--target`` other than native), rewritten after
every model; the JSON holds the machine record.

    .venv/bin/python benchmarks/zoo_latency.py --only squeezenet1_1,conv1d_kws-onnx
    .venv/bin/python benchmarks/zoo_latency.py --classes transformer --rounds 5
    .venv/bin/python benchmarks/zoo_latency.py --save
    .venv/bin/python benchmarks/zoo_latency.py --save --resume --classes transformer
    .venv/bin/python benchmarks/zoo_latency.py --save --target x86-zen5   # a preset's own table

``--resume`` keeps the models of the last run's JSON (refused for another CPU or other settings)
and measures only the others, so that a long run can be completed in parts; every model's record
names the commit it was measured at, and the table says so where there are several.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import zoo
from machine import add_save_option, describe, machine_info, results_dir
from standalone import Server, interleaved_rounds

QC_FP32, ORT_FP32, QC_INT8, ORT_INT8 = "qcompile fp32", "ONNX Runtime fp32", "qcompile int8", "ONNX Runtime int8"
CONTENDERS = (QC_FP32, ORT_FP32, QC_INT8, ORT_INT8)
PAIRS = {"fp32": (QC_FP32, ORT_FP32), "int8": (QC_INT8, ORT_INT8)}
LIMIT = 1.5  # a ratio above this counts as a model worse than ONNX Runtime


# ----------------------------------------------------------------------------- building

def build(entry: zoo.Entry, work: Path) -> None:
    """The four contenders' files of ``entry`` in ``work``, listed in ``work/artifacts.json``
    (rewritten after each stage): {"feeds": npz of one input, "files": {contender: file},
    "errors": {contender: first line}}."""
    record: dict[str, Any] = {"files": {}, "errors": {}}
    files, errors = record["files"], record["errors"]

    def save() -> None:
        (work / "artifacts.json").write_text(json.dumps(record, indent=2) + "\n")

    save()
    try:
        case = entry.make(work)
    except Exception as exc:  # noqa: BLE001 (recorded: every cell of the row says failed)
        errors.update(dict.fromkeys(CONTENDERS, f"export failed: {zoo.first_line(exc)}"))
        save()
        return
    evals, calib = zoo.case_samples(case)
    record["feeds"] = str(work / "feeds.npz")
    np.savez(record["feeds"], **evals[0])
    imported = None
    if not case.prequantized:
        try:
            imported = zoo.import_case(case)
            files[QC_FP32] = str(zoo.build_fp32(imported, work).library)
        except Exception as exc:  # noqa: BLE001
            errors[QC_FP32] = zoo.first_line(exc)
        if case.onnx:
            files[ORT_FP32] = case.onnx
        else:
            errors[ORT_FP32] = "no ONNX form (the ONNX exporter failed)"
        save()
    try:
        files[QC_INT8] = str(zoo.build_int8(case, imported, calib, work).library)
    except Exception as exc:  # noqa: BLE001
        errors[QC_INT8] = zoo.first_line(exc)
    save()
    if case.prequantized:
        files[ORT_INT8] = case.prequantized
    elif case.onnx:
        try:
            files[ORT_INT8] = str(zoo.ort_int8_file(case, calib, work))
        except Exception as exc:  # noqa: BLE001 (ONNX Runtime's pre-processing or quantizer)
            errors[ORT_INT8] = f"quant_pre_process / quantize_static: {zoo.first_line(exc)}"
    else:
        errors[ORT_INT8] = "no ONNX form (the ONNX exporter failed)"
    save()


def build_isolated(entry: zoo.Entry, work: Path, timeout: float) -> dict[str, Any]:
    """``build`` in a subprocess under ``timeout`` seconds; a contender it did not reach gets the
    subprocess's problem as its error."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build", entry.name, "--work", str(work),
           "--target", zoo.TARGET]
    problem, tail = zoo.run_guarded(cmd, work / "build.log", timeout)
    try:
        record = json.loads((work / "artifacts.json").read_text())
    except (OSError, ValueError):
        record = {"files": {}, "errors": {}}
    if problem:
        message = problem + (f": {tail[-1][:200]}" if tail and "crashed" in problem else "")
        for contender in CONTENDERS:
            if contender not in record["files"]:
                record["errors"].setdefault(contender, message)
    return record


# ----------------------------------------------------------------------------- measuring

def measure_model(artifacts: dict[str, Any], servers: dict[str, Server], rounds: int,
                  seconds: float) -> tuple[dict[str, list[float]], dict[str, str], dict[str, float]]:
    """``rounds`` interleaved rounds over the contenders that have a file: in each round the
    two contenders of a precision run back to back, which of the two first and which
    precision first alternating (:func:`standalone.interleaved_rounds`'s results)."""
    files = {c: artifacts["files"][c] for c in CONTENDERS if c in artifacts["files"]}
    pairs = list(PAIRS.values())
    orders = [[c for pair in (pairs if index % 2 == 0 else pairs[::-1])
               for c in (pair if index % 4 < 2 else pair[::-1]) if c in files] for index in range(rounds)]
    return interleaved_rounds(files, servers, artifacts["feeds"], rounds, seconds, orders)


# ----------------------------------------------------------------------------- the table

def ratios(record: dict[str, Any]) -> dict[str, float]:
    """Per precision where both were measured: the median over rounds of qcompile ms / ONNX
    Runtime ms, the two measured back to back in each round."""
    ms = record["ms"]
    return {p: float(np.median([a / b for a, b in zip(ms[ours], ms[theirs])])) for p, (ours, theirs) in PAIRS.items()
            if ms.get(ours) and ms.get(theirs)}


def summarize(records: list[dict[str, Any]], precision: str) -> dict[str, Any]:
    """Geometric mean of the ratios, the worst ratio and its model, the models over ``LIMIT``,
    and the models left out (with why: the first failing contender's error)."""
    ours, theirs = PAIRS[precision]
    got = {r["name"]: r["ratio"][precision] for r in records if precision in r["ratio"]}
    left_out = {}
    for r in records:
        if precision in r["ratio"] or (precision == "fp32" and r["class"] == "prequantized"):
            continue
        failed = next((c for c in (theirs, ours) if c in r["errors"]), None)
        left_out[r["name"]] = f"{failed} failed: {r['errors'][failed]}" if failed else "not measured"
    summary: dict[str, Any] = {"models": len(got), "left_out": left_out}
    if got:
        worst = max(got, key=got.get)
        summary.update(geomean=math.exp(sum(math.log(v) for v in got.values()) / len(got)),
                       worst=got[worst], worst_model=worst, over_limit=sorted(n for n, v in got.items() if v > LIMIT))
    return summary


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def row(record: dict[str, Any]) -> list[str]:
    cells = [record["name"]]
    for precision, (ours, theirs) in PAIRS.items():
        if precision == "fp32" and record["class"] == "prequantized":
            cells += ["-", "-", "-"]
            continue
        for contender in (ours, theirs):
            cells.append("failed" if contender in record["errors"] else _ms(record["median_ms"].get(contender)))
        ratio = record["ratio"].get(precision)
        cells.append("-" if ratio is None else f"{ratio:.2f}x" + (" (over 1.5x)" if ratio > LIMIT else ""))
    return cells


HEADER = ["model", "qcompile fp32 ms", "ORT fp32 ms", "ratio", "qcompile int8 ms", "ORT int8 ms", "ratio"]


def _error(text: str, width: int = 120) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def render(records: list[dict[str, Any]], summaries: dict[str, dict], args, machine: dict, elapsed: float) -> str:
    title = (f"Zoo latency: {len(records)} models, batch 1, {args.threads} threads, target {zoo.TARGET}, untuned "
             f"builds; each contender standalone in its own process, {args.rounds} interleaved rounds of "
             f"{args.seconds:g} s, median ms over rounds; ratio = median over rounds of qcompile ms / ONNX Runtime "
             "ms measured back to back (<1: qcompile faster). ONNX Runtime: default graph optimizations, intra_op_num_threads "
             f"{args.threads}; int8: `quantize_static` QDQ U8S8 per-channel of the same ONNX file on zoo.py's "
             f"{zoo.CALIB_SAMPLES} calibration samples; pre-quantized rows: qcompile and ONNX Runtime on the same "
             f"ONNX Runtime-quantized file (their float32 is the base model's row). {elapsed:.0f} s of builds "
             "and measurements, "
             f"{sum(r['idle_wait_s'] for r in records):.0f} s of it waiting for idle CPUs; "
             f"{sum(r['busy_starts'] for r in records)} of {sum(len(v) for r in records for v in r['ms'].values())} "
             "measurements started on CPUs that did not become idle within 30 s (0: a quiet machine)")
    lines = [title, "", describe(machine), ""]
    commits: dict[str, list[str]] = {}
    for r in records:
        commits.setdefault(str(r.get("commit") or "?")[:10], []).append(r["name"])
    if len(commits) > 1:  # a --resume run: say which models each commit measured
        lines += ["Measured at " + "; ".join(f"commit {c}: {len(names)} models ({names[0]} .. {names[-1]})"
                                             for c, names in commits.items()), ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in records]
    fp32, int8 = summaries["fp32"], summaries["int8"]

    def cells(what: str) -> list[str]:
        out = []
        for s in (fp32, int8):
            if not s["models"]:
                value = "-"
            elif what == "geomean":
                value = f"**{s['geomean']:.2f}x**"
            elif what == "worst":
                value = f"{s['worst']:.2f}x ({s['worst_model']})"
            else:
                value = f"{len(s['over_limit'])} of {s['models']}"
            out += ["", "", value]
        return out

    lines.append(f"| **geometric mean** ({fp32['models']} float32, {int8['models']} int8 models) | " + " | ".join(cells("geomean"))
                 + " |")
    lines.append("| **worst** | " + " | ".join(cells("worst")) + " |")
    lines.append(f"| **over {LIMIT:g}x** | " + " | ".join(cells("over")) + " |")
    for precision, label in (("fp32", "float32"), ("int8", "int8")):
        s = summaries[precision]
        if s["left_out"]:
            causes = ("a contender did not build or run; for ONNX Runtime int8, its pre-processing or "
                      "quantizer failed")
            lines += ["", f"Left out of the {label} geometric mean ({len(s['left_out'])}: {causes}):", ""]
            lines += [f"- {name}: {_error(why)}" for name, why in s["left_out"].items()]
        if s.get("over_limit"):
            lines += ["", f"{label} over {LIMIT:g}x: {', '.join(s['over_limit'])}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the run

def resumed_records(path: Path, machine: dict[str, Any], args) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model records of an earlier run's ``zoo_latency.json`` and the machine records of the
    runs they came from, for ``--resume``.  Each record names the commit it was measured at.
    ``SystemExit`` where the earlier run was on another CPU or with other settings: ratios from
    two machines, thread counts or timings do not go in one geometric mean."""
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    earlier = data["machine"]
    cpu = ("model", "family", "model_number", "flags")
    if any(earlier["cpu"].get(k) != machine["cpu"].get(k) for k in cpu):
        was = earlier["cpu"]
        raise SystemExit(f"--resume: {path} was measured on another CPU ({was.get('model')}, family "
                         f"{was.get('family')} model {was.get('model_number')}, or other flags); run without --resume")
    settings = {"threads": args.threads, "rounds": args.rounds, "seconds": args.seconds}
    if any(data.get(k) != v for k, v in settings.items()):
        raise SystemExit(f"--resume: {path} was measured with other settings "
                         f"({', '.join(f'{k} {data.get(k)}' for k in settings)}); pass the same or run without --resume")
    records = [{**r, "commit": r.get("commit", earlier.get("git_commit"))} for r in data["models"]]
    return records, data.get("earlier_runs", []) + [earlier]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names (zoo.py --list shows them)")
    parser.add_argument("--classes", help=f"comma-separated classes: {', '.join(zoo.CLASSES)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model (default 3)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per measurement (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every contender (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one model's builds (default 900)")
    parser.add_argument("--work", type=Path, help="keep each model's files in WORK/NAME/ (default: a temporary folder)")
    parser.add_argument("--target", default="native",
                        help="qcompile's target (default native); another one writes zoo_latency_TARGET.*")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the models of the last run's zoo_latency.json (same CPU and settings) and "
                             "measure only the others")
    add_save_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    zoo.TARGET = args.target  # what zoo.py's builds compile for, here and in the --build subprocess
    if args.build:
        build(zoo.ZOO[args.build], args.work)
        return
    entries = zoo.select(args.only, args.classes)
    machine = machine_info(args.threads)
    out = results_dir(args.save)
    stem = "zoo_latency" + ("" if args.target == "native" else f"_{args.target}")
    records, earlier_runs = resumed_records(out / f"{stem}.json", machine, args) if args.resume else ([], [])
    done = {r["name"] for r in records}
    entries = [e for e in entries if e.name not in done]

    def write() -> str:
        summaries = {p: summarize(records, p) for p in PAIRS}
        elapsed = sum(r["build_s"] + r["measure_s"] for r in records)
        text = render(records, summaries, args, machine, elapsed)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(
            {"machine": machine, "target": zoo.TARGET, "batch": 1, "threads": args.threads, "rounds": args.rounds,
             "seconds": args.seconds, "calibration_samples": zoo.CALIB_SAMPLES, "limit": LIMIT,
             "summary": summaries, "models": records, **({"earlier_runs": earlier_runs} if earlier_runs else {})},
            indent=2) + "\n")
        return text

    with tempfile.TemporaryDirectory(prefix="qcompile-zoo-latency-") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        servers = {c: Server(c, args.threads, root / f"serve-{c.replace(' ', '-')}.log") for c in CONTENDERS}
        try:
            for index, entry in enumerate(entries, 1):
                print(f"[{index}/{len(entries)}] {entry.name} ...", file=sys.stderr, flush=True)
                work = root / entry.name
                if work.exists():
                    shutil.rmtree(work)
                t0 = time.perf_counter()
                artifacts = build_isolated(entry, work, args.timeout)
                t1 = time.perf_counter()
                per_round, failed, waits = measure_model(artifacts, servers, args.rounds, args.seconds)
                record: dict[str, Any] = {
                    "name": entry.name, "class": entry.cls, "source": entry.source,
                    "errors": {**artifacts["errors"], **failed}, "ms": per_round,
                    "median_ms": {c: float(np.median(v)) for c, v in per_round.items() if v},
                    "build_s": round(t1 - t0, 1), "measure_s": round(time.perf_counter() - t1, 1), **waits,
                    "commit": machine.get("git_commit")}
                record["ratio"] = ratios(record)
                records.append(record)
                print(f"  {' | '.join(row(record))}  (build {record['build_s']:.0f} s, measure "
                      f"{record['measure_s']:.0f} s of which {waits['idle_wait_s']:.0f} s waiting for idle CPUs)",
                      file=sys.stderr, flush=True)
                write()
                if not args.work:
                    shutil.rmtree(work, ignore_errors=True)
        finally:
            for server in servers.values():
                server.close()
    print(write())
    print(f"written to {out}/{stem}.{{md,json}}")


if __name__ == "__main__":
    main()
