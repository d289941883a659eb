"""How one contender's latency drifts under sustained load: runs it back to back for
``--seconds`` and prints the median of each ``--window``-second window.

On a small shared VM (2 vCPUs), every contender can slow down after ~10 s of
continuous 2-thread load (the host's clock, not steal time: /proc/stat's steal column stays
flat), which is why ``latency.py`` interleaves contenders in rounds and compares ratios
within one run rather than numbers across runs.

    .venv/bin/python benchmarks/drift.py qcompile --model resnet18 --seconds 60
    .venv/bin/python benchmarks/drift.py ort --model resnet18 --seconds 60
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # latency.py's ONNX Runtime helpers


def runner(contender: str, model: str, threads: int, work: Path):
    """A zero-argument function that runs ``model`` (fp32) once on ``contender``."""
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype("float32")
    if contender == "qcompile":
        from qcompile.build import build
        from qcompile.frontend import import_model
        from qcompile.runtime import CompiledModel
        from qcompile.target import resolve_target

        artifact = build(import_model(model), resolve_target("native"), work, name=model)
        compiled = CompiledModel.load(artifact.library)
        return lambda: compiled.run({"x": x})
    from latency import export_onnx, ort_session

    from qcompile.frontend.from_torch import torchvision_module

    session = ort_session(export_onnx(torchvision_module(model), x, work / f"{model}.onnx"), threads)
    return lambda: session.run(None, {"x": x})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contender", choices=("qcompile", "ort"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=4.0)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        run = runner(args.contender, args.model, args.threads, Path(tmp))
        for _ in range(3):
            run()
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            times, window = [], time.perf_counter()
            while time.perf_counter() - window < args.window:
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1000.0)
            print(f"t={time.perf_counter() - start:5.1f} s  median {np.median(times):6.2f} ms  ({len(times)} runs)",
                  flush=True)


if __name__ == "__main__":
    main()
