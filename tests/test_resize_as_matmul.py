"""ResizeAsMatmul (qcompile.passes.resize_as_matmul): small bilinear upsamplings as two matmuls.

The interpolation matrices against PyTorch's bilinear resize, the rewrite's structure
(Before/Expected) and the resizes it leaves alone, then a segmentation-style head built float32
and int8 against PyTorch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from conftest import build_like_pytorch
from torch import nn
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.passes.resize_as_matmul import ResizeAsMatmul, interpolation_matrix


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size, target", [((8, 8), (128, 128)), ((5, 7), (16, 9))])
def test_matrices_match_pytorch_bilinear(size, target, align_corners):
    x = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
    mode = "align_corners" if align_corners else "half_pixel"
    ry, rx = interpolation_matrix(size[0], target[0], mode), interpolation_matrix(size[1], target[1], mode)
    got = ry @ x @ rx.T
    expected = F.interpolate(torch.from_numpy(x), size=target, mode="bilinear", align_corners=align_corners).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ry.sum(1), 1, rtol=1e-6)  # each output row a convex combination


def test_upsampling_becomes_two_matmuls():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 6), "float32")) -> R.Tensor((1, 3, 16, 12), "float32"):
            with R.dataflow():
                gv = R.image.resize2d(x, R.shape([16, 12]), layout="NCHW", method="linear",
                                      coordinate_transformation_mode="half_pixel")
                R.output(gv)
            return gv

    ry = interpolation_matrix(4, 16, "half_pixel")
    rx_t = np.ascontiguousarray(interpolation_matrix(6, 12, "half_pixel").T)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 6), "float32")) -> R.Tensor((1, 3, 16, 12), "float32"):
            with R.dataflow():
                lv = R.matmul(x, R.const(rx_t))
                gv = R.matmul(R.const(ry), lv)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ResizeAsMatmul(Before), Expected, map_free_vars=True)


def test_large_nearest_broadcast_and_inner_resizes_are_left_alone():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 64, 64), "float32"), p: R.Tensor((1, 3, 1, 1), "float32"),
                 s: R.Tensor((1, 3, 8, 8), "float32")):
            with R.dataflow():
                a = R.image.resize2d(x, R.shape([128, 128]), layout="NCHW", method="linear")  # a large map
                b = R.image.resize2d(p, R.shape([8, 8]), layout="NCHW", method="linear")  # a broadcast
                c = R.image.resize2d(s, R.shape([16, 16]), layout="NCHW", method="nearest_neighbor")
                d = R.image.resize2d(s, R.shape([16, 16]), layout="NCHW", method="linear")  # not an output
                gv = (a, b, R.add(c, d))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ResizeAsMatmul(Before), Before)


class _Head(nn.Module):
    """A segmentation head: a conv, a class projection and a bilinear resize to the input size."""

    def __init__(self, align_corners: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.align_corners = align_corners
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 1))

    def forward(self, x):
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


@pytest.mark.parametrize("int8, align_corners", [(False, False), (False, True), (True, False)])
def test_segmentation_head_matches_pytorch(tmp_path, int8, align_corners):
    module = _Head(align_corners).eval()
    build_like_pytorch(tmp_path, module, (1, 3, 40, 48), int8)
    kernels = (tmp_path / "ir" / "02-kernels.py").read_text()
    assert "R.image.resize2d" not in kernels
