"""Hand-structured kernels that TVM's default lowering does not provide.

``int8_dot``: the int8 dot-product instructions of each CPU (x86 VNNI ``vpdpbusd``, AVX2
``vpmaddubsw``, aarch64 ``sdot``) as TIR tensor intrinsics, and which one a target gets.
``packed_conv2d``: an int8 conv2d on a packed weight layout whose inner loop is one of them.
``depthwise_conv2d``: a depthwise conv2d (int8, float32) vectorized along NHWC channels.
``float_conv2d``: a float32 conv2d on a weight packed into output-channel blocks.
``winograd_conv2d``: a float32 3x3 stride-1 conv2d by Winograd's F(2x2, 3x3) on the same tiles.
``registry``: which fused kernels are built on these (by compute-block name), and their tiles.
"""
from __future__ import annotations


def hand_kernel_tiles(func) -> tuple[tuple[int, int], ...] | None:
    """The register tiles `qcompile tune` measures for a fused kernel (a PrimFunc or an
    IRModule) built on one of these kernels, or None for any other kernel (MetaSchedule
    searches those)."""
    from qcompile.kernels.registry import hand_kernel_of

    kernel = hand_kernel_of(func)
    return kernel.tiles if kernel else None
