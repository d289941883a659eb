"""The realize pass against an independent numpy model of the same integer arithmetic.

Each test writes a small QDQ module by hand (quantize -> dequantize around a float op,
int8 weights behind dequantize), realizes it, checks that the float op is gone and that
the integer output equals numpy's: bit-exact, or at most 1 LSB where float32 summation
order can move a value across a rounding tie.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from qcompile.build.pipeline import compile_module
from qcompile.quantize.realize import realize

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
RNG = np.random.default_rng(7)
QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def f32(v) -> np.float32:
    return np.float32(v)


def quantize_np(x: np.ndarray, scale: float, zp: int, dtype: str) -> np.ndarray:
    lo, hi = QRANGE[dtype]
    return np.clip(np.round(x.astype(np.float32) / f32(scale)) + zp, lo, hi).astype(dtype)


def requantize_np(acc: np.ndarray, multiplier: np.ndarray, zp: int, dtype: str, relu: bool = False) -> np.ndarray:
    lo, hi = QRANGE[dtype]
    if relu:
        lo = max(lo, zp)
    y = np.round(acc.astype(np.float32) * multiplier.astype(np.float32)) + f32(zp)
    return np.clip(y, lo, hi).astype(dtype)


def conv2d_int(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int, pad_value: int) -> np.ndarray:
    """Direct NCHW/OIHW integer convolution in int64."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.full((n, c, h + 2 * pad, wd + 2 * pad), pad_value, np.int64)
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og].astype(np.int64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


def _run(build_body, inputs: dict[str, np.ndarray]):
    """Build main(float inputs) -> quantized output with ``build_body(bb, vars)``; realize; run."""
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(a.shape, "float32")) for n, a in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build_body(bb, params))
        bb.emit_func_output(out)
    mod, report = realize(bb.get())
    vm = relax.VirtualMachine(compile_module(mod, TARGET), tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(a) for a in inputs.values()])
    return result.numpy(), mod, report


def q(bb, x, scale, zp, dtype):
    return bb.emit(relax.op.quantize(x, relax.const(scale, "float32"), relax.const(zp, "int32"), out_dtype=dtype))


def dq(bb, x, scale, zp, axis=-1):
    return bb.emit(relax.op.dequantize(x, relax.const(scale, "float32") if np.isscalar(scale) else relax.const(scale),
                                       relax.const(zp, "int32") if np.isscalar(zp) else relax.const(zp), axis=axis))


def assert_within_one_lsb(got: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= 1, f"max diff {diff.max()} LSB"
    assert np.mean(diff == 0) > 0.99


CONV_CASES = {
    "plain": dict(c=8, o=16, k=3, stride=1, pad=1, groups=1),
    "strided": dict(c=8, o=16, k=3, stride=2, pad=1, groups=1),
    "unpadded_1x1": dict(c=8, o=16, k=1, stride=1, pad=0, groups=1),
    "grouped": dict(c=8, o=16, k=3, stride=1, pad=1, groups=4),
    "depthwise": dict(c=8, o=8, k=3, stride=2, pad=1, groups=8),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("act_dtype, zx, relu", [("uint8", 131, True), ("int8", 0, False)])
def test_conv2d(case, act_dtype, zx, relu):
    p = CONV_CASES[case]
    x = RNG.standard_normal((1, p["c"], 10, 10)).astype("float32")
    wq = RNG.integers(-127, 128, (p["o"], p["c"] // p["groups"], p["k"], p["k"])).astype("int8")
    sw = RNG.uniform(0.001, 0.01, p["o"]).astype("float32")
    sx, sy, zy = 0.02, 0.05, (7 if act_dtype == "uint8" else 0)
    bias_q = RNG.integers(-5000, 5000, p["o"]).astype("int32")
    bscale = (f32(sx) * sw).astype("float32")

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], sx, zx, act_dtype), sx, zx)
        wd = dq(bb, relax.const(wq), sw, np.zeros(p["o"], "int32"), axis=0)
        c = bb.emit(relax.op.nn.conv2d(xd, wd, strides=p["stride"], padding=p["pad"], groups=p["groups"]))
        bd = dq(bb, relax.const(bias_q.reshape(1, -1, 1, 1)), bscale, np.zeros(p["o"], "int32"), axis=1)
        y = bb.emit(relax.op.add(c, bd))
        if relu:
            y = bb.emit(relax.op.nn.relu(y))
        return q(bb, y, sy, zy, act_dtype)

    got, mod, report = _run(body, {"x": x})
    assert report.layers[0]["op"] == "conv2d"
    xq = quantize_np(x, sx, zx, act_dtype).astype(np.int64)
    acc = conv2d_int(xq - zx, wq, p["stride"], p["pad"], p["groups"], 0) + bias_q.reshape(1, -1, 1, 1)
    multiplier = (f32(sx) * sw / f32(sy)).reshape(1, -1, 1, 1)
    assert_within_one_lsb(got, requantize_np(acc, multiplier, zy, act_dtype, relu))
    text = mod["main"].script()
    assert 'out_dtype="int32"' in text and "R.dequantize(" not in text  # no float conv left


@pytest.mark.parametrize("act_dtype, zx", [("uint8", 120), ("int8", 0)])
def test_dense(act_dtype, zx):
    x = RNG.standard_normal((4, 32)).astype("float32")
    wq = RNG.integers(-127, 128, (32, 10)).astype("int8")
    sw = RNG.uniform(0.001, 0.01, 10).astype("float32")
    sx, sy, zy = 0.03, 0.04, 3 if act_dtype == "uint8" else 0
    bias_q = RNG.integers(-3000, 3000, 10).astype("int32")

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], sx, zx, act_dtype), sx, zx)
        wd = dq(bb, relax.const(wq), sw, np.zeros(10, "int32"), axis=1)
        m = bb.emit(relax.op.matmul(xd, wd))
        bd = dq(bb, relax.const(bias_q), (f32(sx) * sw).astype("float32"), np.zeros(10, "int32"), axis=0)
        return q(bb, bb.emit(relax.op.add(bd, m)), sy, zy, act_dtype)

    got, mod, _ = _run(body, {"x": x})
    text = mod["main"].script()
    assert 'R.matmul(' in text and 'out_dtype="int32"' in text and "R.dequantize(" not in text
    xq = quantize_np(x, sx, zx, act_dtype).astype(np.int64)
    acc = (xq - zx) @ wq.astype(np.int64) + bias_q
    assert_within_one_lsb(got, requantize_np(acc, f32(sx) * sw / f32(sy), zy, act_dtype))


@pytest.mark.parametrize("relu", [False, True])
def test_residual_add(relu):
    a = RNG.standard_normal((1, 4, 6, 6)).astype("float32")
    b = RNG.standard_normal((1, 4, 6, 6)).astype("float32")
    (sa, za), (sb, zb), (sy, zy) = (0.02, 128), (0.03, 100), (0.04, 90)

    def body(bb, params):
        ad = dq(bb, q(bb, params[0], sa, za, "uint8"), sa, za)
        bd = dq(bb, q(bb, params[1], sb, zb, "uint8"), sb, zb)
        y = bb.emit(relax.op.add(ad, bd))
        if relu:
            y = bb.emit(relax.op.nn.relu(y))
        return q(bb, y, sy, zy, "uint8")

    got, mod, _ = _run(body, {"a": a, "b": b})
    assert "R.dequantize(" not in mod["main"].script()
    fa = (quantize_np(a, sa, za, "uint8").astype(np.float32) - za) * f32(f32(sa) / f32(sy))
    fb = (quantize_np(b, sb, zb, "uint8").astype(np.float32) - zb) * f32(f32(sb) / f32(sy))
    assert_within_one_lsb(got, requantize_np(fa + fb, np.float32(1), zy, "uint8", relu))


def test_max_pool_stays_int8_with_same_scale():
    x = RNG.standard_normal((1, 4, 8, 8)).astype("float32")
    s, z = 0.02, 128

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], s, z, "uint8"), s, z)
        return q(bb, bb.emit(relax.op.nn.max_pool2d(xd, 3, 2, 1)), s, z, "uint8")

    got, mod, _ = _run(body, {"x": x})
    text = mod["main"].script()
    assert "R.nn.max_pool2d(" in text and "R.dequantize(" not in text
    xq = quantize_np(x, s, z, "uint8")
    padded = np.zeros((1, 4, 10, 10), np.uint8)  # uint8 minimum pads, as max-pool must
    padded[:, :, 1:9, 1:9] = xq
    expected = np.stack([[padded[0, c, i:i + 3, j:j + 3].max() for i in range(0, 8, 2) for j in range(0, 8, 2)]
                         for c in range(4)]).reshape(1, 4, 4, 4)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("op", ["mean", "avg_pool2d"])
def test_pools(op):
    x = RNG.standard_normal((1, 4, 8, 8)).astype("float32")
    (sx, zx), (sy, zy) = (0.02, 128), (0.005, 120)

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], sx, zx, "uint8"), sx, zx)
        if op == "mean":
            y = bb.emit(relax.op.mean(xd, axis=[2, 3], keepdims=True))
        else:
            y = bb.emit(relax.op.nn.avg_pool2d(xd, 2, 2))
        return q(bb, y, sy, zy, "uint8")

    got, mod, _ = _run(body, {"x": x})
    assert "R.dequantize(" not in mod["main"].script()
    xf = (quantize_np(x, sx, zx, "uint8").astype(np.float32) - zx) * f32(f32(sx) / f32(sy))
    pooled = xf.mean(axis=(2, 3), keepdims=True) if op == "mean" else xf.reshape(1, 4, 4, 2, 4, 2).mean(axis=(3, 5))
    assert_within_one_lsb(got, requantize_np(pooled, np.float32(1), zy, "uint8"))


def test_concat():
    a = RNG.standard_normal((1, 3, 4, 4)).astype("float32")
    b = RNG.standard_normal((1, 5, 4, 4)).astype("float32")
    (sa, za), (sb, zb), (sy, zy) = (0.02, 128), (0.05, 10), (0.04, 128)

    def body(bb, params):
        ad = dq(bb, q(bb, params[0], sa, za, "uint8"), sa, za)
        bd = dq(bb, q(bb, params[1], sb, zb, "uint8"), sb, zb)
        return q(bb, bb.emit(relax.op.concat([ad, bd], axis=1)), sy, zy, "uint8")

    got, mod, _ = _run(body, {"a": a, "b": b})
    assert "R.dequantize(" not in mod["main"].script()
    fa = (quantize_np(a, sa, za, "uint8").astype(np.float32) - za) * f32(f32(sa) / f32(sy))
    fb = (quantize_np(b, sb, zb, "uint8").astype(np.float32) - zb) * f32(f32(sb) / f32(sy))
    np.testing.assert_array_equal(got, requantize_np(np.concatenate([fa, fb], axis=1), np.float32(1), zy, "uint8"))


def test_unmatched_op_stays_float_between_boundaries():
    x = RNG.standard_normal((1, 8)).astype("float32")

    def body(bb, params):
        xd = dq(bb, q(bb, params[0], 0.02, 128, "uint8"), 0.02, 128)
        return q(bb, bb.emit(relax.op.sigmoid(xd)), 0.004, 0, "uint8")

    got, mod, report = _run(body, {"x": x})
    text = mod["main"].script()
    assert "R.sigmoid(" in text and "R.dequantize(" in text and report.layers == []
    xd = (quantize_np(x, 0.02, 128, "uint8").astype(np.float32) - 128) * f32(0.02)
    assert_within_one_lsb(got, quantize_np(1 / (1 + np.exp(-xd)), 0.004, 0, "uint8"))


def test_unsupported_qdq_pattern_is_named():
    """A weight with a non-zero zero point has no integer lowering here: the conv stays float,
    and realize_prequantized names it (the CLI prints it as a warning)."""
    from qcompile.model import ImportedModel, ModelSource, TensorInfo
    from qcompile.quantize import realize_prequantized

    wq = RNG.integers(-127, 128, (4, 3, 3, 3)).astype("int8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xd = dq(bb, q(bb, x, 0.02, 128, "uint8"), 0.02, 128)
            wd = dq(bb, relax.const(wq), np.full(4, 0.01, "float32"), np.full(4, 3, "int32"), axis=0)
            conv = bb.emit(relax.op.nn.conv2d(xd, wd, padding=1))
            out = bb.emit_output(q(bb, conv, 0.05, 10, "uint8"))
        bb.emit_func_output(out)
    model = ImportedModel(bb.get(), ModelSource("onnx", "m", None, None, ""), [TensorInfo("x", (1, 3, 8, 8), "float32")])
    info = realize_prequantized(model, "onnx-qdq").quantization
    assert info.float_ops == {"relax.nn.conv2d": 1}
    assert len(info.float_nodes) == 1 and info.float_nodes[0].endswith("= relax.nn.conv2d")
