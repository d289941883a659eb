"""The fused LSTM/GRU kernel (qcompile.kernels.recurrent) and the models built on it.

The kernel alone is checked against a float64 numpy reading of the ONNX operator definitions
(its DynamicQuantizeLSTM form against a reading of that operator's per-step quantization).
torch-exported LSTM/GRU models (forward and bidirectional, initial states given or not, 1
and 100 steps, a Linear head on the last step as in benchmarks/zoo.py) are built and
compared with ONNX Runtime on the same file to 1e-5; each build is checked to run the
recurrence as one kernel call per layer.  int8 PTQ of such a model quantizes the input
projection and keeps the recurrence float32, and says so in the manifest.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import tvm
from torch import nn
from tvm.script import tirx as T

import qcompile
from qcompile.kernels.recurrent import (
    RecurrentShape,
    fast_tanh,
    recurrent_func,
    sigmoid,
)
from qcompile.target import resolve_target

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-5
FEATURES, HIDDEN, CLASSES = 32, 48, 6


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _definition(shape: RecurrentShape, xw, r, wb, rb, h0, c0):
    """ONNX's LSTM/GRU recurrence in float64 over the kernel's arguments: its one output."""
    hid, g = shape.hidden, shape.gates
    out = np.zeros((shape.seq + (2 if c0 is not None else 1), shape.dirs, shape.batch, hid))
    for d, rev in enumerate(shape.reverse):
        h = h0[d].astype(np.float64)
        c = None if c0 is None else c0[d].astype(np.float64)
        for t in range(shape.seq - 1, -1, -1) if rev else range(shape.seq):
            x = xw[t][:, d * g * hid:(d + 1) * g * hid] + wb[d]
            a = h @ r[d] + rb[d]
            if shape.kind == "LSTM":
                i, o, f, cc = (x[:, k * hid:(k + 1) * hid] + a[:, k * hid:(k + 1) * hid] for k in range(4))
                c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(cc)
                h = _sigmoid(o) * np.tanh(c)
            else:
                z = _sigmoid(x[:, :hid] + a[:, :hid])
                reset = _sigmoid(x[:, hid:2 * hid] + a[:, hid:2 * hid])
                if shape.linear_before_reset:
                    n = np.tanh(x[:, 2 * hid:] + reset * a[:, 2 * hid:])
                else:
                    n = np.tanh(x[:, 2 * hid:] + (reset * h) @ r[d][:, 2 * hid:] + rb[d][2 * hid:])
                h = (1 - z) * n + z * h
            out[t, d] = h
        out[shape.seq, d] = h
        if c is not None:
            out[shape.seq + 1, d] = c
    return out


def _compile(func: tvm.tirx.PrimFunc):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=resolve_target("native").to_tvm())["main"]


@pytest.mark.parametrize(("kind", "seq", "batch", "hidden", "reverse", "lbr"), [
    ("LSTM", 7, 2, 5, (False, True), False),
    ("LSTM", 100, 1, 48, (False, True), False),
    ("LSTM", 1, 3, 16, (True,), False),
    ("GRU", 9, 3, 6, (True,), True),
    ("GRU", 9, 2, 6, (False, True), False),
    ("GRU", 100, 1, 48, (False, True), True),
    ("GRU", 1, 1, 20, (False,), False),
])
def test_kernel_matches_definition(kind, seq, batch, hidden, reverse, lbr):
    shape = RecurrentShape(kind, seq, batch, hidden, reverse, lbr)
    rng = np.random.default_rng(0)
    dirs, g = shape.dirs, shape.gates
    xw = rng.standard_normal((seq, batch, dirs * g * hidden)).astype(np.float32)
    r = (rng.standard_normal((dirs, hidden, g * hidden)) * 0.3).astype(np.float32)
    wb, rb = (rng.standard_normal((dirs, g * hidden)).astype(np.float32) for _ in range(2))
    h0 = rng.standard_normal((dirs, batch, hidden)).astype(np.float32)
    c0 = rng.standard_normal((dirs, batch, hidden)).astype(np.float32) if kind == "LSTM" else None
    want = _definition(shape, xw, r, wb, rb, h0, c0)
    args = [tvm.runtime.tensor(a) for a in (xw, r, wb, rb, h0, c0) if a is not None]
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32))
    _compile(recurrent_func(shape))(*args, out)
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=ATOL)


def _quantized_definition(shape: RecurrentShape, xw, rq, bias, rs, h0, c0):
    """DynamicQuantizeLSTM's recurrence over the kernel's arguments: per step h quantized as
    DynamicQuantizeLinear does (float32), the integer GEMM in int64, the gates in float64."""
    hid, f32 = shape.hidden, np.float32
    out = np.zeros((shape.seq + 2, shape.dirs, shape.batch, hid))
    for d, rev in enumerate(shape.reverse):
        for b in range(shape.batch):
            h, c = h0[d, b].astype(f32), c0[d, b].astype(np.float64)
            for t in range(shape.seq - 1, -1, -1) if rev else range(shape.seq):
                hi, lo = max(f32(0), h.max()), max(f32(0), -h.min())
                s = f32((hi + lo) / f32(255)) or f32(1)
                zp = np.clip(np.rint(lo / s), 0, 255)
                hq = (np.clip(np.rint(h / s) + zp, 0, 255) - zp).astype(np.int64)
                a = (hq @ rq[d].astype(np.int64)).astype(f32) * (s * rs[d])
                g = (xw[t, b, d * 4 * hid:(d + 1) * 4 * hid] + bias[d]).astype(np.float64) + a
                i, o, f, cc = (g[k * hid:(k + 1) * hid] for k in range(4))
                c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(cc)
                h = (_sigmoid(o) * np.tanh(c)).astype(f32)
                out[t, d, b] = h
            out[shape.seq, d, b], out[shape.seq + 1, d, b] = h, c
    return out


@pytest.mark.parametrize(("seq", "batch", "hidden", "reverse", "zero_state"), [
    (7, 2, 5, (False, True), False),
    (30, 1, 48, (True,), True),
])
def test_quantized_state_kernel_matches_definition(seq, batch, hidden, reverse, zero_state):
    """DynamicQuantizeLSTM's form: h quantized afresh at every step, the GEMM on its integers
    (an all-zero h, as from a zero initial state, quantizes at scale 1)."""
    shape = RecurrentShape("LSTM", seq, batch, hidden, reverse, quantized_state=True)
    rng = np.random.default_rng(1)
    dirs = shape.dirs
    xw = rng.standard_normal((seq, batch, dirs * 4 * hidden)).astype(np.float32)
    rq = rng.integers(-127, 128, (dirs, hidden, 4 * hidden)).astype(np.float32)
    bias = rng.standard_normal((dirs, 4 * hidden)).astype(np.float32)
    rs = (rng.uniform(0.5, 1.5, (dirs, 4 * hidden)) * 0.3 / 127).astype(np.float32)
    h0, c0 = (rng.standard_normal((dirs, batch, hidden)).astype(np.float32) * (not zero_state) for _ in range(2))
    want = _quantized_definition(shape, xw, rq, bias, rs, h0, c0)
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32))
    _compile(recurrent_func(shape))(*(tvm.runtime.tensor(a) for a in (xw, rq, bias, rs, h0, c0)), out)
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=ATOL)


def test_fast_tanh_and_sigmoid():
    """Within a few float32 ULP of tanh and the logistic function, saturating without overflow."""
    x = np.concatenate([np.linspace(-30, 30, 4001), [-1e30, 1e30]]).astype(np.float32)

    n = x.size

    @T.prim_func(private=True)
    def act(a: T.Buffer((n,), "float32"), t: T.Buffer((n,), "float32"), s: T.Buffer((n,), "float32")):
        for i in T.serial(n):
            t[i] = fast_tanh(a[i])
            s[i] = sigmoid(a[i])

    bufs = [tvm.runtime.tensor(v) for v in (x, np.zeros_like(x), np.zeros_like(x))]
    _compile(act)(*bufs)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(bufs[1].numpy(), np.tanh(x64), rtol=0, atol=1e-6)
    np.testing.assert_allclose(bufs[2].numpy(), 0.5 * (1 + np.tanh(x64 / 2)), rtol=0, atol=1e-6)


# -- torch-exported models, built and compared with ONNX Runtime ------------------------------

class _Rnn(nn.Module):
    """An LSTM/GRU over [1, T, F] and a dense head on the last step; initial states as inputs
    (``states``) or left to the layer (zeros)."""

    def __init__(self, kind: str, bidirectional: bool, states: bool) -> None:
        super().__init__()
        self.states = states
        cell = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cell(FEATURES, HIDDEN, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), CLASSES)

    def forward(self, x, *init):
        if self.states:
            y, state = self.rnn(x, tuple(init) if len(init) == 2 else init[0])
        else:
            y, state = self.rnn(x)
        return (self.head(y[:, -1]), *(state if isinstance(state, tuple) else (state,)))


def _export(tmp_path, kind: str, bidirectional: bool, states: bool, seq: int):
    """(ONNX file, feeds) of a seeded model."""
    torch.manual_seed(0)
    module = _Rnn(kind, bidirectional, states).eval()
    dirs = 2 if bidirectional else 1
    feeds = {"x": torch.randn(1, seq, FEATURES)}
    if states:
        feeds["h0"] = torch.randn(dirs, 1, HIDDEN)
        if kind == "lstm":
            feeds["c0"] = torch.randn(dirs, 1, HIDDEN)
    path = tmp_path / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(feeds.values()), str(path), input_names=list(feeds), opset_version=17,
                          dynamo=False)
    return path, {k: v.numpy() for k, v in feeds.items()}


def _ort(path, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("seq", [1, 100])
@pytest.mark.parametrize("states", [True, False], ids=["states", "zero-states"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_model_matches_onnxruntime(tmp_path, kind, bidirectional, states, seq):
    """The head's output, Y_h (and Y_c) agree with ONNX Runtime; the recurrence runs as one
    kernel call (PyTorch's GRU is linear_before_reset=1)."""
    path, feeds = _export(tmp_path, kind, bidirectional, states, seq)
    node = next(n for n in onnx.load(str(path)).graph.node if n.op_type in ("LSTM", "GRU"))
    assert (node.input[5] == "h0") == states  # a model input, or zeros the exporter writes
    artifact = qcompile.compile(path, "native", out_dir=tmp_path / "out", tuning_logs=False)
    compiled = qcompile.load(artifact.library)
    got = list(compiled.run(feeds).values())
    want = _ort(path, feeds)
    assert len(got) == len(want) == (3 if kind == "lstm" else 2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)
    calls = {k.name: k.calls for k in compiled.profile(feeds, runs=1, warmup=0)}
    assert calls.get(f"qc_{kind}_sequence") == 1, calls
    # the input projection, the kernel, the head and a few slices: not one kernel per step
    assert sum(n for name, n in calls.items() if not name.startswith("vm.builtin")) < 12, calls


def test_int8_keeps_the_recurrence_float(tmp_path):
    """int8 PTQ: the input projection and the head run on integers, the fused recurrence stays
    float32 (reported among float_ops); the result agrees with float32."""
    path, feeds = _export(tmp_path, "lstm", True, True, 16)
    rng = np.random.default_rng(1)
    calib = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in feeds.items()} for _ in range(8)]
    artifact = qcompile.compile(path, "native", quantization=qcompile.Int8Config(num_samples=8),
                                calibration_data=calib, out_dir=tmp_path / "out", tuning_logs=False)
    quant = artifact.manifest.quantization
    matmuls = [layer for layer in quant["layers"] if layer["op"] == "matmul"]
    assert len(matmuls) == 2 and all(" x int8 -> int32" in layer["dtype"] for layer in matmuls), quant["layers"]
    assert quant["float_ops"].get("relax.call_tir") == 1, quant["float_ops"]
    compiled = qcompile.load(artifact.library)
    assert {k.name: k.calls for k in compiled.profile(feeds, runs=1, warmup=0)}.get("qc_lstm_sequence") == 1
    got, want = list(compiled.run(feeds).values()), _ort(path, feeds)
    for g, w in zip(got, want):
        cosine = float(g.ravel() @ w.ravel() / (np.linalg.norm(g) * np.linalg.norm(w)))
        assert cosine > 0.99, cosine
