"""Batch-1 latency, side by side: qcompile fp32/int8 vs PyTorch and ONNX Runtime.

Every contender runs the same input with the same thread count; rounds are interleaved
(A, B, C, then B, C, A, ...: the order rotates) with a short busy-wait gap between contenders, because
ONNX Runtime's and PyTorch's worker threads keep spinning after a call and would slow
the next contender on 2 cores; sleeping instead distorts too.  The VM's speed drifts (by
tens of percent from one minute to the next on a shared VM), so ratios are taken within one run, and
each ratio column is the median of the per-round ratios (a contender against the other
one's median in the same round), which a phase that covers only some rounds moves less
than a ratio of the two overall medians.  "% of peak" is the model's multiply-accumulates (those of direct
convolutions: a Winograd kernel does fewer, so a model can exceed 100%) per second against this CPU's measured peak (``qcompile.runtime.peak``, once per run after the
rounds, on idle CPUs): fp32 contenders against the fp32 FMA peak, int8 ones against the int8
dot-product peak.  ``--standalone`` runs each contender in a long-lived process of its own
instead (``standalone.py``: the way a user runs ``qcompile bench`` or an ONNX Runtime script;
PyTorch int8, which compiles for minutes in the process that runs it, is left out), one
measurement of ``--budget`` seconds at a time, interleaved the same way, into
``latency_<model>_standalone.*``.  Writes out/benchmarks/latency_<model>.{json,md,png}
(``latency_<model>_<target>.*`` for a ``--target`` other than native), or into benchmarks/results/
with ``--save``; the JSON records the machine (CPU, flags, threads), the git commit and the date.

    .venv/bin/python benchmarks/latency.py resnet18 --rounds 5
    .venv/bin/python benchmarks/latency.py resnet18 --target x86-avx2   # AVX2 kernels on an AVX-512 CPU
    .venv/bin/python benchmarks/latency.py mobilenet_v2 --rounds 20 --budget 0.3 --save
    .venv/bin/python benchmarks/latency.py resnet18 --standalone --rounds 7 --no-torch-int8 --save
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import add_save_option, describe, machine_info, results_dir
from throughput import make_runner

ORT_INT8 = "ONNX Runtime int8 (QDQ U8S8 per-channel)"
TORCH_FP32 = "PyTorch fp32 eager"


def busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def export_onnx(net, example: np.ndarray, path: Path) -> Path:
    """The torchvision module as an ONNX file (input "x"), the way ONNX Runtime users export."""
    import torch

    torch.onnx.export(net, (torch.from_numpy(example),), str(path), input_names=["x"], dynamo=False)
    return path


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def contenders(model: str, threads: int, calib: int, work: Path, target_name: str = "native",
               ) -> tuple[dict[str, Path], list[np.ndarray], object, int]:
    """Every contender's file in ``work`` by contender name (qcompile's libraries with the
    tuning records and without, the ONNX files, the ``torch.save``d PyTorch module), the
    calibration samples, the PyTorch module and the model's multiply-accumulates per run."""
    import torch

    from qcompile.build import build
    from qcompile.build.macs import count_macs
    from qcompile.frontend import import_model
    from qcompile.frontend.from_torch import torchvision_module
    from qcompile.quantize import Int8Config, quantize_model
    from qcompile.target import resolve_target

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    samples = [rng.standard_normal((1, 3, 224, 224)).astype("float32") for _ in range(calib)]
    net = torchvision_module(model)
    target = resolve_target(target_name)
    imported = import_model(model)
    qmodel = quantize_model(imported, [{"x": s} for s in samples], Int8Config(num_samples=calib),
                                  target.to_tvm())
    files: dict[str, Path] = {}
    for label, source in (("fp32", imported), ("int8", qmodel)):
        for logs in (None, False):  # committed tuning records, then none (the default schedule)
            artifact = build(source, target, work / f"{label}-{logs is None}", name=f"{model}-{label}",
                             tuning_logs=logs)
            tuning = artifact.manifest.build["tuning"]
            how = (f"{tuning['hits']}/{tuning['hits'] + tuning['misses']} kernels tuned" if tuning.get("hits")
                   else "untuned: default schedule")
            if logs is None and not tuning.get("hits"):
                continue  # no records for this model: the untuned build below covers it
            files[f"qcompile {label} ({how})"] = artifact.library
    files[TORCH_FP32] = work / f"{model}.pt"
    torch.save(net, files[TORCH_FP32])
    files["ONNX Runtime fp32"] = export_onnx(net, samples[0], work / f"{model}.onnx")
    files[ORT_INT8] = ort_quantize_qdq(files["ONNX Runtime fp32"], samples, work / f"{model}-ort-int8.onnx")
    return files, samples, net, count_macs(imported.mod).total


def ort_quantize_qdq(fp32: Path, samples: list[np.ndarray], out: Path, input_name: str = "x") -> Path:
    """ONNX Runtime's static int8 of ``fp32`` as its users run it: ``quant_pre_process``, then
    ``quantize_static`` (QDQ, U8S8, per-channel weights) calibrated on ``samples``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: s} for s in samples])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _torch_pt2e_int8(net, samples):
    """The current PyTorch int8 path: torchao PT2E static quantization (X86InductorQuantizer,
    per-channel weights), lowered by torch.compile's inductor with freezing (its int8 kernels
    come from oneDNN)."""
    import torch
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    example = torch.from_numpy(samples[0])
    prepared = prepare_pt2e(torch.export.export(net, (example,), strict=True).module(), quantizer)
    with torch.no_grad():
        for s in samples:
            prepared(torch.from_numpy(s))
    converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(example)  # compiles here, not inside the timed rounds
    from torch._inductor.async_compile import shutdown_compile_workers

    shutdown_compile_workers()  # inductor's compile-worker processes, not needed any more

    def run(x):
        with torch.no_grad():
            return compiled(torch.from_numpy(x))

    return run


def measure_standalone(files: dict[str, Path], x: np.ndarray, rounds: int, budget_s: float, threads: int,
                       work: Path) -> dict[str, list[float]]:
    """Each contender in its own process (``standalone.Server``): per contender the median
    latency (ms) of each round; a contender that fails is named and left out."""
    from standalone import Server, interleaved_rounds

    np.savez(work / "feeds.npz", x=x)
    servers = {name: Server(name, threads, work / f"serve-{i}.log") for i, name in enumerate(files)}
    try:
        per_round, errors, waits = interleaved_rounds({n: str(p) for n, p in files.items()}, servers,
                                                      str(work / "feeds.npz"), rounds, budget_s)
    finally:
        for server in servers.values():
            server.close()
    for name, error in errors.items():
        print(f"{name} did not run: {error}")
    print(f"waited {waits['idle_wait_s']:.1f} s for idle CPUs; {waits['busy_starts']} measurements started "
          "on busy CPUs")
    return per_round


def wait_for_idle_cpus(max_busy: float = 0.1, window_s: float = 1.0, limit_s: float = 120.0) -> float:
    """Wait (this process asleep) until the machine's CPUs are at most ``max_busy`` busy over
    ``window_s``: compilers' leftover worker processes, or anything else still running, would
    slow the first rounds (seen: 3 rounds at 2-20x).  Returns the seconds waited."""
    def busy_idle() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, idle  # user .. steal

    if not Path("/proc/stat").exists():
        return 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        b0, i0 = busy_idle()
        time.sleep(window_s)
        b1, i1 = busy_idle()
        if (b1 - b0) <= max_busy * max(1, (b1 - b0) + (i1 - i0)):
            break
    return time.perf_counter() - start


def measure(runners: dict[str, Callable[[], object]], rounds: int, budget_s: float,
            gap_s: float) -> dict[str, list[float]]:
    """In one process: per contender the median latency (ms) of each round."""
    waited = wait_for_idle_cpus()
    print(f"waited {waited:.1f} s for idle CPUs before the rounds")
    for run in runners.values():  # warm-up
        run()
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for index in range(rounds):
        # each round starts one contender later: no one always runs right after the same neighbour
        for name in names[index % len(names):] + names[:index % len(names)]:
            run = runners[name]
            busy_wait(gap_s)
            times = []
            start_round = time.perf_counter()
            while not times or (time.perf_counter() - start_round < budget_s and len(times) < 200):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1000.0)
            per_round[name].append(float(np.median(times)))
    return per_round


def measure_peaks_apart(threads: int):
    """This CPU's peaks (``qcompile.runtime.peak``, native, over TVM's pool of ``threads``)
    measured in a fresh process, as ``peak.py`` does: in the process that built and ran the
    contenders it can read about half of them."""
    import subprocess
    import sys

    from qcompile.runtime.peak import Peaks

    code = ("import json; from qcompile.runtime.peak import measure_peaks; "
            "print(json.dumps(measure_peaks('native').to_json()))")
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return Peaks.from_json(json.loads(proc.stdout.strip().splitlines()[-1]))


def share_of_peak(name: str, median_ms: float, macs: int, peaks) -> float | None:
    """The share of this CPU's measured peak a contender reaches: int8 contenders against the
    int8 dot-product peak, the others against the fp32 FMA peak."""
    return peaks.fraction(macs, median_ms / 1000.0, "int8" if "int8" in name else "float32")


def paired_ratio(per_round: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s round median / ``base``'s round median."""
    return float(np.median(np.array(per_round[name]) / np.array(per_round[base])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per contender per round")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--target", default="native",
                        help="qcompile's target (e.g. x86-avx2 on an AVX-512 CPU: the AVX2 kernels on the same cores)")
    parser.add_argument("--no-torch-int8", dest="torch_int8", action="store_false",
                        help="skip PyTorch int8 (PT2E + torch.compile, which compiles for minutes)")
    parser.add_argument("--standalone", action="store_true",
                        help="each contender in its own process (no PyTorch int8); writes latency_MODEL_standalone.*")
    add_save_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        files, samples, net, macs = contenders(args.model, args.threads, args.calib_samples, Path(tmp), args.target)
        if args.standalone:
            if args.torch_int8:
                print("PyTorch int8 (PT2E + torch.compile) runs only in one process (it compiles there for "
                      "minutes): not measured with --standalone")
            per_round = measure_standalone(files, x, args.rounds, args.budget, args.threads, Path(tmp))
        else:
            runners = {name: make_runner(name, str(path), args.threads, {"x": x}) for name, path in files.items()}
            if args.torch_int8:
                try:
                    run_int8 = _torch_pt2e_int8(net, samples)
                    runners["PyTorch int8 (PT2E X86InductorQuantizer + torch.compile)"] = lambda: run_int8(x)
                except Exception as exc:  # noqa: BLE001 (recorded, not hidden: the output says it did not run)
                    print(f"PyTorch int8 (PT2E + inductor) did not run: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}")
            per_round = measure(runners, args.rounds, args.budget, gap_s=0.05)
    wait_for_idle_cpus()  # a peak measured beside another process reads low
    peaks = measure_peaks_apart(args.threads)
    medians = {name: float(np.median(v)) for name, v in per_round.items()}
    shares = {name: share_of_peak(name, ms, macs, peaks) for name, ms in medians.items()}
    machine = machine_info(args.threads)
    mode = ("each contender standalone in its own process" if args.standalone
            else "all contenders in one process")
    lines = [f"{args.model}, qcompile target {args.target}, batch 1, {args.threads} threads, {mode}, "
             f"{args.rounds} interleaved rounds of {args.budget:g} s "
             "per contender (median of round medians; ratios: median of per-round ratios)",
             "", describe(machine), "",
             (f"{macs / 1e9:.2f} GMAC per run (direct convolution); % of peak: of this CPU's measured fp32 FMA peak "
              f"({peaks.fp32.gmacs:.0f} GMAC/s, {peaks.fp32.instruction}) for fp32 contenders, of its int8 "
              f"peak ({_gmacs(peaks.int8_gmacs)}, {peaks.int8.instruction if peaks.int8 else peaks.int8_note}) "
              f"for int8 ones, {peaks.threads} threads (benchmarks/peak.py)"), "",
             "| contender | median ms | vs ORT int8 | vs PyTorch fp32 | % of peak |", "|---|---|---|---|---|"]
    for name, ms in medians.items():
        share = f"{100 * shares[name]:.1f}%" if shares[name] is not None else "-"
        lines.append(f"| {name} | {ms:.2f} | {paired_ratio(per_round, name, ORT_INT8):.2f}x "
                     f"| {paired_ratio(per_round, name, TORCH_FP32):.2f}x | {share} |")
    fp32, int8 = (next((n for n in per_round if n.startswith(f"qcompile {kind} (") and "untuned" not in n), None)
                  for kind in ("fp32", "int8"))
    if fp32 and int8:
        lines += ["", f"qcompile int8 vs qcompile fp32 (both from the tuning records): "
                      f"{1 / paired_ratio(per_round, int8, fp32):.2f}x faster"]
    if fp32 and "ONNX Runtime fp32" in per_round:
        lines += [f"qcompile fp32 (tuning records) vs ONNX Runtime fp32: "
                  f"{paired_ratio(per_round, fp32, 'ONNX Runtime fp32'):.2f}x its latency"]
    table = "\n".join(lines) + "\n"
    results = results_dir(args.save)
    stem = (f"latency_{args.model}" + ("_standalone" if args.standalone else "")
            + ("" if args.target == "native" else f"_{args.target}"))
    (results / f"{stem}.md").write_text(table)
    (results / f"{stem}.json").write_text(json.dumps(
        {"model": args.model, "target": args.target, "threads": args.threads,
         "mode": "standalone" if args.standalone else "in-process", "rounds_run": args.rounds,
         "budget_s": args.budget, "machine": machine, "rounds": per_round, "medians_ms": medians, "macs": macs,
         "peaks": peaks.to_json(), "share_of_peak": shares}, indent=2) + "\n")
    _bar_chart(args.model, medians, results / f"{stem}.png")
    print(table)
    print(f"written to {results}/{stem}.{{md,json,png}}")


def _gmacs(value: float | None) -> str:
    return f"{value:.0f} GMAC/s" if value is not None else "none"


def _bar_chart(model: str, medians: dict[str, float], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib not installed: no bar chart)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(medians)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.2))
    ax.barh(names[::-1], [medians[n] for n in names[::-1]], color="#4c72b0")
    for i, name in enumerate(names[::-1]):
        ax.text(medians[name], i, f" {medians[name]:.1f} ms", va="center", fontsize=8)
    ax.set_xlabel("median latency, ms (batch 1; lower is better)")
    ax.set_title(f"{model}: side-by-side latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
