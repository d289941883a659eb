"""The model zoo: many architectures through qcompile, float32 and int8, in one table.

Every model is built here with seeded random weights (torchvision with ``weights=None``,
``transformers`` from configs, small modules of our own) and exported here (ONNX with the
TorchScript and the dynamo exporter, ``torch.export`` .pt2, ONNX Runtime's quantizers);
nothing is downloaded.  Per model the table records:

- float32: does it build, and its max abs difference to the reference divided by the
  reference's max abs value (ONNX Runtime for ONNX files, PyTorch for .pt2/torchvision
  names; 1e-4 is a match);
- int8 PTQ (8 random calibration samples of the inputs' dtypes and shapes; token inputs are
  random ints in range): does it build, how many conv/linear/matmul layers run integer (the
  manifest's integer layers against its ``float_ops`` convolutions and matmuls), and its
  agreement with float32 (top-1 agreement over a few inputs for classifiers, the lowest
  cosine similarity of the outputs for all: random-weight classifiers' top logits lie close
  together, so top-1 flips where the logits still agree);
- pre-quantized ONNX (``quantize_static`` QDQ and QOperator, ``quantize_dynamic``): built
  without ``quantization=``, max abs difference to ONNX Runtime running the same file with
  graph optimizations off (the graph's own quantize/dequantize semantics);
- .so size int8 / float32, and the parameter count.

Each model runs in its own subprocess under ``--timeout``, so a crash or a hang costs one
row (with the error's first line), not the zoo.  Output: a table on stdout and
``out/benchmarks/zoo.{md,json}`` (``benchmarks/results/`` with ``--save``); the JSON holds
the machine record.

    .venv/bin/python benchmarks/zoo.py --list
    .venv/bin/python benchmarks/zoo.py --only squeezenet1_1,unet-onnx
    .venv/bin/python benchmarks/zoo.py --classes cnn,recurrent --skip-int8
    .venv/bin/python benchmarks/zoo.py --timeout 900 --save
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MATCH_RTOL = 1e-4  # float32: max abs diff / max abs reference
CALIB_SAMPLES = 8
EVAL_SAMPLES = 4
TARGET = "native"
CLASSES = ("cnn", "segmentation", "unet", "detection", "audio", "recurrent", "transformer", "prequantized")
CONV_MATMUL = {"conv1d", "conv2d", "conv3d", "conv1d_transpose", "conv2d_transpose", "conv3d_transpose",
               "matmul", "linear", "dense"}


# ----------------------------------------------------------------------------- model cases

@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape, dtype; int inputs are uniform in [low, high)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    low: int = 0
    high: int = 2

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        if self.dtype.startswith("int"):
            return rng.integers(self.low, self.high, size=self.shape).astype(self.dtype)
        return rng.standard_normal(self.shape).astype(self.dtype)


Feeds = dict[str, np.ndarray]


@dataclass
class Case:
    """A zoo model ready to build: what to import, how to feed it, what it must agree with.

    ``model``: a torchvision name or a file; ``reference``: feeds -> outputs in the model's
    output order; ``metric``: ``top1`` (classifiers) or ``cosine``; ``weights``: a state_dict file
    for a torchvision name.  A pre-quantized case
    builds ``model`` (the float file) and ``prequantized`` (ONNX Runtime's quantized file)."""

    model: str
    inputs: list[InputSpec]
    reference: Callable[[Feeds], list[np.ndarray]]
    metric: str
    params: int
    input_shapes: dict[str, tuple[int, ...]] | None = None
    prequantized: str | None = None
    weights: str | None = None  # a state_dict for a torchvision name
    onnx: str | None = None  # the same model as ONNX: ONNX Runtime's int8 of it is the baseline


@dataclass(frozen=True)
class Entry:
    """A named zoo row: its class, the exporter it goes through, and how to make its case."""

    name: str
    cls: str
    source: str
    make: Callable[[Path], Case]


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))
    return torch


def param_count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    if hasattr(out, "to_tuple"):
        return _flatten(out.to_tuple())
    return [out]


def torch_reference(module, inputs: list[InputSpec]) -> Callable[[Feeds], list[np.ndarray]]:
    """PyTorch's outputs, flattened in order, for feeds keyed by input name."""
    import torch

    def run(feeds: Feeds) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(feeds[i.name]) for i in inputs])
        return [t.detach().numpy() for t in _flatten(out)]

    return run


def ort_session(path: str | Path, optimized: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_reference(path: str | Path, optimized: bool = True) -> Callable[[Feeds], list[np.ndarray]]:
    """ONNX Runtime's outputs for the file (feeds it takes by name; extra feeds are dropped)."""
    session = ort_session(path, optimized)
    names = [i.name for i in session.get_inputs()]
    return lambda feeds: session.run(None, {n: feeds[n] for n in names})


def _examples(inputs: list[InputSpec]) -> tuple:
    import torch

    rng = np.random.default_rng(0)
    return tuple(torch.from_numpy(i.sample(rng)) for i in inputs)


def settle_batchnorm(module, inputs: list[InputSpec], batches: int = 4, batch: int = 4) -> None:
    """BatchNorm running statistics from random inputs (batch ``batch`` along axis 0).

    Freshly initialized running statistics (mean 0, variance 1) normalize nothing: a deep
    network's activations then vanish (EfficientNet-B0's logits: ~1e-14) and every output
    looks alike.  Statistics measured on inputs keep the activations at unit scale."""
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    rng = np.random.default_rng(3)
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            module(*[torch.from_numpy(InputSpec(i.name, (batch, *i.shape[1:]), i.dtype, i.low, i.high).sample(rng))
                     for i in inputs])
    module.eval()


def onnx_twin(module, examples: tuple, names: list[str], out_names: list[str], path: Path) -> str | None:
    """``module`` as ONNX (TorchScript exporter) beside its other form, for ONNX Runtime's int8
    baseline; None where the exporter cannot take it."""
    import torch

    try:
        torch.onnx.export(module, examples, str(path), input_names=names, output_names=out_names,
                          opset_version=17, dynamo=False)
    except Exception:  # noqa: BLE001 (no baseline for this model; the row says "-")
        return None
    return str(path)


def export(module, inputs: list[InputSpec], work: Path, how: str, stem: str,
           dynamic: dict[str, dict[int, str]] | None = None) -> Case:
    """``module`` exported as ``how`` (onnx: TorchScript exporter; onnx-dynamo; pt2) into ``work``;
    the reference is ONNX Runtime on the file (ONNX) or the module itself (.pt2).  ``dynamic``
    marks input axes dynamic (name -> axis -> symbol); the import fixes them by ``input_shapes``."""
    torch = _torch()
    settle_batchnorm(module, inputs)
    module = module.eval()
    examples = _examples(inputs)
    names = [i.name for i in inputs]
    shapes = {i.name: i.shape for i in inputs} if dynamic else None
    with torch.no_grad():
        probe = _flatten(module(*examples))
    out_names = [f"out{k}" for k in range(len(probe))]
    if how == "onnx":
        path = work / f"{stem}.onnx"
        torch.onnx.export(module, examples, str(path), input_names=names, output_names=out_names,
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
        return Case(str(path), inputs, ort_reference(path), "cosine", param_count(module), shapes, onnx=str(path))
    if how == "onnx-dynamo":
        path = work / f"{stem}.onnx"
        dyn = None
        if dynamic:
            dyn = {n: {ax: torch.export.Dim.AUTO for ax in dynamic.get(n, {})} for n in names}
        torch.onnx.export(module, examples, str(path), input_names=names, output_names=out_names,
                          dynamic_shapes=dyn, dynamo=True)
        return Case(str(path), inputs, ort_reference(path), "cosine", param_count(module), shapes, onnx=str(path))
    if how == "pt2":
        path = work / f"{stem}.pt2"
        dyn = None
        if dynamic:
            dyn = tuple({ax: torch.export.Dim.AUTO for ax in dynamic.get(n, {})} or None for n in names)
        program = torch.export.export(module, examples, dynamic_shapes=dyn)
        torch.export.save(program, str(path))
        return Case(str(path), inputs, torch_reference(module, inputs), "cosine", param_count(module), shapes,
                    onnx=onnx_twin(module, examples, names, out_names, work / f"{stem}-twin.onnx"))
    raise ValueError(f"unknown exporter {how!r}")


def _classifier(case: Case) -> Case:
    case.metric = "top1"
    return case


# --- torchvision classification (by name: qcompile's torchvision importer)

def torchvision_case(name: str, size: int, work: Path) -> Case:
    from qcompile.frontend.from_torch import torchvision_module

    torch = _torch()
    net = torchvision_module(name)
    inputs = [InputSpec("x", (1, 3, size, size))]
    settle_batchnorm(net, inputs)
    weights = work / f"{name}.pth"
    torch.save(net.state_dict(), weights)
    twin = onnx_twin(net, _examples(inputs), ["x"], ["out0"], work / f"{name}.onnx")
    return Case(name, inputs, torch_reference(net, inputs), "top1", param_count(net), {"": (1, 3, size, size)},
                weights=str(weights), onnx=twin)


def small_vit_case(how: str, work: Path) -> Case:
    """torchvision's VisionTransformer with 2 layers, 96x96 input, patch 16."""
    from torchvision.models import VisionTransformer

    torch = _torch()
    net = VisionTransformer(image_size=96, patch_size=16, num_layers=2, num_heads=4, hidden_dim=128, mlp_dim=256)
    torch.nn.init.normal_(net.heads.head.weight, std=0.02)  # torchvision zero-initializes the head
    return _classifier(export(net, [InputSpec("x", (1, 3, 96, 96))], work, how, "vit_small"))


# --- segmentation

def segmentation_case(name: str, how: str, size: int, work: Path) -> Case:
    import torchvision.models.segmentation as seg
    from torch import nn

    _torch()
    inner = getattr(seg, name)(weights=None, weights_backbone=None, num_classes=21)

    class Out(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x):
            return self.net(x)["out"]

    return export(Out(), [InputSpec("x", (1, 3, size, size))], work, how, name)


# --- U-Net and a YOLO-style detector (modules of our own)

def _unet():
    from torch import nn

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, padding=1), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        """Two strided-conv downs, a ConvTranspose2d up and an Upsample up, skip concats."""

        def __init__(self, c: int = 16, classes: int = 4) -> None:
            super().__init__()
            self.enc0 = block(3, c)
            self.down1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
            self.enc1 = block(2 * c, 2 * c)
            self.down2 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)
            self.mid = block(4 * c, 4 * c)
            self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
            self.dec1 = block(4 * c, 2 * c)
            self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.dec0 = block(3 * c, c)
            self.head = nn.Conv2d(c, classes, 1)

        def forward(self, x):
            import torch

            e0 = self.enc0(x)
            e1 = self.enc1(self.down1(e0))
            m = self.mid(self.down2(e1))
            d1 = self.dec1(torch.cat([self.up2(m), e1], dim=1))
            d0 = self.dec0(torch.cat([self.up1(d1), e0], dim=1))
            return self.head(d0)

    return UNet()


def unet_case(how: str, work: Path, size: int = 64) -> Case:
    _torch()
    return export(_unet(), [InputSpec("x", (1, 3, size, size))], work, how, "unet")


def _yolo(classes: int = 8):
    import torch
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, i: int, o: int, k: int = 1, s: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(i, o, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(o)
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class C2f(nn.Module):
        """YOLOv8's C2f: a 1x1 conv, a channel split, bottlenecks on one half, concat, 1x1 conv."""

        def __init__(self, i: int, o: int) -> None:
            super().__init__()
            self.c = o // 2
            self.cv1 = Conv(i, 2 * self.c)
            self.m = nn.Sequential(Conv(self.c, self.c, 3), Conv(self.c, self.c, 3))
            self.cv2 = Conv(3 * self.c, o)

        def forward(self, x):
            a, b = self.cv1(x).split((self.c, self.c), dim=1)
            return self.cv2(torch.cat([a, b, self.m(b)], dim=1))

    class Yolo(nn.Module):
        """Backbone to strides 8 and 16, an upsample-and-concat neck, and anchor-free heads."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32), Conv(32, 64, 3, 2))
            self.p3 = C2f(64, 64)
            self.p4 = nn.Sequential(Conv(64, 128, 3, 2), C2f(128, 128))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.fuse = C2f(192, 64)
            self.no = 4 + classes
            self.head3 = nn.Sequential(Conv(64, 64, 3), nn.Conv2d(64, self.no, 1))
            self.head4 = nn.Sequential(Conv(128, 64, 3), nn.Conv2d(64, self.no, 1))

        def forward(self, images):
            p3 = self.p3(self.stem(images))
            p4 = self.p4(p3)
            f3 = self.fuse(torch.cat([self.up(p4), p3], dim=1))
            outs = [self.head3(f3).flatten(2), self.head4(p4).flatten(2)]
            y = torch.cat(outs, dim=2)
            box, cls = y.split((4, self.no - 4), dim=1)
            return torch.cat([box, cls.sigmoid()], dim=1)

    return Yolo()


def yolo_case(how: str, work: Path, size: int = 96) -> Case:
    """Exported with dynamic height and width; the import fixes them by ``input_shapes``."""
    _torch()
    return export(_yolo(), [InputSpec("images", (1, 3, size, size))], work, how, "yolo_head",
                  dynamic={"images": {2: "height", 3: "width"}})


# --- 1-D conv audio and sequence nets

def _conv1d_stack(c_in: int, c: int, classes: int):
    from torch import nn

    return nn.Sequential(
        nn.Conv1d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm1d(c), nn.ReLU(),
        nn.Conv1d(c, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(c), nn.ReLU(),
        nn.Conv1d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * c, classes))


def audio_case(kind: str, how: str, work: Path) -> Case:
    """``kws``: a keyword spotter on 40x98 log-mel frames; ``wave``: a raw-waveform front end
    (strided Conv1d) and classifier; ``tokens``: int64 ids through an Embedding; ``onehot``:
    int32 ids one-hot encoded, plus a per-token bias gathered from a table."""
    torch = _torch()
    from torch import nn

    if kind == "kws":
        net, inputs = _conv1d_stack(40, 64, 12), [InputSpec("mel", (1, 40, 98))]
    elif kind == "wave":
        front = nn.Sequential(nn.Conv1d(1, 32, 80, stride=16, bias=False), nn.BatchNorm1d(32), nn.ReLU())
        net, inputs = nn.Sequential(front, _conv1d_stack(32, 32, 10)), [InputSpec("wave", (1, 1, 4000))]
    elif kind == "tokens":
        class Tokens(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(1000, 64)
                self.body = _conv1d_stack(64, 64, 5)

            def forward(self, ids):
                return self.body(self.emb(ids).transpose(1, 2))

        net, inputs = Tokens(), [InputSpec("ids", (1, 64), "int64", 0, 1000)]
    elif kind == "onehot":
        class OneHot(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bias = nn.Parameter(torch.randn(20, 1))
                self.body = _conv1d_stack(20, 32, 3)

            def forward(self, seq):
                hot = nn.functional.one_hot(seq.long(), 20).float() + self.bias[seq.long()]
                return self.body(hot.transpose(1, 2))

        net, inputs = OneHot(), [InputSpec("seq", (1, 64), "int32", 0, 20)]
    else:
        raise ValueError(kind)
    return _classifier(export(net, inputs, work, how, f"conv1d_{kind}"))


# --- recurrent nets

def _recurrent(kind: str, bidirectional: bool, features: int = 32, hidden: int = 48, classes: int = 6):
    from torch import nn

    class Rnn(nn.Module):
        """An LSTM/GRU over [1, T, F] with initial states as inputs, and a dense head on the last step."""

        def __init__(self) -> None:
            super().__init__()
            cell = nn.LSTM if kind == "lstm" else nn.GRU
            self.rnn = cell(features, hidden, batch_first=True, bidirectional=bidirectional)
            self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

        def forward(self, x, h0, c0=None):
            y, state = self.rnn(x, (h0, c0) if c0 is not None else h0)
            states = list(state) if isinstance(state, tuple) else [state]
            return (self.head(y[:, -1]), *states)

    return Rnn()


def recurrent_case(kind: str, bidirectional: bool, how: str, work: Path, seq: int = 16) -> Case:
    _torch()
    dirs = 2 if bidirectional else 1
    inputs = [InputSpec("x", (1, seq, 32)), InputSpec("h0", (dirs, 1, 48))]
    if kind == "lstm":
        inputs.append(InputSpec("c0", (dirs, 1, 48)))
    stem = f"{kind}{'_bi' if bidirectional else ''}"
    return export(_recurrent(kind, bidirectional), inputs, work, how, stem)


# --- transformers (random weights from configs)

def _hf(kind: str, layers: int | None = None):
    """(module, inputs, metric) for a transformers model built from a config."""
    import transformers as tf
    from torch import nn

    ids = lambda seq, vocab=1000: InputSpec("input_ids", (1, seq), "int64", 0, vocab)
    mask = lambda seq: InputSpec("attention_mask", (1, seq), "int64", 1, 2)
    if kind in ("bert", "minilm"):
        shape = ({"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
                 if kind == "bert" else
                 {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536})
        if layers:
            shape["num_hidden_layers"] = layers
        model = tf.BertModel(tf.BertConfig(vocab_size=1000, max_position_embeddings=128, **shape))
        inputs = [ids(32), mask(32)]
    elif kind == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=1000, max_position_embeddings=128, dim=256,
                                                       n_layers=layers or 2, n_heads=4, hidden_dim=1024))
        inputs = [ids(32), mask(32)]
    elif kind == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=64, patch_size=16, hidden_size=128,
                                                          num_hidden_layers=layers or 2, num_attention_heads=4,
                                                          intermediate_size=256, num_labels=10))
        inputs = [InputSpec("pixel_values", (1, 3, 64, 64))]
    elif kind == "whisper":
        config = tf.WhisperConfig(vocab_size=1000, d_model=128, encoder_layers=layers or 2,
                                  encoder_attention_heads=4, encoder_ffn_dim=256, decoder_layers=1,
                                  decoder_attention_heads=4, decoder_ffn_dim=256, num_mel_bins=80,
                                  max_source_positions=50, max_target_positions=64, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=1, decoder_start_token_id=1)
        model = tf.WhisperModel(config).get_encoder()
        inputs = [InputSpec("input_features", (1, 80, 100))]
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=1000, n_positions=64, n_embd=128,
                                                 n_layer=layers or 2, n_head=4, use_cache=False))
        inputs = [ids(32), mask(32)]  # with a mask: without one, transformers derives packed-sequence masks
    else:
        raise ValueError(kind)

    class Plain(nn.Module):
        """Tensors in, the model's output tensors out (no ModelOutput, no cache)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model.eval()

        def forward(self, *args):
            extra = {"use_cache": False} if kind == "gpt2" else {}
            out = self.model(**{i.name: a for i, a in zip(inputs, args)}, return_dict=False, **extra)
            return tuple(out[:2]) if kind == "bert" or kind == "minilm" else out[0]

    return Plain(), inputs, "top1" if kind == "vit" else "cosine"


def transformer_case(kind: str, how: str, work: Path, layers: int | None = None) -> Case:
    _torch()
    module, inputs, metric = _hf(kind, layers)
    case = export(module, inputs, work, how, f"{kind}{layers or ''}")
    case.metric = metric
    return case


# --- ONNX Runtime pre-quantized models

def prequantized_case(base: Callable[[Path], Case], fmt: str, work: Path) -> Case:
    """``base``'s ONNX file quantized by ONNX Runtime: ``qdq`` / ``qop`` (quantize_static, per-channel
    U8S8, QDQ or QOperator format) or ``dynamic`` (quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    case = base(work)
    src = Path(case.model)
    out = work / f"{src.stem}-{fmt}.onnx"
    if fmt == "dynamic":
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    else:
        rng = np.random.default_rng(2)
        samples = [{i.name: i.sample(rng) for i in case.inputs} for _ in range(CALIB_SAMPLES)]
        ort_quantize_static(src, out, samples, fmt)
    case.prequantized = str(out)
    return case


def unshare_initializers(src: Path, out: Path) -> Path:
    """``src`` with every initializer read by several nodes copied per reader, written to ``out``.

    The TorchScript exporter merges equal initializers (a BERT's all-zero dense biases become
    one tensor with a LayerNorm's bias); ONNX Runtime's QOperator quantizer then stores that
    shared tensor as uint8 and also uses it as a QGemm's int32 bias, a file its own loader rejects."""
    import onnx

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__copy{len(model.graph.initializer)}"
                model.graph.initializer.append(copy)
                node.input[k] = copy.name
            seen.add(name)
    onnx.save(model, str(out))
    return out


def ort_quantize_static(src: Path, out: Path, samples: list[Feeds], fmt: str = "qdq") -> None:
    """ONNX Runtime's ``quantize_static`` of ``src`` (after its pre-processing) into ``out``:
    per-channel U8S8, MinMax over ``samples``, QDQ (``qdq``) or QOperator (``qop``) format."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(f"{src.stem}-pre.onnx")
    # ONNX Runtime's symbolic shape inference writes (and on a failure leaves) temporary files
    # in the working directory: run it in the model's folder
    with contextlib.chdir(out.parent):
        quant_pre_process(str(unshare_initializers(src, out.with_name(f"{src.stem}-unshared.onnx"))), str(pre))
    names = [i.name for i in ort_session(pre, optimized=False).get_inputs()]
    feeds = [s if set(names) <= set(s) else dict(zip(names, s.values())) for s in samples]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    with contextlib.chdir(out.parent):
        quantize_static(str(pre), str(out), Reader(),
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


# --- the registry

def _zoo() -> list[Entry]:
    p = functools.partial
    entries: list[Entry] = []
    for name in ("resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x0_5",
                 "squeezenet1_1", "densenet121", "regnet_y_400mf", "convnext_tiny", "swin_t"):
        entries.append(Entry(name, "cnn", "torchvision", p(torchvision_case, name, 96)))
    entries.append(Entry("vit_small-pt2", "cnn", "pt2", p(small_vit_case, "pt2")))
    entries.append(Entry("vit_small-onnx", "cnn", "onnx", p(small_vit_case, "onnx")))
    entries.append(Entry("lraspp_mobilenet_v3_large-pt2", "segmentation", "pt2",
                         p(segmentation_case, "lraspp_mobilenet_v3_large", "pt2", 128)))
    entries.append(Entry("lraspp_mobilenet_v3_large-onnx", "segmentation", "onnx",
                         p(segmentation_case, "lraspp_mobilenet_v3_large", "onnx", 128)))
    entries.append(Entry("deeplabv3_mobilenet_v3_large-pt2", "segmentation", "pt2",
                         p(segmentation_case, "deeplabv3_mobilenet_v3_large", "pt2", 128)))
    for how in ("onnx", "pt2"):
        entries.append(Entry(f"unet-{how}", "unet", how, p(unet_case, how)))
        entries.append(Entry(f"yolo_head-{how}", "detection", how, p(yolo_case, how)))
    for kind in ("kws", "wave", "tokens", "onehot"):
        for how in ("onnx", "pt2"):
            entries.append(Entry(f"conv1d_{kind}-{how}", "audio", how, p(audio_case, kind, how)))
    for kind in ("lstm", "gru"):
        for bi in (False, True):
            stem = f"{kind}{'_bi' if bi else ''}"
            entries.append(Entry(f"{stem}-onnx", "recurrent", "onnx", p(recurrent_case, kind, bi, "onnx")))
    for kind in ("bert", "minilm", "distilbert", "vit", "whisper", "gpt2"):
        for how in ("onnx", "onnx-dynamo", "pt2"):
            entries.append(Entry(f"hf_{kind}-{how}", "transformer", how, p(transformer_case, kind, how)))
    bases = {"bert": p(transformer_case, "bert", "onnx"), "squeezenet1_1": p(_squeezenet_onnx, 96),
             "lstm": p(recurrent_case, "lstm", False, "onnx")}
    for base, make in bases.items():
        for fmt in ("qdq", "qop", "dynamic"):
            entries.append(Entry(f"{base}-ort-{fmt}", "prequantized", f"onnx-{fmt}",
                                 p(prequantized_case, make, fmt)))
    return entries


def _squeezenet_onnx(size: int, work: Path) -> Case:
    from qcompile.frontend.from_torch import torchvision_module

    _torch()
    return _classifier(export(torchvision_module("squeezenet1_1"), [InputSpec("x", (1, 3, size, size))], work,
                              "onnx", "squeezenet1_1"))


ZOO: dict[str, Entry] = {e.name: e for e in _zoo()}


# ----------------------------------------------------------------------------- measuring

def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    from qcompile.errors import QcompileError

    return line if isinstance(exc, QcompileError) and line else f"{type(exc).__name__}: {line}"


def rel_diff(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """max over outputs of max |ours - ref| / max |ref|."""
    if len(ours) != len(ref):
        raise ValueError(f"{len(ours)} outputs, the reference has {len(ref)}")
    worst = 0.0
    for a, b in zip(ours, ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output shape {list(a.shape)}, the reference's is {list(b.shape)}")
        scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-12)
        worst = max(worst, float(np.abs(a - b).max()) / scale if a.size else 0.0)
    return worst


def max_abs_diff(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) for a, b in zip(ours, ref))


def agreement(metric: str, ours: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> float:
    """top1: share of inputs whose first output has the same argmax; cosine: the lowest cosine
    similarity over inputs and outputs."""
    if metric == "top1":
        return float(np.mean([a[0].reshape(-1).argmax() == b[0].reshape(-1).argmax() for a, b in zip(ours, ref)]))
    worst = 1.0
    for outs_a, outs_b in zip(ours, ref):
        for a, b in zip(outs_a, outs_b):
            a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            worst = min(worst, float(a @ b / denom) if denom else float(np.array_equal(a, b)))
    return worst


def integer_share(quantization: dict) -> tuple[int, int]:
    """(integer conv/matmul layers, all conv/linear/matmul layers) from a manifest's quantization.
    A float ``relax.call_tir`` is the fused LSTM/GRU recurrence (qcompile.kernels.recurrent, the
    only kernel call an import writes): its recurrent matmul counts as a float layer."""
    integer = sum(1 for layer in quantization.get("layers", []) if layer.get("op") in CONV_MATMUL)
    left = sum(n for op, n in quantization.get("float_ops", {}).items()
               if op.split(".")[-1] in CONV_MATMUL or op == "relax.call_tir")
    return integer, integer + left


def run_compiled(compiled, feeds: Feeds) -> list[np.ndarray]:
    """Run with feeds keyed by our input names (positionally where the model names them otherwise)."""
    names = [i.name for i in compiled.inputs]
    if not set(names) <= set(feeds):
        feeds = dict(zip(names, feeds.values()))
    out = compiled.run({n: feeds[n] for n in names})
    return [out[o.name] for o in compiled.outputs]


def case_samples(case: Case) -> tuple[list[Feeds], list[Feeds]]:
    """The evaluation inputs and the calibration samples of ``case`` (seeded: every run, and every
    script that builds the zoo, calibrates on the same samples)."""
    rng = np.random.default_rng(1)
    evals = [{i.name: i.sample(rng) for i in case.inputs} for _ in range(EVAL_SAMPLES)]
    calib = [{i.name: i.sample(rng) for i in case.inputs} for _ in range(CALIB_SAMPLES)]
    return evals, calib


def import_case(case: Case):
    import qcompile

    return qcompile.import_model(case.model, case.input_shapes, weights=case.weights)


def build_fp32(imported, work: Path):
    """The untuned float32 build of an imported case: ``work/fp32.so``."""
    import qcompile

    return qcompile.compile(imported, TARGET, out_dir=work, name="fp32", tuning_logs=False)


def build_int8(case: Case, imported, calib: list[Feeds], work: Path):
    """The untuned int8 build, ``work/int8.so``: the pre-quantized file as it is, else PTQ of
    ``imported`` (None: imported here) calibrated on ``calib``."""
    import qcompile

    if case.prequantized:
        return qcompile.compile(case.prequantized, TARGET, out_dir=work, name="int8",
                                input_shapes=case.input_shapes, tuning_logs=False)
    if imported is None:
        imported = import_case(case)
    names = [i.name for i in imported.inputs]
    batches = [dict(zip(names, c.values())) if not set(names) <= set(c) else c for c in calib]
    return qcompile.compile(imported, TARGET, quantization=qcompile.Int8Config(num_samples=CALIB_SAMPLES),
                            calibration_data=batches, out_dir=work, name="int8", tuning_logs=False)


def run_entry(entry: Entry, work: Path, int8: bool = True,
              report: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Build ``entry`` float32 (and int8) in ``work`` and measure it; the record the table shows.

    ``report`` gets the record after every stage (a subprocess saves it, so a crash or a timeout
    keeps what was measured before)."""
    import qcompile

    record: dict[str, Any] = {"name": entry.name, "class": entry.cls, "source": entry.source, "stage": "export"}
    save = report or (lambda _r: None)

    def stage(name: str) -> None:
        record["stage"] = name
        save(record)

    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    try:
        case = entry.make(work)
    except Exception as exc:  # noqa: BLE001 (recorded: the row says the export failed)
        record["export_error"] = first_line(exc)
        record["stage"] = "done"
        save(record)
        return record
    record["params"] = case.params
    record["inputs"] = {i.name: f"{i.dtype}{list(i.shape)}" for i in case.inputs}
    evals, calib = case_samples(case)

    stage("fp32")
    fp32: dict[str, Any] = {"ok": False}
    record["fp32"] = fp32
    float_outs = None
    try:
        t0 = time.perf_counter()
        imported = import_case(case)
        artifact = build_fp32(imported, work)
        fp32.update(ok=True, bytes=artifact.manifest.library["bytes"], seconds=round(time.perf_counter() - t0, 1))
        save(record)
        compiled = qcompile.load(artifact.library)
        float_outs = [run_compiled(compiled, f) for f in evals]
        refs = [case.reference(f) for f in evals]
        fp32["rel_diff"] = max(rel_diff(o, r) for o, r in zip(float_outs, refs))
        fp32["ref_max_abs"] = max(float(np.abs(t).max()) for r in refs for t in r)  # 0: a degenerate model
        fp32["match"] = fp32["rel_diff"] <= MATCH_RTOL
    except Exception as exc:  # noqa: BLE001
        fp32["error"] = first_line(exc)
        fp32.setdefault("trace", traceback.format_exc(limit=-3))
        imported = None

    if int8 or case.prequantized:
        stage("int8")
        q: dict[str, Any] = {"ok": False}
        record["int8"] = q
        try:
            t0 = time.perf_counter()
            artifact = build_int8(case, imported, calib, work)
            quant = artifact.manifest.quantization
            integer, total = integer_share(quant)
            q.update(ok=True, bytes=artifact.manifest.library["bytes"], seconds=round(time.perf_counter() - t0, 1),
                     integer_layers=integer, conv_matmul_layers=total,
                     float_ops=quant.get("float_ops", {}), conv_kernels=artifact.manifest.build.get("conv_kernels"))
            save(record)
            if fp32.get("bytes"):
                q["size_ratio"] = q["bytes"] / fp32["bytes"]
            compiled = qcompile.load(artifact.library)
            int_outs = [run_compiled(compiled, f) for f in evals]
            if case.prequantized:
                graph = ort_reference(case.prequantized, optimized=False)
                refs = [graph(f) for f in evals]
                q["ort_max_abs_diff"] = max(max_abs_diff(o, r) for o, r in zip(int_outs, refs))
                q["ort_rel_diff"] = max(rel_diff(o, r) for o, r in zip(int_outs, refs))
                fast = ort_reference(case.prequantized, optimized=True)
                q["ort_optimized_max_abs_diff"] = max(max_abs_diff(o, fast(f)) for o, f in zip(int_outs, evals))
            if float_outs is not None:
                q["metric"] = case.metric
                q["agreement"] = agreement(case.metric, int_outs, float_outs)
                q["cosine"] = agreement("cosine", int_outs, float_outs)
        except Exception as exc:  # noqa: BLE001
            q["error"] = first_line(exc)
            q["trace"] = traceback.format_exc(limit=-3)
        if case.onnx and not case.prequantized and float_outs is not None:
            stage("ort-int8")
            q["ort_int8"] = ort_int8_agreement(case, calib, evals, float_outs, work)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["stage"] = "done"
    save(record)
    return record


def ort_int8_file(case: Case, calib: list[Feeds], work: Path) -> Path:
    """ONNX Runtime's int8 of the case's ONNX file: ``work/ort-int8.onnx`` (QDQ, per-channel U8S8,
    MinMax over ``calib``)."""
    out = work / "ort-int8.onnx"
    ort_quantize_static(Path(case.onnx), out, calib)
    return out


def ort_int8_agreement(case: Case, calib: list[Feeds], evals: list[Feeds], float_outs: list[list[np.ndarray]],
                       work: Path) -> dict[str, Any]:
    """ONNX Runtime's int8 of the same model (quantize_static, same calibration samples, same
    scheme): its agreement with float32 on the same inputs, the baseline for ours.  A random-weight
    deep network can amplify small perturbations (rounding its weights alone moves its logits), so
    a low agreement means something only beside this one."""
    try:
        out = ort_int8_file(case, calib, work)
        run = ort_reference(out)
        names = [i.name for i in ort_session(out).get_inputs()]
        outs = [run(f if set(names) <= set(f) else dict(zip(names, f.values()))) for f in evals]
        return {"agreement": agreement(case.metric, outs, float_outs), "cosine": agreement("cosine", outs, float_outs)}
    except Exception as exc:  # noqa: BLE001 (recorded: the row says the baseline failed)
        return {"error": first_line(exc)}


# ----------------------------------------------------------------------------- the zoo run

def run_guarded(cmd: list[str], log: Path, timeout: float) -> tuple[str | None, list[str]]:
    """``cmd`` in a subprocess (its own process group, stderr into ``log``) under ``timeout``
    seconds: (None, or what went wrong: "exit N", "crashed (SIGSEGV)", "timeout after T s";
    the non-empty stderr lines)."""
    with open(log, "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            problem = None if code == 0 else (f"crashed ({signal.Signals(-code).name})" if code < 0 else f"exit {code}")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            problem = f"timeout after {timeout:g} s"
        err.seek(0)
        tail = [line.strip() for line in err.read().splitlines() if line.strip()]
    return problem, tail


def run_isolated(entry: Entry, work: Path, int8: bool, timeout: float) -> dict[str, Any]:
    """``run_entry`` in a subprocess (its own process group) under ``timeout`` seconds."""
    result = work / "record.json"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", entry.name, "--work", str(work),
           "--result", str(result)] + ([] if int8 else ["--skip-int8"])
    started = time.perf_counter()
    problem, tail = run_guarded(cmd, work / "stderr.log", timeout)
    try:
        record = json.loads(result.read_text())
    except (OSError, ValueError):
        record = {"name": entry.name, "class": entry.cls, "source": entry.source, "stage": "export"}
    if problem:
        where = record.get("stage", "export")
        message = f"{problem} in {where}" + (f": {tail[-1][:200]}" if tail and "crashed" in problem else "")
        if where == "export":
            record["export_error"] = message
        else:
            record.setdefault(where, {"ok": False})["error"] = message
    record.setdefault("seconds", round(time.perf_counter() - started, 1))
    return record


def _fmt_error(text: str | None, width: int = 90) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def row(record: dict[str, Any]) -> list[str]:
    """One table row: model, class, source, params, fp32, fp32 diff, int8, integer share, agreement,
    pre-quantized vs ONNX Runtime, .so int8/fp32, seconds."""
    params = record.get("params")
    cells = [record["name"], record["class"], record["source"], f"{params / 1e6:.2f}M" if params else "-"]
    if "export_error" in record:
        return cells + [f"export failed: {_fmt_error(record['export_error'])}"] + ["-"] * 7 + [
            f"{record.get('seconds', 0):.0f}"]
    fp32 = record.get("fp32", {})
    if fp32.get("ok"):
        cells.append("yes" if "error" not in fp32 else f"yes, run failed: {_fmt_error(fp32['error'])}")
        diff = fp32.get("rel_diff")
        cells.append("-" if diff is None else f"{diff:.1e}" + ("" if fp32.get("match") else " (no match)"))
    else:
        cells += [f"no: {_fmt_error(fp32.get('error'))}", "-"]
    q = record.get("int8")
    if q is None:
        cells += ["skipped", "-", "-", "-", "-", "-"]
    elif not q.get("ok"):
        cells += [f"no: {_fmt_error(q.get('error'))}", "-", "-", "-", "-", "-"]
    else:
        cells.append("yes" if "error" not in q else f"yes, run failed: {_fmt_error(q['error'])}")
        total = q.get("conv_matmul_layers", 0)
        cells.append(f"{q['integer_layers']}/{total} ({100 * q['integer_layers'] / total:.0f}%)" if total else "0/0")
        if "agreement" in q:
            cosine = f"cos {q.get('cosine', q['agreement']):.4f}"
            cells.append(f"top-1 {q['agreement']:.0%}, {cosine}" if q["metric"] == "top1" else cosine)
        else:
            cells.append("-")
        ort = q.get("ort_int8", {})
        if "cosine" in ort:
            cosine = f"cos {ort['cosine']:.4f}"
            cells.append(f"top-1 {ort['agreement']:.0%}, {cosine}" if q.get("metric") == "top1" else cosine)
        else:
            cells.append("failed" if "error" in ort else "-")
        cells.append(f"{q['ort_max_abs_diff']:.2e}" if "ort_max_abs_diff" in q else "-")
        cells.append(f"{q['size_ratio']:.2f}" if "size_ratio" in q else "-")
    cells.append(f"{record.get('seconds', 0):.0f}")
    return cells


HEADER = ["model", "class", "source", "params", "fp32 builds", "fp32 rel diff", "int8 builds",
          "integer conv/matmul", "int8 vs fp32", "ORT int8 vs fp32", "pre-q vs ORT", ".so int8/fp32", "s"]


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in records]
    return "\n".join(lines)


def select(only: str | None, classes: str | None) -> list[Entry]:
    entries = list(ZOO.values())
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ZOO]
        if unknown:
            raise SystemExit(f"--only: unknown model(s) {', '.join(unknown)} (--list shows the zoo)")
        entries = [ZOO[n] for n in names]
    if classes:
        wanted = {c.strip() for c in classes.split(",") if c.strip()}
        unknown = wanted - set(CLASSES)
        if unknown:
            raise SystemExit(f"--classes: unknown class(es) {', '.join(sorted(unknown))}; classes: {', '.join(CLASSES)}")
        entries = [e for e in entries if e.cls in wanted]
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names (--list shows them)")
    parser.add_argument("--classes", help=f"comma-separated classes: {', '.join(CLASSES)}")
    parser.add_argument("--skip-int8", action="store_true", help="float32 builds only (pre-quantized models still build)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model (default 900)")
    parser.add_argument("--list", action="store_true", help="list the zoo and exit")
    parser.add_argument("--work", type=Path, help="keep each model's files in WORK/NAME/ (default: a temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    sys.path.insert(0, str(HERE))
    from machine import add_save_option, describe, machine_info, results_dir

    add_save_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    if args.worker:
        def save(record: dict) -> None:
            args.result.write_text(json.dumps(record, indent=2, default=str) + "\n")

        run_entry(ZOO[args.worker], args.work, int8=not args.skip_int8, report=save)
        return
    if args.list:
        for e in ZOO.values():
            print(f"{e.name:<40} {e.cls:<13} {e.source}")
        return
    entries = select(args.only, args.classes)
    machine = machine_info(int(os.environ["TVM_NUM_THREADS"]))
    out = results_dir(args.save)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()

    def write() -> str:
        text = (f"Model zoo: {len(records)} models, target {TARGET}, float32 and int8 PTQ "
                f"({CALIB_SAMPLES} random calibration samples), {EVAL_SAMPLES} random inputs each, "
                f"{time.perf_counter() - started:.0f} s\n\n{describe(machine)}\n\n{table(records)}\n")
        (out / "zoo.md").write_text(text)
        (out / "zoo.json").write_text(json.dumps(
            {"machine": machine, "target": TARGET, "match_rtol": MATCH_RTOL, "calibration_samples": CALIB_SAMPLES,
             "eval_samples": EVAL_SAMPLES, "int8": not args.skip_int8, "timeout_s": args.timeout,
             "models": records}, indent=2, default=str) + "\n")
        return text

    with tempfile.TemporaryDirectory(prefix="qcompile-zoo-") as tmp:
        root = args.work or Path(tmp)
        for index, entry in enumerate(entries, 1):
            print(f"[{index}/{len(entries)}] {entry.name} ...", file=sys.stderr, flush=True)
            work = root / entry.name
            if work.exists():
                shutil.rmtree(work)
            record = run_isolated(entry, work, not args.skip_int8, args.timeout)
            records.append(record)
            print("  " + " | ".join(row(record)), file=sys.stderr, flush=True)
            write()
    print(write())
    print(f"written to {out}/zoo.{{md,json}}")


if __name__ == "__main__":
    main()
