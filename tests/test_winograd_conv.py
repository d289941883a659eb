"""The float32 Winograd F(2x2, 3x3) conv (qcompile.kernels.winograd_conv2d) against a float64
conv, each register tile, and the pass that routes 3x3 stride-1 float convs to it."""
from __future__ import annotations

import numpy as np
import pytest
from test_float_conv import _conv_nhwc, _run, _with_and_without_kernels
from test_packed_conv import HOST
from tvm import relax

from qcompile.kernels import winograd_conv2d
from qcompile.kernels.packed_conv2d import ConvShape
from qcompile.passes.pack_conv import pack_conv

RNG = np.random.default_rng(5)

CASES = {  # n, ic, h, w, oc, pad (top, left, bottom, right)
    "same": (1, 16, 12, 12, 32, (1, 1, 1, 1)),
    "odd_output": (1, 32, 7, 7, 16, (1, 1, 1, 1)),  # 4x4 tiles, the last row and column half used
    "valid": (1, 16, 10, 9, 16, (0, 0, 0, 0)),
    "asymmetric_padding": (1, 16, 8, 8, 16, (0, 0, 1, 1)),
    "batch_2_uneven_channels": (2, 24, 6, 6, 40, (1, 1, 1, 1)),  # 40 output channels: 48 computed, cropped
}


def _case(name: str):
    n, ic, h, w, oc, pad = CASES[name]
    shape = ConvShape(n, ic, h, w, oc, 3, 3, (1, 1), pad, (1, 1))
    x = RNG.standard_normal((n, h, w, ic)).astype("float32")
    weight = RNG.standard_normal((oc, ic, 3, 3)).astype("float32")
    padded = np.pad(x, ((0, 0), (pad[0], pad[2]), (pad[1], pad[3]), (0, 0)))
    return shape, x, weight, _conv_nhwc(padded, weight, 1, 0, 1)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(case, lanes):
    shape, x, weight, expected = _case(case)  # the kernel computes any size; applies() picks where it pays
    out = _run(winograd_conv2d.conv2d_func(shape, lanes), None, x, winograd_conv2d.pack_weight(weight, lanes),
               np.zeros(expected.shape, "float32"))
    assert out is not None, "the default schedule rule did not take the Winograd kernel"
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile", winograd_conv2d.TILES)
def test_every_tuning_tile_matches(tile):
    shape, x, weight, expected = _case("same")  # 36 tiles, 2 blocks of 16 channels
    out = _run(winograd_conv2d.conv2d_func(shape, 16), tile, x, winograd_conv2d.pack_weight(weight, 16),
               np.zeros(expected.shape, "float32"))
    if out is None:
        assert 36 % tile[0] or 2 % tile[1], f"tile {tile} fits but was refused"
        return
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_transformed_weight_is_g_g_gt():
    """The packing is U = G g Gt per (output, input) channel pair, in (4, 4, OC/L, IC, L)."""
    weight = RNG.standard_normal((16, 2, 3, 3)).astype("float32")
    packed = winograd_conv2d.pack_weight(weight, 8)
    assert packed.shape == (4, 4, 2, 2, 8)
    g = winograd_conv2d.G
    np.testing.assert_allclose(packed[:, :, 1, 0, 3], g @ weight[11, 0] @ g.T, rtol=1e-6)


@pytest.mark.parametrize("shape, takes", [
    (ConvShape(1, 64, 56, 56, 64, 3, 3, (1, 1), (1,) * 4, (1, 1)), True),
    (ConvShape(1, 64, 56, 56, 64, 3, 3, (2, 2), (1,) * 4, (1, 1)), False),  # strided
    (ConvShape(1, 64, 56, 56, 64, 3, 3, (1, 1), (2,) * 4, (2, 2)), False),  # dilated
    (ConvShape(1, 16, 56, 56, 64, 3, 3, (1, 1), (1,) * 4, (1, 1)), False),  # too few input channels
    (ConvShape(1, 64, 56, 56, 16, 3, 3, (1, 1), (1,) * 4, (1, 1)), False),  # too few output channels
    (ConvShape(1, 32, 23, 23, 32, 3, 3, (1, 1), (1,) * 4, (1, 1)), True),
    (ConvShape(1, 64, 56, 56, 64, 1, 1, (1, 1), (0,) * 4, (1, 1)), False),  # 1x1
    (ConvShape(1, 512, 7, 7, 512, 3, 3, (1, 1), (1,) * 4, (1, 1)), False),  # output under MIN_OUTPUT
    (ConvShape(1, 64, 8, 8, 64, 3, 3, (1, 1), (1,) * 4, (1, 1)), True),
    (ConvShape(1, 64, 14, 14, 64, 3, 3, (1, 1), (1,) * 4, (1, 1), groups=4), False),
])
def test_which_convs_it_takes(shape, takes):
    assert winograd_conv2d.applies(shape) is takes


def test_model_routes_3x3_convs_and_matches_tvm():
    """conv 3x3 32->32 (+bias, relu), a residual 3x3 32->32 (+ the input), a strided 3x3:
    the two stride-1 convs take the Winograd kernel with their epilogues fused, the strided
    one the direct kernel; the model == TVM's own NCHW convs."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 14, 14), "float32"))

    def weight(*shape):
        return relax.const((RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype("float32"))

    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, weight(32, 32, 3, 3), padding=1))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, weight(1, 32, 1, 1)))))
            z = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(y, weight(32, 32, 3, 3), padding=1)), y))
            z = bb.emit(relax.op.nn.conv2d(z, weight(32, 32, 3, 3), strides=2, padding=1))
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    mod = bb.get()
    _, counts = pack_conv(mod, HOST)
    assert counts["float_winograd"] == 2 and counts["float"] == 1
    data = RNG.standard_normal((1, 32, 14, 14)).astype("float32")
    got, plain = _with_and_without_kernels(mod, data)
    assert got.shape == (1, 32, 7, 7)
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)
