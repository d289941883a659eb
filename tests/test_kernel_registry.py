"""The hand-kernel registry recognises fused kernels by their compute block's name."""
from __future__ import annotations

import tvm
from tvm import relax

from qcompile.build.pipeline import phases_through, run_phases
from qcompile.frontend import import_model
from qcompile.kernels import hand_kernel_tiles
from qcompile.kernels.registry import hand_kernel_of, hand_kernels
from qcompile.target import resolve_target


def test_every_kernel_module_registers_itself():
    names = {k.name for k in hand_kernels()}
    assert names == {"packed_conv2d", "depthwise_conv2d", "float_conv2d", "winograd_conv2d"}
    assert all(k.tiles for k in hand_kernels())


def test_fused_kernels_are_recognised_by_block_name(tiny_pt2):
    """The tiny model's float convs run on the float kernel and its depthwise conv on the
    depthwise kernel; its dense layer, pools and means are none of them."""
    target = resolve_target("x86-avx2").to_tvm()
    mod = run_phases(import_model(str(tiny_pt2)).mod, target, phases=phases_through("legalize"))
    found = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            kernel = hand_kernel_of(func)
            found[gv.name_hint] = kernel.name if kernel else None
    assert sorted(n for n in found.values() if n) == ["depthwise_conv2d", "float_conv2d", "float_conv2d"], found
    others = [name for name, kernel in found.items() if kernel is None]
    assert any("matmul" in name for name in others), found
    tiles = {name: hand_kernel_tiles(mod[name]) for name in found}
    assert all((tiles[name] is None) == (kernel is None) for name, kernel in found.items())


def test_a_function_without_blocks_is_no_kernel():
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit_te(lambda a: a + 1, x))
    mod = relax.transform.LegalizeOps()(bb.get())
    prim = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)][0]
    assert hand_kernel_of(prim) is None
