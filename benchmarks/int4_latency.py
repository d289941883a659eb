"""int4 weight-only vs float32 on a transformer encoder: size, output cosine and run time.

The MiniLM-shaped encoder of ``transformer_latency.py`` (random weights; hidden 384, 6 layers,
12 heads) at each ``--seq`` (batch 1), built by qcompile in float32 and with
``Int4WeightConfig`` (groups 32 and 128).  Times are CPU seconds per run on ``--threads``
threads (1 by default: on a shared machine CPU time moves less than wall time), the median
of interleaved rounds.  int4 reads 7x fewer weight bytes but unpacks each weight as it
multiplies: it wins where reading the weights dominates (few tokens), not at 128 tokens.

    .venv/bin/python benchmarks/int4_latency.py --seq 128 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_ms(run, feeds, budget: float) -> float:
    """CPU milliseconds per run over ``budget`` seconds of runs."""
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < budget:
        run(feeds)
        n += 1
    return 1e3 * (time.process_time() - cpu) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per contender per round")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts
    import torch
    from transformer_latency import encoder, token_feeds

    import qcompile

    torch.set_num_threads(args.threads)
    configs = {"fp32": None, "int4 group 32": qcompile.Int4WeightConfig(32),
               "int4 group 128": qcompile.Int4WeightConfig(128)}
    print("| seq | build | CPU ms / run (median) | output cosine vs fp32 | dense weight bytes | library bytes |")
    print("|---|---|---|---|---|---|")
    for seq in args.seq:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            feeds = token_feeds(1, seq, 0)
            path = work / "encoder.onnx"
            with torch.no_grad():
                torch.onnx.export(encoder(384, 6, 12, seq), tuple(torch.from_numpy(v) for v in feeds.values()),
                                  str(path), input_names=list(feeds), output_names=["hidden"], opset_version=17,
                                  dynamo=False)
            model = qcompile.import_model(str(path))
            built = {}
            for name, config in configs.items():
                artifact = qcompile.compile(model, "native", quantization=config, out_dir=work,
                                            name=name.replace(" ", "-"), tuning_logs=False)
                built[name] = (qcompile.load(artifact.library), artifact)
            times: dict[str, list[float]] = {name: [] for name in built}
            for _ in range(args.rounds):  # interleaved: a busier moment hits every build alike
                for name, (compiled, _) in built.items():
                    compiled.run(feeds)
                    times[name].append(cpu_ms(compiled.run, feeds, args.budget))
            ref = next(iter(built["fp32"][0].run(feeds).values())).astype(np.float64).ravel()
            for name, (compiled, artifact) in built.items():
                out = next(iter(compiled.run(feeds).values())).astype(np.float64).ravel()
                cosine = out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref))
                layers = artifact.manifest.quantization.get("layers", [])
                dense = (f"{sum(la['quantized_bytes'] for la in layers)} / {sum(la['bytes'] for la in layers)}"
                         if layers else "-")
                print(f"| {seq} | {name} | {np.median(times[name]):.3f} | {cosine:.6f} | {dense} | "
                      f"{artifact.library.stat().st_size} |")


if __name__ == "__main__":
    main()
