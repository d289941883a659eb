"""int8 of a trained transformer encoder: embedding cosine and top-1, qcompile vs ONNX Runtime vs PyTorch PT2E.

Trains a small ViT-style encoder (2x2 patches of scikit-learn's 8x8 handwritten digits as 16
tokens, 2 pre-norm layers, hidden 64, 4 heads, GELU MLP, mean-pooled embedding, linear
classifier) on real scans shipped with scikit-learn (nothing is downloaded), exports it to ONNX
with two outputs (logits, embedding) and quantizes that file: qcompile static int8 (MinMax and
MSE calibration), dynamic int8 and int4 weight-only (groups of 32 and 64, float activations),
ONNX Runtime ``quantize_static`` (QDQ, U8S8, per-channel) and ``quantize_dynamic``.  The same
network also goes through PyTorch PT2E (torchao's X86InductorQuantizer, default config: static
and dynamic), run in PyTorch, and each converted model exported as a ``.pt2`` and built by
qcompile.  The same calibration samples for all the static ones.  For each: test top-1, and the
lowest / mean cosine similarity of the embedding to PyTorch float32's over the test set (what a
sentence-embedding user checks); for int4, the dense-layer weight bytes vs float32 (from the
manifest); for the PT2E builds, how many layers qcompile runs as int8 kernels.  Writes
out/benchmarks/encoder_accuracy.{json,md} (benchmarks/results/ with ``--save``).

    .venv/bin/python benchmarks/encoder_accuracy.py
    .venv/bin/python benchmarks/encoder_accuracy.py --save
"""
from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from digits_accuracy import load_digits
from torch import nn

THREADS = 2
CALIB_SAMPLES = 200
EPOCHS = 60
INT4_GROUPS = (32, 64)  # K is 4 (patch embedding: stays float), 64 or 128
Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class Block(nn.Module):
    """Pre-norm encoder layer written out (nn.TransformerEncoderLayer's inference fast path
    is one fused op that exporters do not take apart)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class DigitsEncoder(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # N x 1 x 8 x 8 -> N x 16 tokens of 2x2 pixels
        patches = x.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        emb = self.norm(self.blocks(self.embed(patches) + self.pos)).mean(dim=1)
        return self.head(emb), emb


def train(x: np.ndarray, y: np.ndarray, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = DigitsEncoder()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(EPOCHS):
        net.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx])[0], yt[idx]).backward()
            opt.step()
    return net.eval()


def qcompile_predictors(onnx_path: Path, calib: np.ndarray,
                        work: Path) -> tuple[dict[str, tuple[Predict, int]], dict[str, dict]]:
    """The predictors, and for each int4 row its dense layers' bytes (float32 and int4 + scales)."""
    import qcompile

    model = qcompile.import_model(str(onnx_path))
    batches = [{"x": calib[i:i + 1]} for i in range(len(calib))]
    configs = {
        "qcompile fp32": None,
        "qcompile int8 static (minmax)": qcompile.Int8Config(num_samples=len(calib)),
        "qcompile int8 static (mse)": qcompile.Int8Config(calibration="mse", num_samples=len(calib)),
        "qcompile int8 dynamic": qcompile.DynamicInt8Config(),
        **{f"qcompile int4 weight-only (group {g})": qcompile.Int4WeightConfig(group_size=g) for g in INT4_GROUPS},
    }
    out, dense = {}, {}
    for name, config in configs.items():
        stem = name.replace("qcompile ", "").replace(" ", "-").replace("(", "").replace(")", "")
        artifact = qcompile.compile(model, "native", quantization=config,
                                    calibration_data=batches if isinstance(config, qcompile.Int8Config) else None,
                                    out_dir=work, name=stem, tuning_logs=False)
        runner = qcompile.load(artifact.library)
        names = [o.name for o in runner.outputs]

        def predict(x: np.ndarray, r=runner, names=names) -> tuple[np.ndarray, np.ndarray]:
            result = r.run({"x": x})
            return result[names[0]], result[names[1]]

        out[name] = (predict, artifact.library.stat().st_size)
        if isinstance(config, qcompile.Int4WeightConfig):
            layers = artifact.manifest.quantization["layers"]
            dense[name] = {"layers": len(layers), "bytes": sum(layer["bytes"] for layer in layers),
                           "int4_bytes": sum(layer["quantized_bytes"] for layer in layers),
                           "left_float": artifact.manifest.quantization.get("left_float", [])}
    return out, dense


def ort_predictors(onnx_path: Path, calib: np.ndarray, work: Path) -> dict[str, tuple[Predict, int]]:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "encoder-pre.onnx"
    quant_pre_process(str(onnx_path), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    static, dynamic = work / "encoder-ort-static.onnx", work / "encoder-ort-dynamic.onnx"
    quantize_static(str(pre), str(static), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(str(pre), str(dynamic), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    out = {}
    for name, path in (("ONNX Runtime fp32", onnx_path), ("ONNX Runtime int8 (quantize_static QDQ)", static),
                       ("ONNX Runtime int8 (quantize_dynamic)", dynamic)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out[name] = (lambda x, s=session: tuple(s.run(None, {"x": x})), path.stat().st_size)
    return out


def pt2e_predictors(net: nn.Module, calib: np.ndarray,
                    work: Path) -> tuple[dict[str, tuple[Predict, int | None] | str], dict[str, dict]]:
    """PyTorch PT2E int8 with X86InductorQuantizer's default config (static, calibrated on
    ``calib``, and dynamic), run in PyTorch; then each converted model exported as a ``.pt2``
    and built by qcompile (a failed import or build is its row's one-line message).  Returns
    the predictors, and for each qcompile build how many of the dense layers PT2E quantized
    it runs as int8 kernels."""
    from digits_accuracy import pt2e_quantize, x86_quantizer

    import qcompile
    import qcompile.qat
    from qcompile.errors import first_line

    example = (torch.zeros(1, 1, 8, 8),)
    out: dict[str, tuple[Predict, int | None] | str] = {}
    builds = {}
    for kind in ("static", "dynamic"):
        converted = pt2e_quantize(net, example, calib, x86_quantizer(is_dynamic=kind == "dynamic"))
        out[f"PyTorch int8 {kind} (PT2E, X86InductorQuantizer)"] = (
            lambda x, m=converted: tuple(t.numpy() for t in m(torch.from_numpy(x))), None)
        name = f"qcompile build of the PT2E {kind} .pt2"
        try:
            path = qcompile.qat.save(torch.export.export(converted, example), work / f"encoder-pt2e-{kind}.pt2")
            artifact = qcompile.compile(str(path), out_dir=work, name=f"pt2e-{kind}", tuning_logs=False)
        except qcompile.QcompileError as exc:
            out[name] = f"failed: {first_line(exc)}"
            continue
        runner = qcompile.load(artifact.library)
        inputs, names = runner.inputs[0].name, [o.name for o in runner.outputs]

        def predict(x: np.ndarray, r=runner, i=inputs, names=names) -> tuple[np.ndarray, np.ndarray]:
            result = r.run({i: x})
            return result[names[0]], result[names[1]]

        out[name] = (predict, artifact.library.stat().st_size)
        quantized = sum(1 for node in converted.graph.nodes if node.target == torch.ops.aten.linear.default
                        and "dequantize" in str(getattr(node.args[1], "target", "")))
        int8_layers = len(artifact.manifest.quantization["layers"])
        builds[name] = {"dense_layers": quantized, "int8_layers": int8_layers,
                        "float_ops": artifact.manifest.quantization.get("float_ops", {}),
                        "note": pt2e_note(quantized, int8_layers)}
    return out, builds


def score(predict: Predict, x: np.ndarray, y: np.ndarray, ref_emb: np.ndarray) -> dict[str, float]:
    """Top-1 and embedding cosine to float32, one sample at a time (batch 1, as deployed)."""
    hits, cosines = 0, []
    for i in range(len(x)):
        logits, emb = predict(x[i:i + 1])
        hits += int(np.argmax(logits) == y[i])
        a, b = np.asarray(emb, np.float64).reshape(-1), ref_emb[i].astype(np.float64)
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return {"top1": round(100.0 * hits / len(x), 2), "min_cosine": round(min(cosines), 5),
            "mean_cosine": round(float(np.mean(cosines)), 6)}


def run() -> dict:
    torch.set_num_threads(THREADS)
    xtr, ytr, xte, yte = load_digits()
    started = time.perf_counter()
    net = train(xtr, ytr)
    train_s = time.perf_counter() - started
    calib = xtr[:CALIB_SAMPLES]
    with torch.no_grad():
        ref_emb = net(torch.from_numpy(xte))[1].numpy()
    rows: dict[str, tuple[Predict, int | None] | str] = {
        "PyTorch fp32 (reference)": (lambda x: tuple(t.numpy() for t in net(torch.from_numpy(x))), None)}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        work = Path(tmp)
        onnx_path = work / "encoder.onnx"
        torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(onnx_path), input_names=["x"],
                          output_names=["logits", "embedding"], opset_version=17, dynamo=False)
        ours, int4_dense = qcompile_predictors(onnx_path, calib, work)
        rows.update(ours)
        rows.update(ort_predictors(onnx_path, calib, work))
        pt2e, pt2e_builds = pt2e_predictors(net, calib, work)
        rows.update(pt2e)
        table = {name: {"failed": row} if isinstance(row, str)
                 else {**score(row[0], xte, yte, ref_emb), "bytes": row[1]} for name, row in rows.items()}
    return {"dataset": "scikit-learn digits 8x8 as 16 tokens of 2x2 patches: 1297 train / 500 test",
            "model": "2-layer pre-norm encoder, hidden 64, 4 heads, mean-pooled embedding",
            "calibration_samples": CALIB_SAMPLES, "train_seconds": round(train_s, 1), "results": table,
            "int4_dense_weights": int4_dense, "pt2e_builds": pt2e_builds}


def to_markdown(report: dict) -> str:
    lines = [(f"{report['model']}; {report['dataset']}; {report['calibration_samples']} calibration samples "
             "(static: the same for all)"), ""]
    if "machine" in report:
        from machine import describe

        lines += [describe(report["machine"]), ""]
    lines += ["| model | top-1 % | embedding cosine to fp32: min | mean | file bytes |", "|---|---|---|---|---|"]
    for name, row in report["results"].items():
        if "failed" in row:
            lines.append(f"| {name} | {row['failed']} | - | - | - |")
            continue
        size = row["bytes"] if row["bytes"] is not None else "-"
        lines.append(f"| {name} | {row['top1']:.2f} | {row['min_cosine']:.5f} | {row['mean_cosine']:.6f} | {size} |")
    for name, dense in report.get("int4_dense_weights", {}).items():
        lines += ["", f"{name}: {dense['layers']} dense layers, weights {dense['int4_bytes']} bytes vs "
                      f"{dense['bytes']} float32 ({dense['int4_bytes'] / dense['bytes']:.3f}x)"
                      + (f"; left float: {'; '.join(dense['left_float'])}" if dense["left_float"] else "")]
    for name, build in report.get("pt2e_builds", {}).items():
        lines += ["", f"{name}: {build['note']}"]
    return "\n".join(lines) + "\n"


def pt2e_note(dense_layers: int, int8_layers: int) -> str:
    """How much of a PT2E model qcompile runs as integer kernels."""
    rest = dense_layers - int8_layers
    return (f"int8 kernels for {int8_layers} of the {dense_layers} dense layers PT2E quantized"
            + (f", the other {rest} as dequantize then float matmul" if rest else ""))


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import run_and_write

    run_and_write("encoder_accuracy", __doc__.splitlines()[0], run, to_markdown, THREADS)


if __name__ == "__main__":
    main()
