"""The float32 packed conv2d (qcompile.kernels.float_conv2d) and the float depthwise kernel
against numpy, and the pass that routes float convs to them."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_packed_conv import HOST
from tvm import relax

from qcompile.build.pipeline import compile_module, phases_through, run_phases
from qcompile.build.schedules import ConvMatmulCPU
from qcompile.kernels import depthwise_conv2d, float_conv2d
from qcompile.kernels.packed_conv2d import ConvShape
from qcompile.passes.bindings import Graph, const_value, op_name
from qcompile.passes.pack_conv import pack_conv
from qcompile.target import resolve_target

RNG = np.random.default_rng(3)

CASES = {  # ic, h, w, oc, k, stride, pad, dilation
    "3x3": (16, 12, 12, 16, 3, 1, 1, 1),
    "3x3_stride2": (8, 13, 13, 24, 3, 2, 1, 1),
    "1x1": (32, 7, 7, 64, 1, 1, 0, 1),
    "7x7_stem_3_channels": (3, 20, 20, 16, 7, 2, 3, 1),
    "dilated": (8, 11, 11, 8, 3, 1, 2, 2),
    "14_wide": (8, 14, 14, 8, 3, 1, 1, 1),  # 16 registers: computed 16 wide (see padded_width), cropped
    "7_wide_stride2_no_padding": (8, 16, 15, 16, 3, 2, 0, 1),
    "13_wide_1x1": (16, 13, 13, 32, 1, 1, 0, 1),  # 32 registers: computed 14 wide, cropped
    "27_wide_valid_3x3": (8, 29, 29, 16, 3, 1, 0, 1),  # computed 28 wide
    "12_channels": (8, 7, 7, 12, 3, 1, 1, 1),  # computed as 16 (padded_channels), cropped
    "255_channel_head": (32, 13, 13, 255, 1, 1, 0, 1),  # 256 at either width
    "3_wide_1x1": (32, 3, 3, 128, 1, 1, 0, 1),  # 3 pixels x several channel blocks
    "1_pixel": (32, 1, 1, 64, 1, 1, 0, 1),
}


def _conv_nhwc(x, w_oihw, stride, pad, dilation):
    """float64 NHWC conv with zero padding."""
    import torch

    out = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)),
                                     torch.from_numpy(w_oihw.astype(np.float64)), stride=stride, padding=pad,
                                     dilation=dilation, groups=x.shape[3] // w_oihw.shape[1])
    return out.numpy().transpose(0, 2, 3, 1)


def _run(func, tile, *args):
    sch = ConvMatmulCPU(tile).apply(func, HOST, False)
    if sch is None:
        return None
    lib = tvm.compile(sch.mod, HOST)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


# (target lanes, registers): AVX2's padded widths; AVX-512's exact ones with 8 and 16 lanes
# (16-lane targets run convs whose channels 16 does not divide at 8: lanes_for).
LANES_REGISTERS = [(8, 16), (8, 32), (16, 32)]


@pytest.mark.parametrize("lanes, registers", LANES_REGISTERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(case, lanes, registers):
    ic, h, w, oc, k, stride, pad, dilation = CASES[case]
    shape = ConvShape(1, ic, h, w, oc, k, k, (stride, stride), (pad,) * 4, (dilation, dilation))
    x = RNG.standard_normal((1, h, w, ic)).astype("float32")
    weight = RNG.standard_normal((oc, ic, k, k)).astype("float32")
    oh, ow = shape.out_hw
    lanes = float_conv2d.lanes_for(oc, lanes)
    out = _run(float_conv2d.conv2d_func(shape, lanes, registers), None, x, float_conv2d.pack_weight(weight, lanes),
               np.zeros((1, oh, ow, oc), "float32"))
    assert out is not None, "the default schedule rule did not take the float kernel"
    np.testing.assert_allclose(out, _conv_nhwc(x, weight, stride, pad, dilation), rtol=1e-4, atol=1e-4)


def test_register_budget_sets_width_and_default_tile():
    assert float_conv2d.padded_width(14) == 16 and float_conv2d.padded_width(7) == 8
    assert float_conv2d.padded_width(14, 32) == 14 and float_conv2d.padded_width(7, 32) == 7
    assert float_conv2d.tile_for(16, 8) == (4, 2) and float_conv2d.tile_for(14, 8, 32) == (7, 4)
    assert float_conv2d.tile_for(56, 8, 32) == (4, 4) and float_conv2d.tile_for(7, 2, 32) == (7, 2)
    assert float_conv2d.tile_for(56, 3, 32) == (4, 3)  # 24 channels in 8-lane blocks
    # 16 lanes: 7 x 2 where it divides (7 x 4 spills), 3-block tiles for 144 channels, one block for 16
    assert float_conv2d.tile_for(14, 16, 32, 16) == (7, 2) and float_conv2d.tile_for(56, 4, 32, 16) == (7, 2)
    assert float_conv2d.tile_for(56, 9, 32, 16) == (4, 3) and float_conv2d.tile_for(112, 1, 32, 16) == (7, 1)
    # outputs narrower than 4: independent chains over channel blocks, within the registers
    assert float_conv2d.tile_for(3, 8, 32, 16) == (3, 4) and float_conv2d.tile_for(1, 32, 32, 16) == (1, 8)
    assert float_conv2d.tile_for(3, 8, 16, 8) == (3, 2) and float_conv2d.tile_for(2, 5, 32, 16) == (2, 1)
    assert float_conv2d.vector_registers(resolve_target("x86-avx2").to_tvm()) == 16
    assert float_conv2d.vector_registers(resolve_target("x86-avx512").to_tvm()) == 32
    assert float_conv2d.vector_registers(resolve_target("rpi5").to_tvm()) == 16


@pytest.mark.parametrize("target, lanes", [
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=znver4", 16),  # 512-bit FMAs in two halves: half the instructions
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=znver5", 16),  # full-rate 512-bit FMAs
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=sapphirerapids", 16),
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=icelake-server", 16),
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=haswell", 8),  # AVX2
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=cascadelake", 8),  # the generic AVX-512 preset (see WIDE_CPUS)
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver5", "mattr": ["-avx512f"]}', 8),
    ("x86-avx512", 8), ("x86-avx2", 8), ("x86-zen4", 16), ("x86-zen5", 16), ("x86-sapphirerapids", 16),
    ("rpi5", 8),
])
def test_lanes_follow_the_target(target, lanes):
    assert float_conv2d.vector_lanes(resolve_target(target).to_tvm()) == lanes
    assert float_conv2d.lanes_for(48, lanes) == lanes and float_conv2d.lanes_for(24, lanes) == 8


@pytest.mark.parametrize("lanes, registers", LANES_REGISTERS)
@pytest.mark.parametrize("tile", float_conv2d.TILES)
def test_every_tuning_tile_matches(tile, lanes, registers):
    shape = ConvShape(1, 8, 14, 14, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    x = RNG.standard_normal((1, 14, 14, 8)).astype("float32")
    weight = RNG.standard_normal((48, 8, 3, 3)).astype("float32")
    out = _run(float_conv2d.conv2d_func(shape, lanes, registers), tile, x, float_conv2d.pack_weight(weight, lanes),
               np.zeros((1, 14, 14, 48), "float32"))
    if out is None:
        blocks = 48 // lanes
        assert float_conv2d.padded_width(14, registers) % tile[0] or blocks % tile[1], f"tile {tile} fits but was refused"
        return
    np.testing.assert_allclose(out, _conv_nhwc(x, weight, 1, 1, 1), rtol=1e-4, atol=1e-4)


def test_pack_conv_lanes_follow_the_target():
    """The packed weight, the kernel and its schedule agree on the lanes: 48 output
    channels in 16-lane blocks on Zen 5 and Zen 4, 24 at 8 there, 8 lanes for both on
    the generic AVX-512 target."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 14, 14), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(RNG.standard_normal((48, 8, 3, 3)).astype("float32")),
                                           padding=1))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(RNG.standard_normal((24, 48, 1, 1)).astype("float32"))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    for mcpu, expected in (("znver5", [16, 8]), ("znver4", [16, 8]), ("cascadelake", [8, 8])):
        target = resolve_target(f"llvm -mtriple=x86_64-linux-gnu -mcpu={mcpu}").to_tvm()
        converted, counts = pack_conv(mod, target)
        assert counts["float"] == 2
        weights = [const_value(arg) for _, v in Graph.from_main(converted["main"]).bindings
                   if op_name(v) == "relax.call_tir" for arg in v.args[1]]
        assert [w.shape[-1] for w in weights if w is not None and w.ndim == 5] == expected
        lowered = run_phases(converted, target, phases_through("legalize"))
        for gv, func in lowered.functions.items():
            if gv.name_hint.startswith("qc_conv2d_float32"):
                assert ConvMatmulCPU().apply(func, target, False) is not None, gv.name_hint


def test_float_depthwise_matches_reference():
    shape = ConvShape(1, 24, 13, 13, 24, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1))
    x = RNG.standard_normal((1, 13, 13, 24)).astype("float32")
    weight = RNG.standard_normal((3, 3, 24)).astype("float32")
    out = _run(depthwise_conv2d.depthwise_func(shape, "float32"), None, x, np.zeros(1, "float32"), weight,
               np.zeros((1, 7, 7, 24), "float32"))
    expected = _conv_nhwc(x, weight.transpose(2, 0, 1)[:, None], 2, 1, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def _with_and_without_kernels(mod: tvm.IRModule, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mod`` run on ``data`` as built for this CPU, and with PackConv off (TVM's own convs)."""
    def run() -> np.ndarray:
        return relax.VirtualMachine(compile_module(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()

    got = run()
    with tvm.transform.PassContext(disabled_pass=["qcompile.PackConv"]):
        return got, run()


def test_float_model_uses_the_kernels_and_matches_tvm():
    """conv 3->16 (+bias, relu) -> depthwise 3x3 -> conv 1x1 16->12 (not a multiple of 8
    lanes: computed as 16 channels and cropped): the float kernels built for this CPU ==
    TVM's own NCHW convs."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(RNG.standard_normal((16, 3, 3, 3)).astype("float32")),
                                           strides=2, padding=1))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(
                y, relax.const(RNG.standard_normal((1, 16, 1, 1)).astype("float32"))))))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(RNG.standard_normal((16, 1, 3, 3)).astype("float32")),
                                           padding=1, groups=16))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(RNG.standard_normal((12, 16, 1, 1)).astype("float32"))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    _, counts = pack_conv(mod, HOST)
    assert counts == {"int8": 0, "int8_depthwise": 0, "int8_dense": 0, "int8_inexact": 0, "float": 2, "float_depthwise": 1, "float_dense": 0, "float_grouped": 0, "int8_grouped": 0, "float_winograd": 0}
    gpu = tvm.target.Target("cuda")
    assert pack_conv(mod, gpu)[0].same_as(mod)  # CPU kernels only
    data = RNG.standard_normal((1, 3, 16, 16)).astype("float32")
    got, plain = _with_and_without_kernels(mod, data)
    assert got.shape == (1, 12, 8, 8)
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_nhwc_max_pool_is_scheduled_and_exact(dtype):
    """NHWC pools (what ConvertLayout leaves between the kernels) get the vectorized default
    schedule and still equal PyTorch's max pool (padding with the pool's identity)."""
    import torch

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 17, 17, 32), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(x, 3, 2, 1, layout="NHWC")))
        bb.emit_func_output(out)
    mod = bb.get()
    lowered = run_phases(mod, HOST, phases_through("legalize"))
    sch = ConvMatmulCPU().apply(lowered["max_pool2d"], HOST, False)
    assert sch is not None and "T.vectorized" in sch.mod.script()
    data = RNG.integers(0, 256, (1, 17, 17, 32)).astype(dtype)
    got = relax.VirtualMachine(compile_module(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(data.astype("float32")).permute(0, 3, 1, 2), 3, 2, 1)
    np.testing.assert_array_equal(got.astype("float32"), ref.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("mcpu", ["znver5", "haswell"])
def test_float_linear_layers_run_on_the_conv_kernel(mcpu):
    """A float32 linear layer over tokens (x[B, T, K] @ W[K, N] + bias) and a one-row product
    (a classifier) become the float conv kernel as a 1x1 conv over a 1 x rows image
    ("float_dense") and match numpy; a product whose N is no multiple of 8 stays a matmul."""
    import tvm
    from tvm import relax

    from qcompile.build.pipeline import compile_module
    from qcompile.target.hostcpu import cpu_flags

    if mcpu == "znver5" and "avx512f" not in cpu_flags():
        pytest.skip("znver5 code needs AVX-512, which this CPU (or its hypervisor) does not expose")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 12, 48)).astype("float32")
    w = rng.standard_normal((48, 32)).astype("float32")
    b = rng.standard_normal(32).astype("float32")
    w1 = rng.standard_normal((48, 16)).astype("float32")
    w2 = rng.standard_normal((48, 10)).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((2, 12, 48), "float32"))
    rv = relax.Var("r", relax.TensorType((1, 48), "float32"))
    with bb.function("main", [xv, rv]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.matmul(xv, relax.const(w)), relax.const(b)))
            z = bb.emit(relax.op.matmul(rv, relax.const(w1)))
            c = bb.emit(relax.op.matmul(rv, relax.const(w2)))
            out = bb.emit_output(relax.Tuple([y, z, c]))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    counts: dict = {}
    exe = compile_module(bb.get(), target, kernel_counts=counts)
    assert counts["float_dense"] == 2, counts  # not the 10-column one
    vm = relax.VirtualMachine(exe, tvm.cpu())
    r = rng.standard_normal((1, 48)).astype("float32")
    got_y, got_z, got_c = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(r))
    np.testing.assert_allclose(got_y.numpy(), x @ w + b, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_z.numpy(), r @ w1, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_c.numpy(), r @ w2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [5, 13, 27, 55, 111])
def test_odd_widths_get_multi_pixel_tiles(width):
    """Widths that neither 4 nor 7 divides are computed a few columns wider, so the
    register tile holds 4 or 7 pixels instead of one (and never more than 2 columns extra)."""
    for lanes, registers in LANES_REGISTERS:
        padded = float_conv2d.padded_width(width, registers)
        assert width < padded <= width + 3
        assert float_conv2d.tile_for(padded, 4, registers, lanes)[0] >= 4


def test_grouped_convs_run_on_the_float_kernel():
    """RegNet-style grouped convs (group width 8, strided; 2 groups of 32) run on the packed
    float kernel, each lane block reducing over its own group's input channels; a group width
    that is no whole lane block (4) stays on TVM's conv. All equal TVM's own NCHW convs."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 48, 14, 14), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(RNG.standard_normal((48, 8, 3, 3)).astype("float32")),
                                           strides=2, padding=1, groups=6))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(RNG.standard_normal((64, 24, 3, 3)).astype("float32")),
                                           padding=1, groups=2))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(RNG.standard_normal((64, 4, 3, 3)).astype("float32")),
                                           padding=1, groups=16))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    _, counts = pack_conv(mod, HOST)
    assert counts["float_grouped"] == 2 and counts["float"] == 0, counts
    data = RNG.standard_normal((1, 48, 14, 14)).astype("float32")
    got, plain = _with_and_without_kernels(mod, data)
    assert got.shape == (1, 64, 7, 7)
    # three layers of unit-variance weights: outputs up to ~1e3, summed in another order
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
