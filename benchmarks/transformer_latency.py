"""Transformer encoder latency: qcompile fp32 / int8 static / int8 dynamic vs ONNX Runtime and PyTorch.

A BERT-/MiniLM-shaped encoder from a ``transformers`` config with random weights (default:
hidden 384, 6 layers, 12 heads, intermediate 1536, as all-MiniLM-L6; sequence 128, batch 1),
exported to ONNX by the TorchScript exporter.  Contenders, all on the same token ids and
mask, in one process, interleaved rounds (``latency.py``'s method):

* PyTorch fp32 (eager), ONNX Runtime fp32,
* ONNX Runtime int8 ``quantize_dynamic`` (what sentence-transformers ships) and
  ``quantize_static`` (QDQ, U8S8 per-channel),
* qcompile fp32, int8 static (PTQ, MinMax), int8 dynamic, and qcompile building ONNX
  Runtime's QDQ file.

    .venv/bin/python benchmarks/transformer_latency.py --seq 128
    .venv/bin/python benchmarks/transformer_latency.py --seq 32 --batch 8 --save
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from latency import measure, paired_ratio
from machine import add_save_option, describe, machine_info, results_dir

ORT_FP32 = "ONNX Runtime fp32"
ORT_DYNAMIC = "ONNX Runtime int8 (quantize_dynamic)"
Feeds = dict[str, np.ndarray]


def encoder(hidden: int, layers: int, heads: int, seq: int):
    """(module, example feeds) of a random-weight BertModel returning its last hidden state."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=max(512, seq))
    model = tf.BertModel(config, add_pooling_layer=False).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return LastHidden().eval()


def token_feeds(batch: int, seq: int, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq - seq // 4:] = rng.integers(0, 2, (batch, seq // 4))  # some padding, as real batches have
    return {"input_ids": rng.integers(1000, 30000, (batch, seq)).astype(np.int64), "attention_mask": mask}


def contenders(args, work: Path) -> dict[str, Callable[[Feeds], object]]:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import qcompile

    torch.set_num_threads(args.threads)
    net = encoder(args.hidden, args.layers, args.heads, args.seq)
    example = token_feeds(args.batch, args.seq, 0)
    fp32 = work / "encoder.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
                          str(fp32), input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          opset_version=17, dynamo=False)
    calib = [token_feeds(args.batch, args.seq, 10 + k) for k in range(args.calib_samples)]
    pre, dynamic, static = work / "encoder-pre.onnx", work / "encoder-dynamic.onnx", work / "encoder-qdq.onnx"
    quant_pre_process(str(fp32), str(pre))
    quantize_dynamic(str(pre), str(dynamic), weight_type=QuantType.QInt8)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(pre), str(static), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    runners: dict[str, Callable[[Feeds], object]] = {}

    def torch_run(feeds: Feeds):
        with torch.no_grad():
            return net(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))

    runners["PyTorch fp32"] = torch_run
    for name, path in ((ORT_FP32, fp32), (ORT_DYNAMIC, dynamic), ("ONNX Runtime int8 (quantize_static QDQ)", static)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runners[name] = lambda feeds, s=session: s.run(None, feeds)
    model = qcompile.import_model(str(fp32))
    builds = {
        "qcompile fp32": {"model": model},
        "qcompile int8 static (PTQ)": {"model": model, "quantization": qcompile.Int8Config(num_samples=len(calib)),
                                           "calibration_data": calib},
        "qcompile int8 dynamic": {"model": model, "quantization": qcompile.DynamicInt8Config()},
        "qcompile on ORT's QDQ file": {"model": str(static)},
    }
    for name, spec in builds.items():
        stem = "".join(c if c.isalnum() else "-" for c in name)
        artifact = qcompile.compile(spec.pop("model"), args.target, out_dir=work, name=stem, **spec)
        compiled = qcompile.load(artifact.library)
        names = [i.name for i in compiled.inputs]
        runners[name] = lambda feeds, c=compiled, n=names: c.run(dict(zip(n, feeds.values())))
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per contender per round")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--target", default="native")
    add_save_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    feeds = token_feeds(args.batch, args.seq, 1)
    with tempfile.TemporaryDirectory() as tmp:
        runners = contenders(args, Path(tmp))
        per_round = measure(runners, feeds, args.rounds, args.budget, gap_s=0.05)
    medians = {name: float(np.median(v)) for name, v in per_round.items()}
    machine = machine_info(args.threads)
    shape = f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, sequence {args.seq}, batch {args.batch}"
    lines = [(f"BERT-shaped encoder ({shape}), qcompile target {args.target}, {args.threads} threads, {args.rounds} "
             f"interleaved rounds of {args.budget:g} s per contender (median of round medians; ratios: median of "
             "per-round ratios)"), "", describe(machine), "",
             "| contender | median ms | sequences/s | vs ORT fp32 | vs ORT int8 dynamic |", "|---|---|---|---|---|"]
    for name, ms in medians.items():
        lines.append(f"| {name} | {ms:.2f} | {1000.0 * args.batch / ms:.1f} | {paired_ratio(per_round, name, ORT_FP32):.2f}x "
                     f"| {paired_ratio(per_round, name, ORT_DYNAMIC):.2f}x |")
    table = "\n".join(lines) + "\n"
    results = results_dir(args.save)
    stem = f"transformer_latency_s{args.seq}_b{args.batch}" + ("" if args.target == "native" else f"_{args.target}")
    (results / f"{stem}.md").write_text(table)
    (results / f"{stem}.json").write_text(json.dumps(
        {"shape": vars(args) | {"save": None}, "machine": machine, "rounds": per_round, "medians_ms": medians},
        indent=2, default=str) + "\n")
    print(table)
    print(f"written to {results}/{stem}.{{md,json}}")


if __name__ == "__main__":
    main()
