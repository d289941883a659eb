"""The int8 depthwise conv2d kernel (qcompile.kernels.depthwise_conv2d) against numpy.

Each kernel shape must reproduce the int32 accumulators of a direct int64 grouped
convolution exactly (padding with the input zero point); in a realized model the pass must
route depthwise layers to it and the build must agree with TVM's own grouped conv2d bit
for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_packed_conv import DOT, HOST, needs_dot
from test_realize_exact import conv2d_int, dq, q
from tvm import relax

from qcompile.build.pipeline import compile_module
from qcompile.build.schedules import ConvMatmulCPU
from qcompile.kernels import depthwise_conv2d
from qcompile.kernels.int8_dot import int8_dot_for
from qcompile.kernels.packed_conv2d import ConvShape
from qcompile.passes.pack_conv import pack_conv
from qcompile.quantize.realize import realize

RNG = np.random.default_rng(5)

CASES = {  # channels, h, w, k, stride, pad, dilation, activation dtype
    "3x3": (16, 12, 12, 3, 1, 1, 1, "uint8"),
    "3x3_stride2": (24, 13, 13, 3, 2, 1, 1, "uint8"),
    "5x5_14_wide": (8, 14, 14, 5, 1, 2, 1, "uint8"),
    "channels_not_multiple_of_8": (12, 7, 7, 3, 1, 1, 1, "uint8"),
    "odd_channels_no_padding": (5, 9, 9, 3, 1, 0, 1, "uint8"),
    "dilated": (8, 11, 11, 3, 1, 2, 2, "uint8"),
    "int8_activations": (16, 8, 8, 3, 1, 1, 1, "int8"),
}


def _depthwise_int(x_nhwc, w_hwc, stride, pad, dilation, zx):
    """int64 depthwise conv (dilation by spreading the weight), NHWC in and out."""
    kh, kw, c = w_hwc.shape
    w = w_hwc.transpose(2, 0, 1)[:, None]  # (C, 1, KH, KW)
    if dilation > 1:
        spread = np.zeros((c, 1, (kh - 1) * dilation + 1, (kw - 1) * dilation + 1), w.dtype)
        spread[:, :, ::dilation, ::dilation] = w
        w = spread
    out = conv2d_int(x_nhwc.transpose(0, 3, 1, 2).astype(np.int64), w, stride, pad, c, zx)
    return out.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_int64_reference(case):
    c, h, w, k, stride, pad, dilation, dtype = CASES[case]
    shape = ConvShape(1, c, h, w, c, k, k, (stride, stride), (pad,) * 4, (dilation, dilation))
    sch = ConvMatmulCPU().apply(depthwise_conv2d.depthwise_func(shape, dtype), HOST, False)
    assert sch is not None, "the default schedule rule did not take the depthwise kernel"
    lib = tvm.compile(sch.mod, HOST)
    lo, hi = (0, 256) if dtype == "uint8" else (-128, 128)
    x = RNG.integers(lo, hi, (1, h, w, c)).astype(dtype)
    weight = RNG.integers(-128, 128, (k, k, c)).astype("int8")  # full 8 bits: no saturation here
    zx = 131 if dtype == "uint8" else -7
    oh, ow = shape.out_hw
    out = tvm.runtime.tensor(np.zeros((1, oh, ow, c), "int32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array([zx], dtype)), tvm.runtime.tensor(weight), out)
    np.testing.assert_array_equal(out.numpy(), _depthwise_int(x, weight, stride, pad, dilation, zx))


@pytest.mark.parametrize("tile", depthwise_conv2d.TILES)
def test_every_tuning_tile_is_exact(tile):
    shape = ConvShape(1, 16, 14, 14, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    sch = ConvMatmulCPU(tile).apply(depthwise_conv2d.depthwise_func(shape, "uint8"), HOST, False)
    if sch is None:
        assert 14 % tile[0] or 16 % tile[1], f"tile {tile} fits but was refused"
        return
    lib = tvm.compile(sch.mod, HOST)
    x = RNG.integers(0, 256, (1, 14, 14, 16)).astype("uint8")
    weight = RNG.integers(-128, 128, (3, 3, 16)).astype("int8")
    out = tvm.runtime.tensor(np.zeros((1, 14, 14, 16), "int32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array([3], "uint8")), tvm.runtime.tensor(weight), out)
    np.testing.assert_array_equal(out.numpy(), _depthwise_int(x, weight, 1, 1, 1, 3))


def _conv_then_depthwise(x: np.ndarray):
    """main(x): q -> conv 8->16 -> relu -> q -> depthwise 3x3 -> relu -> q, realized
    (the input zero point is non-zero, so realize pads explicitly)."""
    dense = RNG.integers(-63, 64, (16, 8, 3, 3)).astype("int8")
    depthwise = RNG.integers(-127, 128, (16, 1, 3, 3)).astype("int8")
    bb = relax.BlockBuilder()
    param = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [param]):
        with bb.dataflow():
            xd = dq(bb, q(bb, param, 0.02, 131, "uint8"), 0.02, 131)
            wd = dq(bb, relax.const(dense), RNG.uniform(0.001, 0.01, 16).astype("float32"), np.zeros(16, "int32"), axis=0)
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(xd, wd, padding=1))))
            yd = dq(bb, q(bb, y, 0.05, 9, "uint8"), 0.05, 9)
            dd = dq(bb, relax.const(depthwise), RNG.uniform(0.001, 0.01, 16).astype("float32"),
                    np.zeros(16, "int32"), axis=0)
            z = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(yd, dd, strides=2, padding=1, groups=16))))
            out = bb.emit_output(q(bb, z, 0.03, 0, "uint8"))
        bb.emit_func_output(out)
    return realize(bb.get())[0]


@needs_dot
def test_realized_depthwise_equals_tvm_grouped_conv():
    x = RNG.standard_normal((1, 8, 12, 12)).astype("float32")
    mod = _conv_then_depthwise(x)
    converted, counts = pack_conv(mod, HOST)
    assert counts == {"int8": 1, "int8_depthwise": 1, "int8_dense": 0, "int8_inexact": 0, "float": 0, "float_depthwise": 0, "float_dense": 0, "float_grouped": 0, "int8_grouped": 0, "float_winograd": 0}
    assert "qc_depthwise_conv2d_int8" in [gv.name_hint for gv in converted.get_global_vars()]
    plain = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # no dot product: TVM's grouped conv2d
    assert int8_dot_for(plain) is None and DOT is not None
    results = []
    for target in (HOST, plain):
        vm = relax.VirtualMachine(compile_module(mod, target), tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0].any()
