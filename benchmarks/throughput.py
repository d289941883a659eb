"""Batch throughput and thread scaling, each contender standalone in its own process.

For each model (torchvision CNNs with random weights, exported to ONNX at the batch size):
qcompile fp32 and int8 (PTQ, the build's default target and schedules) against ONNX Runtime
fp32 and int8 (``quantize_static``, QDQ U8S8 per-channel, the same calibration samples).
Every (contender, thread count) runs in a fresh process -- the way a user runs ``qcompile
bench`` or an ONNX Runtime script -- which loads the artifact, warms up, waits for idle
CPUs and then runs the batch for ``--seconds``; the processes are interleaved over
``--rounds`` rounds (the order rotates) and each figure is the median over rounds, so a
slow phase of the shared VM hits every contender alike.  qcompile's thread count is
``TVM_NUM_THREADS`` of the loading process, ONNX Runtime's ``intra_op_num_threads``.

The table: images/s per contender and thread count, the scaling from the first to the last
thread count, and each qcompile figure against ONNX Runtime at the same precision and
threads.  ``--batch 1`` gives standalone batch-1 latency instead.

    .venv/bin/python benchmarks/throughput.py                       # resnet18, mobilenet_v2; batch 8; 1 and 2 threads
    .venv/bin/python benchmarks/throughput.py mobilenet_v2 --batch 1 --threads 2
    .venv/bin/python benchmarks/throughput.py --rounds 3 --save
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import add_save_option, describe, machine_info, results_dir

CONTENDERS = ("qcompile fp32", "qcompile int8", "ONNX Runtime fp32", "ONNX Runtime int8")
PEER = {"qcompile fp32": "ONNX Runtime fp32", "qcompile int8": "ONNX Runtime int8"}


def prepare(model: str, batch: int, calib: int, work: Path, target: str) -> dict[str, Path]:
    """The four artifacts of ``model`` at ``batch``: {contender: file}."""
    import torch
    from latency import ort_quantize_qdq

    import qcompile
    from qcompile.frontend.from_torch import torchvision_module

    torch.manual_seed(0)
    net = torchvision_module(model).eval()
    rng = np.random.default_rng(0)
    samples = [rng.standard_normal((batch, 3, 224, 224)).astype("float32") for _ in range(calib)]
    fp32 = work / f"{model}-b{batch}.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.from_numpy(samples[0]),), str(fp32), input_names=["x"], dynamo=False)
    ort_int8 = ort_quantize_qdq(fp32, samples, work / f"{model}-b{batch}-ort-int8.onnx")
    imported = qcompile.import_model(str(fp32))
    ours_fp32 = qcompile.compile(imported, target, out_dir=work, name=f"{model}-b{batch}-fp32").library
    ours_int8 = qcompile.compile(imported, target, out_dir=work, name=f"{model}-b{batch}-int8",
                                 quantization=qcompile.Int8Config(num_samples=calib),
                                 calibration_data=[{"x": s} for s in samples]).library
    return {"qcompile fp32": ours_fp32, "qcompile int8": ours_int8, "ONNX Runtime fp32": fp32,
            "ONNX Runtime int8": ort_int8}


def make_runner(contender: str, path: str, threads: int, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """``contender``'s artifact at ``path`` loaded in this process, as a call that runs ``feeds``
    once: by name where the model's input names are the feeds', else in the feeds' order.
    qcompile runs on ``TVM_NUM_THREADS`` of this process, ONNX Runtime on ``threads`` intra-op
    threads with its default graph optimizations; a PyTorch contender's file is a whole
    ``torch.save``d module, run eagerly on the feeds in order, on ``threads`` threads."""
    if contender.startswith("PyTorch"):
        import torch

        torch.set_num_threads(threads)
        net = torch.load(path, weights_only=False).eval()
        tensors = [torch.from_numpy(a) for a in feeds.values()]

        def run():
            with torch.no_grad():
                return net(*tensors)

        return run
    if contender.startswith("qcompile"):
        import qcompile

        compiled = qcompile.load(path)
        names = [i.name for i in compiled.inputs]
        args = {n: feeds[n] for n in names} if set(names) <= set(feeds) else list(feeds.values())
        return lambda: compiled.run(args)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    args = {n: feeds[n] for n in names} if set(names) <= set(feeds) else dict(zip(names, feeds.values()))
    return lambda: session.run(None, args)


def time_runner(run: Callable[[], object], seconds: float, idle_window_s: float = 1.0,
                idle_limit_s: float = 30.0) -> dict[str, float]:
    """Warm up, wait (at most ``idle_limit_s``) for idle CPUs, then run for ``seconds`` (at least
    5 runs): {"ms": median ms per run, "runs": runs timed, "waited_s": seconds waited for idle
    CPUs, "idle": whether they became idle}."""
    for _ in range(3):
        run()
    from latency import wait_for_idle_cpus

    waited = wait_for_idle_cpus(window_s=idle_window_s, limit_s=idle_limit_s)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"ms": float(np.median(times)), "runs": len(times), "waited_s": waited, "idle": waited < idle_limit_s}


def worker(contender: str, path: str, batch: int, threads: int, seconds: float) -> None:
    """One standalone measurement (this process): prints {"ms": median ms per batch}."""
    x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype("float32")
    timed = time_runner(make_runner(contender, path, threads, {"x": x}), seconds)
    print(json.dumps({"ms": timed["ms"], "runs": timed["runs"]}))


def measure(files: dict[str, Path], batch: int, threads: int, seconds: float) -> dict[str, float]:
    """One round: every contender in its own process, in the given order."""
    out = {}
    for contender, path in files.items():
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, __file__, "--worker", contender, str(path), "--batch", str(batch),
                               "--threads", str(threads), "--seconds", str(seconds)],
                              capture_output=True, text=True, env=env, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{contender} ({path.name}, {threads} threads) failed: {proc.stderr.strip()[-400:]}")
        out[contender] = json.loads(proc.stdout.strip().splitlines()[-1])["ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per process")
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--target", default="native")
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "FILE"), help=argparse.SUPPRESS)
    add_save_option(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.batch, args.threads[0], args.seconds)
        return
    machine = machine_info(max(args.threads))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            files = prepare(model, args.batch, args.calib_samples, Path(tmp), args.target)
            per = {c: {str(t): [] for t in args.threads} for c in CONTENDERS}
            for index in range(args.rounds):
                for threads in args.threads:
                    order = list(CONTENDERS[index % 4:] + CONTENDERS[:index % 4])
                    for contender, ms in measure({c: files[c] for c in order}, args.batch, threads,
                                                 args.seconds).items():
                        per[contender][str(threads)].append(ms)
                print(f"{model}: round {index + 1}/{args.rounds} done", flush=True)
            results[model] = per
    table = render(results, args, machine)
    stem = f"throughput_b{args.batch}" + ("" if args.target == "native" else f"_{args.target}")
    out = results_dir(args.save)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(
        {"batch": args.batch, "threads": args.threads, "rounds": args.rounds, "seconds": args.seconds,
         "target": args.target, "machine": machine, "ms_per_batch": results}, indent=2) + "\n")
    print(table)
    print(f"written to {out}/{stem}.{{md,json}}")


def render(results: dict, args, machine: dict) -> str:
    first, last = str(args.threads[0]), str(args.threads[-1])
    unit = "images/s" if args.batch > 1 else "ms"
    title = (f"batch {args.batch}, {unit}; each contender standalone in its own process, {args.rounds} "
             f"interleaved rounds of {args.seconds:g} s (median over rounds); qcompile target {args.target}, "
             "untuned unless records exist for it")
    head = [title, "", describe(machine), ""]
    cols = [f"{t} thread{'s' if t != 1 else ''}" for t in args.threads]
    scaling = len(args.threads) > 1
    head.append("| model | contender | " + " | ".join(cols) + (f" | {first}->{last} scaling" if scaling else "")
                + f" | speed vs ONNX Runtime, same precision, {last} threads (>1: faster) |")
    head.append("|---" * (3 + len(cols) + scaling) + "|")
    for model, per in results.items():
        for contender, by_threads in per.items():
            ms = {t: float(np.median(v)) for t, v in by_threads.items()}
            cells = [f"{1000.0 * args.batch / ms[str(t)]:.1f}" if args.batch > 1 else f"{ms[str(t)]:.2f}"
                     for t in args.threads]
            if scaling:
                cells.append(f"{ms[first] / ms[last]:.2f}x")
            peer = PEER.get(contender)
            if peer:
                cells.append(f"{float(np.median(per[peer][last])) / ms[last]:.2f}x")
            else:
                cells.append("-")
            head.append(f"| {model} | {contender} | " + " | ".join(cells) + " |")
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    main()
