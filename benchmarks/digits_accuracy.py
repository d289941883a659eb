"""int8 accuracy on real data: qcompile PTQ vs ONNX Runtime quantize_static vs PyTorch PT2E.

Trains a small ResNet-style CNN on scikit-learn's 8x8 handwritten digits (1,797 real
scans shipped with the package; nothing is downloaded), holds out a test split, and
quantizes the same model with the same calibration samples three ways.  A second table is the
per-tensor case: a depthwise-separable CNN whose folded depthwise channel ranges are far apart
(:func:`imbalance_depthwise`), through qcompile PTQ with one weight scale per layer without and
with cross-layer equalization and bias correction, ONNX Runtime quantize_static, and
quantization-aware training (:mod:`qcompile.qat`, per-tensor) built by qcompile.  Prints a table
and writes out/benchmarks/digits_accuracy.{json,md} (benchmarks/results/ with ``--save``); the
JSON records the machine (CPU, flags, threads), the git commit and the date.

    .venv/bin/python benchmarks/digits_accuracy.py
    .venv/bin/python benchmarks/digits_accuracy.py --save
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CALIB_SAMPLES = 200
THREADS = 2
QAT_EPOCHS = 10


class DigitsNet(nn.Module):
    """Conv-BN-ReLU stem, two residual blocks (one strided), global pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.skip = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.relu1(y + self.block1(y))
        y = self.relu2(self.skip(y) + self.down(y))
        return self.head(y.mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """A MobileNet-style depthwise-separable CNN: conv-BN-ReLU stem, then depthwise 3x3 and
    pointwise 1x1 convs, each with BN and ReLU, global pool, linear head."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, k: int, groups: int = 1, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*cbr(1, 16, 3), *cbr(16, 16, 3, groups=16), *cbr(16, 32, 1),
                                      *cbr(32, 32, 3, groups=32, stride=2), *cbr(32, 64, 1))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def imbalance_depthwise(net: DepthwiseNet, decades: float = 3.0, seed: int = 0) -> DepthwiseNet:
    """``net`` with each depthwise conv's BN-folded channel ``c`` scaled by ``s_c`` (log-uniform
    over ``decades`` powers of ten, at most 1) and the next pointwise conv's input channel ``c``
    by ``1 / s_c``: the same function (ReLU is positively homogeneous), with the per-channel
    weight ranges of the folded depthwise convs as uneven as batch-norm folding leaves them in
    real MobileNets (a channel's folded weight is its conv weight times gamma / sigma)."""
    rng = np.random.default_rng(seed)
    layers = list(net.features)
    with torch.no_grad():
        for k, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                bn, pointwise = layers[k + 1], layers[k + 3]
                s = torch.from_numpy(10.0 ** -rng.uniform(0.0, decades, layer.out_channels)).float()
                bn.weight.mul_(s)
                bn.bias.mul_(s)
                pointwise.weight.div_(s[None, :, None, None])
    return net


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y); x is N x 1 x 8 x 8 float32 in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1297], y[:1297], x[1297:], y[1297:]


def train(x: np.ndarray, y: np.ndarray, epochs: int = 40, seed: int = 0, make=DigitsNet) -> nn.Module:
    torch.manual_seed(seed)
    net = make()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent, one sample at a time (batch 1, as deployed)."""
    hits = sum(int(np.argmax(predict(x[i:i + 1])) == y[i]) for i in range(len(x)))
    return 100.0 * hits / len(x)


def qcompile_predictors(net: nn.Module, calib: np.ndarray, workdir: Path) -> dict:
    """fp32 and int8 builds of ``net`` with qcompile; returns {name: (predict, bytes)}."""
    from qcompile.build import build
    from qcompile.frontend import import_model
    from qcompile.quantize import Int8Config, quantize_model
    from qcompile.runtime import CompiledModel
    from qcompile.target import resolve_target

    pt2 = workdir / "digits.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 8, 8),)), str(pt2))
    target = resolve_target("native")
    model = import_model(str(pt2))
    out = {}
    # an accuracy benchmark: no tuning records (the committed ones are for the torchvision models)
    art = build(model, target, workdir, name="digits-fp32", tuning_logs=False)
    out["qcompile fp32"] = art
    for method in ("minmax", "percentile", "entropy", "mse"):
        batches = [{"x": calib[i:i + 1]} for i in range(len(calib))]
        config = Int8Config(calibration=method, num_samples=len(calib))
        qmodel = quantize_model(model, batches, config, target.to_tvm())
        out[f"qcompile int8 ({method})"] = build(qmodel, target, workdir, name=f"digits-int8-{method}",
                                                 tuning_logs=False)
    result = {}
    for name, artifact in out.items():
        runner = CompiledModel.load(artifact.library)
        result[name] = (lambda x, r=runner: r.run({"x": x})["output0"], artifact.library.stat().st_size)
    return result


def export_onnx(net: nn.Module, path: Path) -> Path:
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    return path


def ort_predictors(net: nn.Module, calib: np.ndarray, workdir: Path, variants=((True, False), (True, True)),
                   stem: str = "digits") -> dict:
    """ONNX Runtime fp32 and quantize_static (QDQ, U8S8, MinMax), one model per
    (per_channel, reduce_range) in ``variants``."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = export_onnx(net, workdir / f"{stem}.onnx")
    pre = workdir / f"{stem}-pre.onnx"
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    paths = [("ONNX Runtime fp32", fp32)]
    # reduce_range (7-bit weights) is ORT's remedy for u8 x s8 saturation on CPUs without VNNI.
    for per_channel, reduce_range in variants:
        int8 = workdir / f"{stem}-ort-int8-pc{int(per_channel)}-rr{int(reduce_range)}.onnx"
        quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        notes = ([] if per_channel else ["per-tensor"]) + (["reduce_range"] if reduce_range else [])
        paths.append(("ONNX Runtime int8 (quantize_static QDQ" + "".join(f", {n}" for n in notes) + ")", int8))
    result = {}
    for name, path in paths:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        result[name] = (lambda x, s=sess: s.run(None, {"x": x})[0], path.stat().st_size)
    return result


def pt2e_quantize(net: nn.Module, example: tuple, calib: np.ndarray, quantizer):
    """PyTorch PT2E post-training quantization of ``net`` as a PyTorch user does it: export
    (strict) at ``example``, ``prepare_pt2e`` with ``quantizer``, one calibration sample at a
    time, ``convert_pt2e``; returns the converted ``torch.fx.GraphModule``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(net, example, strict=True).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            prepared(torch.from_numpy(calib[i:i + 1]))
    return convert_pt2e(prepared)


def x86_quantizer(is_dynamic: bool = False):
    """torchao's X86InductorQuantizer with its default config for the whole model (int8
    weights per channel; activations uint8 per tensor, calibrated or with ``is_dynamic``
    computed from each input at run time)."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=is_dynamic))


def pt2e_predictor(net: nn.Module, calib: np.ndarray, per_tensor: bool = False) -> dict:
    """PyTorch PT2E post-training quantization (:func:`pt2e_quantize`): torchao's
    X86InductorQuantizer (static, per-channel weights), or with ``per_tensor`` the same
    quantizer with one weight scale per layer (``qcompile.qat.quantizer(per_channel=False)``:
    X86InductorQuantizer's default has no per-tensor weights)."""
    if per_tensor:
        import qcompile.qat

        quantizer = qcompile.qat.quantizer(per_channel=False)
    else:
        quantizer = x86_quantizer()
    converted = pt2e_quantize(net, (torch.zeros(1, 1, 8, 8),), calib, quantizer)

    def predict(x):
        with torch.no_grad():
            return converted(torch.from_numpy(x)).numpy()

    name = "PyTorch int8 (PT2E, per-tensor weights)" if per_tensor else "PyTorch int8 (PT2E, X86InductorQuantizer)"
    return {name: (predict, None)}


def depthwise_predictors(net: nn.Module, calib: np.ndarray, workdir: Path) -> dict:
    """The per-tensor case: a depthwise-separable CNN with uneven depthwise channels
    (:func:`imbalance_depthwise`) through qcompile PTQ with one weight scale per layer,
    without and with cross-layer equalization (CLE) and bias correction (BC), per-channel
    for comparison, and ONNX Runtime quantize_static per-tensor and per-channel."""
    import qcompile

    path = export_onnx(net, workdir / "depthwise.onnx")
    per_tensor = {"weights": qcompile.PerTensor(), "num_samples": len(calib)}
    configs = {
        "qcompile fp32": None,
        "qcompile int8 per-tensor": qcompile.Int8Config(**per_tensor, equalize=False, bias_correction=False),
        "qcompile int8 per-tensor + CLE": qcompile.Int8Config(**per_tensor, bias_correction=False),
        "qcompile int8 per-tensor + BC": qcompile.Int8Config(**per_tensor, equalize=False),
        "qcompile int8 per-tensor + CLE + BC (default)": qcompile.Int8Config(**per_tensor),
        "qcompile int8 per-channel": qcompile.Int8Config(num_samples=len(calib)),
        "qcompile int8 per-channel + CLE + BC": qcompile.Int8Config(num_samples=len(calib), equalize=True,
                                                                    bias_correction=True),
    }
    result = {}
    for k, (name, config) in enumerate(configs.items()):
        art = qcompile.compile(str(path), quantization=config, calibration_data={"x": calib} if config else None,
                               out_dir=workdir, name=f"depthwise-{k}", tuning_logs=False)
        runner = qcompile.load(art.library)
        result[name] = (lambda x, r=runner: r.run({"x": x})["y"], art.library.stat().st_size)
    result.update(ort_predictors(net, calib, workdir, variants=((False, False), (True, False)), stem="depthwise"))
    return result


def qat_predictor(net: nn.Module, x: np.ndarray, y: np.ndarray, workdir: Path, epochs: int = QAT_EPOCHS) -> dict:
    """Quantization-aware training with :mod:`qcompile.qat` (per-tensor weights, as the
    per-tensor PTQ rows), ``epochs`` from the float weights, built by qcompile."""
    import qcompile
    import qcompile.qat

    prepared = qcompile.qat.prepare(net, (torch.zeros(1, 1, 8, 8),), per_channel=False)
    torch.manual_seed(0)
    opt = torch.optim.Adam(prepared.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(prepared(xt[idx]), yt[idx]).backward()
            opt.step()
    path = qcompile.qat.save(qcompile.qat.convert(prepared), workdir / "depthwise-qat.pt2")
    art = qcompile.compile(str(path), out_dir=workdir, tuning_logs=False)
    runner = qcompile.load(art.library)
    name_in, name_out = runner.inputs[0].name, runner.outputs[0].name
    return {f"qcompile int8 per-tensor QAT ({epochs} epochs, qcompile.qat)":
            (lambda x, r=runner: r.run({name_in: x})[name_out], art.library.stat().st_size)}


def run() -> dict:
    torch.set_num_threads(THREADS)
    xtr, ytr, xte, yte = load_digits()
    started = time.perf_counter()
    net = train(xtr, ytr)
    train_s = time.perf_counter() - started
    calib = xtr[:CALIB_SAMPLES]
    rows = {"PyTorch fp32 (reference)": (lambda x: net(torch.from_numpy(x)).detach().numpy(), None)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.update(qcompile_predictors(net, calib, work))
        rows.update(ort_predictors(net, calib, work))
        rows.update(pt2e_predictor(net, calib))
        table = _table(rows, xte, yte)
        dw_net = imbalance_depthwise(train(xtr, ytr, epochs=20, make=DepthwiseNet))
        dw_rows = {"PyTorch fp32 (reference)": (lambda x: dw_net(torch.from_numpy(x)).detach().numpy(), None)}
        dw_rows.update(depthwise_predictors(dw_net, calib, work))
        dw_rows.update(pt2e_predictor(dw_net, calib, per_tensor=True))
        dw_rows.update(pt2e_predictor(dw_net, calib))
        dw_rows.update(qat_predictor(dw_net, xtr, ytr, work))
        dw_table = _table(dw_rows, xte, yte)
    return {"dataset": "scikit-learn digits 8x8: 1297 train / 500 test", "calibration_samples": CALIB_SAMPLES,
            "train_seconds": round(train_s, 1), "results": table,
            "depthwise_per_tensor": {"model": DEPTHWISE_CASE, "results": dw_table}}


DEPTHWISE_CASE = ("DepthwiseNet (conv, 2x depthwise 3x3 + pointwise 1x1, each with BN + ReLU), 20 epochs; each "
                  "depthwise channel c then scaled by s_c (log-uniform over 3 decades) and the next pointwise "
                  "conv's input channel c by 1/s_c: the same function, folded depthwise channel ranges ~1000x "
                  "apart (as BN folding leaves them in MobileNets); the activation between them is uneven too")


def _table(rows: dict, x: np.ndarray, y: np.ndarray) -> dict:
    table = {name: {"top1": round(accuracy(pred, x, y), 2), "bytes": size} for name, (pred, size) in rows.items()}
    ref = table["PyTorch fp32 (reference)"]["top1"]
    for entry in table.values():
        entry["drop_vs_fp32"] = round(ref - entry["top1"], 2)
    return table


def to_markdown(report: dict) -> str:
    lines = [f"{report['dataset']}, {report['calibration_samples']} calibration samples (same for all)", ""]
    if "machine" in report:
        from machine import describe

        lines += [describe(report["machine"]), ""]
    lines += _markdown_rows(report["results"])
    if "depthwise_per_tensor" in report:
        case = report["depthwise_per_tensor"]
        title = ("Per-tensor weights on a depthwise-separable CNN with uneven depthwise channels: "
                 "cross-layer equalization (CLE), bias correction (BC) and quantization-aware training (QAT).")
        lines += ["", title, "", case["model"], ""]
        lines += _markdown_rows(case["results"])
    return "\n".join(lines) + "\n"


def _markdown_rows(results: dict) -> list[str]:
    lines = ["| model | top-1 % | drop vs fp32 (points) | file bytes |", "|---|---|---|---|"]
    for name, row in results.items():
        size = row["bytes"] if row["bytes"] is not None else "-"
        lines.append(f"| {name} | {row['top1']:.2f} | {row['drop_vs_fp32']:+.2f} | {size} |")
    return lines


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import run_and_write

    run_and_write("digits_accuracy", __doc__.splitlines()[0], run, to_markdown, THREADS)


if __name__ == "__main__":
    main()
