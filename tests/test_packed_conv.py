"""The packed, tensorized int8 conv2d (qcompile.kernels.packed_conv2d) against a numpy reference.

Each kernel is built for this machine's dot-product instruction (x86: AVX2 vpmaddubsw, or
VNNI where the CPU has it) and must reproduce the int32 accumulators of a direct int64
convolution exactly; the pass that selects it must refuse weights the instruction would
saturate on, and the whole chain (realize -> NHWC -> packed kernel -> requantize) must agree
with the unpacked build bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_realize_exact import conv2d_int, dq, q
from tvm import relax

from qcompile.build.pipeline import compile_module
from qcompile.build.schedules import ConvMatmulCPU
from qcompile.kernels import packed_conv2d
from qcompile.kernels.int8_dot import AVX2, VNNI, int8_dot_for
from qcompile.passes.pack_conv import pack_conv
from qcompile.quantize.realize import realize
from qcompile.target import resolve_target

HOST = resolve_target("native").to_tvm()
DOT = int8_dot_for(HOST)
needs_dot = pytest.mark.skipif(DOT is None or DOT.activation_dtype != "uint8",
                               reason="this CPU has no x86 int8 dot-product instruction")
RNG = np.random.default_rng(11)

CASES = {  # ic, h, w, oc, k, stride, pad, dilation
    "3x3": (16, 10, 12, 16, 3, 1, 1, 1),
    "3x3_stride2": (8, 9, 9, 16, 3, 2, 1, 1),
    "1x1": (32, 7, 7, 24, 1, 1, 0, 1),
    "7x7_stem_3_channels": (3, 20, 20, 16, 7, 2, 3, 1),  # rows folded: (kw, c) reduced together
    "3x3_2_channels_folded": (2, 9, 10, 8, 3, 1, 1, 1),
    "3_channels_dilated": (3, 11, 11, 8, 3, 1, 2, 2),  # dilation: channels padded to 4 instead
    "oc_not_multiple_of_lanes": (8, 6, 6, 12, 3, 1, 1, 1),
    "dilated": (8, 11, 11, 8, 3, 1, 2, 2),
    "14_wide_2x4_tile": (8, 14, 14, 32, 1, 1, 0, 1),  # default tile 2 pixels x 4 lane groups
    "deep_3x3": (64, 4, 4, 32, 3, 1, 1, 1),  # weight larger than the input: channel blocks over the cores
    "13_wide_1x1": (32, 13, 13, 48, 1, 1, 0, 1),  # computed 14 wide (padded_width), cropped
    "13_wide_stem_folded": (3, 15, 15, 16, 3, 1, 0, 1),  # rows folded, computed 14 wide
}


def _conv_int(x_nhwc, w_oihw, stride, pad, dilation, zx):
    """int64 NHWC conv with the input padded by its zero point (dilation by spreading the weight)."""
    if dilation > 1:
        o, i, kh, kw = w_oihw.shape
        spread = np.zeros((o, i, (kh - 1) * dilation + 1, (kw - 1) * dilation + 1), w_oihw.dtype)
        spread[:, :, ::dilation, ::dilation] = w_oihw
        w_oihw = spread
    out = conv2d_int(x_nhwc.transpose(0, 3, 1, 2).astype(np.int64), w_oihw, stride, pad, 1, zx)
    return out.transpose(0, 2, 3, 1)


@needs_dot
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_int64_reference(case):
    ic, h, w, oc, k, stride, pad, dilation = CASES[case]
    shape = packed_conv2d.ConvShape(1, ic, h, w, oc, k, k, (stride, stride), (pad,) * 4, (dilation, dilation))
    func = packed_conv2d.conv2d_func(shape, DOT)
    sch = ConvMatmulCPU().apply(func, HOST, False)
    assert sch is not None, "the default schedule rule did not take the packed kernel"
    assert DOT.name in sch.mod.script() or "pmadd" in sch.mod.script() or "vpdpbusd" in sch.mod.script()
    lib = tvm.compile(sch.mod, HOST)
    x = RNG.integers(0, 256, (1, h, w, ic)).astype("uint8")
    weight = RNG.integers(-63, 64, (oc, ic, k, k)).astype("int8")  # 7-bit: exact for AVX2 too
    zx = np.array([131], "uint8")
    oh, ow = shape.out_hw
    out = tvm.runtime.tensor(np.zeros((1, oh, ow, oc), "int32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(zx),
                tvm.runtime.tensor(packed_conv2d.pack_weight(weight, DOT.lanes, shape.folds_rows)), out)
    np.testing.assert_array_equal(out.numpy(), _conv_int(x, weight, stride, pad, dilation, 131))


GROUPED = {  # ic, h, w, oc, k, stride, groups
    "width_8_two_per_block": (48, 9, 9, 48, 3, 1, 6),  # RegNet: 8-wide groups, 2 or 1 per VNNI block
    "width_8_strided": (32, 10, 10, 32, 3, 2, 4),
    "width_32_whole_blocks": (64, 7, 7, 64, 3, 1, 2),  # ResNeXt-like: 2 or 4 blocks per group
    "width_4_in_16_out": (16, 6, 6, 64, 1, 1, 4),  # 4 inputs, 16 outputs per group
}


@needs_dot
@pytest.mark.parametrize("case", sorted(GROUPED))
def test_grouped_kernel_matches_int64_reference(case):
    """Grouped convs: each block of output channels reduces over its groups' inputs only (the
    other channels of its span have zero weights); exact against the int64 grouped conv."""
    ic, h, w, oc, k, stride, groups = GROUPED[case]
    shape = packed_conv2d.ConvShape(1, ic, h, w, oc, k, k, (stride, stride), (1,) * 4, (1, 1), groups)
    assert packed_conv2d.fits_groups(shape, DOT.lanes)
    sch = ConvMatmulCPU().apply(packed_conv2d.conv2d_func(shape, DOT), HOST, False)
    assert sch is not None, "the default schedule rule did not take the grouped kernel"
    lib = tvm.compile(sch.mod, HOST)
    x = RNG.integers(0, 256, (1, h, w, ic)).astype("uint8")
    weight = RNG.integers(-63, 64, (oc, ic // groups, k, k)).astype("int8")
    packed = packed_conv2d.pack_weight(weight, DOT.lanes, groups=groups)
    assert packed.shape[3] * 4 == packed_conv2d.block_inputs(shape, DOT.lanes)
    oh, ow = shape.out_hw
    out = tvm.runtime.tensor(np.zeros((1, oh, ow, oc), "int32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array([7], "uint8")), tvm.runtime.tensor(packed), out)
    expected = conv2d_int(x.transpose(0, 3, 1, 2).astype(np.int64), weight, stride, 1, groups, 7).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_grouped_shapes_the_kernel_refuses():
    def shape(ic, oc, groups):
        return packed_conv2d.ConvShape(1, ic, 8, 8, oc, 3, 3, (1, 1), (1,) * 4, (1, 1), groups)

    assert packed_conv2d.block_inputs(shape(48, 48, 6), 16) == 16  # two 8-wide groups per block
    assert packed_conv2d.block_inputs(shape(64, 64, 2), 16) == 32  # a block within one group
    assert not packed_conv2d.fits_groups(shape(24, 24, 2), 16)  # 12-wide groups straddle blocks
    assert not packed_conv2d.fits_groups(shape(4, 32, 4), 16)  # 2 inputs per block: no whole quad
    with pytest.raises(ValueError, match="grouped conv"):
        packed_conv2d.conv2d_func(shape(24, 24, 2), VNNI)


@needs_dot
def test_realized_grouped_conv_packed_equals_unpacked():
    """A realized int8 grouped conv (behind realize's zero-point pad) runs on the packed kernel
    and agrees with TVM's grouped int8 conv bit for bit."""
    x = RNG.standard_normal((1, 48, 10, 10)).astype("float32")
    weight = RNG.integers(-63, 64, (48, 8, 3, 3)).astype("int8")
    mod = _realized(x, weight, 0, lambda bb, xd, wd: bb.emit(relax.op.nn.relu(
        bb.emit(relax.op.nn.conv2d(xd, wd, padding=1, groups=6)))), out_zero_point=3)
    _, counts = pack_conv(mod, HOST)
    assert counts["int8_grouped"] == 1 and counts["int8"] == 0, counts
    plain = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # no AVX2: TVM's own conv2d
    results = [relax.VirtualMachine(compile_module(mod, t), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
               for t in (HOST, plain)]
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("case, rows", [("3x3", True), ("deep_3x3", False)])
def test_wide_layers_spread_rows_deep_layers_channel_blocks(case, rows):
    ic, h, w, oc, k, stride, pad, dilation = CASES[case]
    shape = packed_conv2d.ConvShape(1, ic, h, w, oc, k, k, (stride, stride), (pad,) * 4, (dilation, dilation))
    sch = tvm.s_tir.Schedule(packed_conv2d.conv2d_func(shape, AVX2))
    assert packed_conv2d.rows_outer(sch, sch.get_sblock(packed_conv2d.ANCHOR)) is rows


def test_default_tile_keeps_eight_accumulators_where_the_width_allows():
    assert packed_conv2d.tile_for(56, 8) == (4, 2)
    assert packed_conv2d.tile_for(14, 8) == (2, 4)  # 7 x 1 measured 1.3-1.8x slower on 1x1 convs
    assert packed_conv2d.tile_for(14, 6) == (2, 2)
    assert packed_conv2d.tile_for(7, 64) == (7, 1)
    assert packed_conv2d.tile_for(5, 2) == (1, 2)


def test_default_tile_keeps_fourteen_accumulators_on_two_dot_cores():
    """Cores that issue two zmm vpdpbusd per cycle: 7 x 2 where 7 and 2 divide, else the
    eight-accumulator tiles; Zen 4 and the generic AVX-512 preset keep eight."""
    assert packed_conv2d.tile_for(56, 8, chains=14) == (7, 2)
    assert packed_conv2d.tile_for(7, 64, chains=14) == (7, 2)
    assert packed_conv2d.tile_for(7, 63, chains=14) == (7, 1)
    assert packed_conv2d.tile_for(128, 24, chains=14) == (4, 2)  # 128 tokens of a dense layer
    chains = {mcpu: packed_conv2d.dot_chains(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
              for mcpu in ("sapphirerapids", "znver5", "znver4", "cascadelake", "haswell")}
    assert chains == {"sapphirerapids": 14, "znver5": 14, "znver4": 8, "cascadelake": 8, "haswell": 8}


def test_folded_pack_weight_layout():
    weight = np.arange(8 * 3 * 7 * 7).reshape(8, 3, 7, 7).astype(np.int8)
    packed = packed_conv2d.pack_weight(weight, 8, fold_rows=True)
    assert packed.shape == (1, 7, 6, 8, 4)  # R = 7 * 3 = 21 -> 24 = 6 quads
    r = 13  # kw = 4, c = 1
    assert packed[0, 2, r // 4, 5, r % 4] == weight[5, 1, 2, 4]
    assert not packed[0, :, 5, :, 1:].any()  # r = 21..23 past the row: zero


def test_pack_weight_layout():
    weight = np.arange(16 * 8 * 3 * 3).reshape(16, 8, 3, 3).astype(np.int8)
    packed = packed_conv2d.pack_weight(weight, 8)
    assert packed.shape == (2, 3, 3, 2, 8, 4)
    # block (oc // 8, kh, kw, ic // 4) holds [oc % 8][ic % 4]
    assert packed[1, 2, 0, 1, 3, 2] == weight[8 + 3, 4 + 2, 2, 0]


def test_saturation_check():
    assert not VNNI.pair_saturates and VNNI.exact_for(np.full((1, 16, 4), -128, np.int8))
    assert AVX2.exact_for(np.full((1, 8, 4), 63, np.int8))
    assert AVX2.exact_for(np.array([[-64, -64, 127, 1]], np.int8))  # each pair within int16
    assert not AVX2.exact_for(np.array([[100, 100, 0, 0]], np.int8))  # 255 * 200 > 32767
    assert not AVX2.exact_for(np.array([[0, 0, -127, -2]], np.int8))


def _realized(x: np.ndarray, weight: np.ndarray, axis: int, layer, out_zero_point: int = 0):
    """main(x) = quantize(layer(dq(q(x)), dq(W))) realized to integer ops; ``W`` per-channel
    along ``axis`` (its output channels)."""
    channels = weight.shape[axis]
    sw = RNG.uniform(0.001, 0.01, channels).astype("float32")
    bb = relax.BlockBuilder()
    param = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [param]):
        with bb.dataflow():
            xd = dq(bb, q(bb, param, 0.02, 131, "uint8"), 0.02, 131)
            wd = dq(bb, relax.const(weight), sw, np.zeros(channels, "int32"), axis=axis)
            out = bb.emit_output(q(bb, layer(bb, xd, wd), 0.05, out_zero_point, "uint8"))
        bb.emit_func_output(out)
    return realize(bb.get())[0]


def _qdq_conv(weight: np.ndarray, x: np.ndarray):
    """main(x) = quantize(relu(conv(dq(q(x)), dq(W))))."""
    return _realized(x, weight, 0, lambda bb, xd, wd: bb.emit(relax.op.nn.relu(
        bb.emit(relax.op.nn.conv2d(xd, wd, padding=1)))))


@needs_dot
def test_realized_model_packed_equals_unpacked():
    x = RNG.standard_normal((1, 8, 12, 12)).astype("float32")
    mod = _qdq_conv(RNG.integers(-63, 64, (16, 8, 3, 3)).astype("int8"), x)
    packed, counts = pack_conv(mod, HOST)
    assert counts == {"int8": 1, "int8_depthwise": 0, "int8_dense": 0, "int8_inexact": 0, "float": 0, "float_depthwise": 0, "float_dense": 0, "float_grouped": 0, "int8_grouped": 0, "float_winograd": 0}
    assert "qc_conv2d_int8" in [gv.name_hint for gv in packed.get_global_vars()]
    plain = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # no AVX2: TVM's own conv2d
    assert int8_dot_for(plain) is None
    results = []
    for target in (HOST, plain):
        vm = relax.VirtualMachine(compile_module(mod, target), tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_weights_that_would_saturate_are_not_packed():
    if AVX2 != int8_dot_for(resolve_target("x86-avx2").to_tvm()):
        pytest.fail("x86-avx2 should select the AVX2 intrinsic")
    weight = RNG.integers(-63, 64, (16, 8, 3, 3)).astype("int8")
    weight[3, 0:2, 1, 1] = 127  # one channel pair: 255 * 254 overflows int16
    mod = _qdq_conv(weight, np.zeros((1, 8, 12, 12), "float32"))
    packed, counts = pack_conv(mod, resolve_target("x86-avx2").to_tvm())
    assert counts == {"int8": 0, "int8_depthwise": 0, "int8_dense": 0, "int8_inexact": 1, "float": 0, "float_depthwise": 0, "float_dense": 0, "float_grouped": 0, "int8_grouped": 0, "float_winograd": 0}
    assert packed.same_as(mod)  # not even converted to NHWC


def _qdq_dense(weight: np.ndarray, x: np.ndarray):
    """main(x) = quantize(matmul(dq(q(x)), dq(W))), W: [K, N]."""
    return _realized(x, weight, 1, lambda bb, xd, wd: bb.emit(relax.op.matmul(xd, wd)), out_zero_point=7)


@needs_dot
@pytest.mark.parametrize("m, k, n", [(1, 64, 40), (3, 20, 16)])  # N not a multiple of the lanes; K not of 4
def test_realized_dense_packed_equals_unpacked(m, k, n):
    x = RNG.standard_normal((m, k)).astype("float32")
    mod = _qdq_dense(RNG.integers(-63, 64, (k, n)).astype("int8"), x)
    assert "R.matmul" in mod.script()  # realize made the matmul integer
    _, counts = pack_conv(mod, HOST)
    assert counts["int8_dense"] == 1, counts
    plain = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # no AVX2: TVM's own matmul
    results = []
    for target in (HOST, resolve_target("x86-avx2").to_tvm(), plain):
        vm = relax.VirtualMachine(compile_module(mod, target), tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(results[0], results[2])
    np.testing.assert_array_equal(results[1], results[2])


def test_dense_weights_that_would_saturate_are_left_to_tvm():
    weight = RNG.integers(-63, 64, (64, 16)).astype("int8")
    weight[0:2, 5] = 127  # one pair along K: 255 * 254 overflows int16
    mod = _qdq_dense(weight, np.zeros((1, 64), "float32"))
    _, counts = pack_conv(mod, resolve_target("x86-avx2").to_tvm())
    assert counts["int8_dense"] == 0, counts
    _, counts = pack_conv(mod, resolve_target("x86-avx512").to_tvm())  # VNNI: exact for any int8
    assert counts["int8_dense"] == 1, counts


@pytest.mark.parametrize("width", [5, 13, 27, 55, 111])
def test_odd_widths_get_multi_pixel_tiles(width):
    """An odd width that 7 does not divide is computed one column wider: 2- or 4-pixel tiles."""
    padded = packed_conv2d.padded_width(width)
    assert padded == width + 1
    assert packed_conv2d.tile_for(padded, 4)[0] >= 2
    assert packed_conv2d.tile_for(6, 63) == (2, 3)  # a 1000-channel conv's 63 lane groups of 16
