"""DropPaddingTaps (qcompile.passes.padding_taps): conv2d taps that only read padding removed.

The tap arithmetic, the rewrite's structure (Before/Expected) and convs it must leave alone,
then numbers: DeepLab-style dilated branches against PyTorch, float32 and int8 builds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import build_like_pytorch
from torch import nn
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.passes.padding_taps import DropPaddingTaps, kept_taps

W3 = np.arange(4 * 2 * 3 * 3, dtype=np.float32).reshape(4, 2, 3, 3)
W5 = np.arange(4 * 2 * 5 * 5, dtype=np.float32).reshape(4, 2, 5, 5)


def test_kept_taps():
    assert kept_taps(8, 3, 1, 12, 12, 12) == (1, 1)  # ASPP rate 12 on an 8x8 map: centre only
    assert kept_taps(33, 3, 1, 36, 36, 36) == (1, 1)
    assert kept_taps(33, 3, 1, 24, 24, 24) == (0, 2)  # row 24.. reads row 0..
    assert kept_taps(5, 5, 1, 3, 6, 6) == (1, 3)
    assert kept_taps(8, 3, 1, 1, 1, 1) == (0, 2)


def test_dilated_conv_on_a_small_map_becomes_1x1():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 8, 8), "float32")) -> R.Tensor((1, 4, 8, 8), "float32"):
            with R.dataflow():
                gv = R.nn.conv2d(x, R.const(W3), padding=[12, 12, 12, 12], dilation=[12, 12])
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 8, 8), "float32")) -> R.Tensor((1, 4, 8, 8), "float32"):
            with R.dataflow():
                gv = R.nn.conv2d(x, R.const(W3[:, :, 1:2, 1:2]), padding=[0, 0, 0, 0], dilation=[1, 1])
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(DropPaddingTaps(Before), Expected, map_free_vars=True)


def test_outer_taps_dropped_along_one_axis():
    # height 5: taps 0 and 4 read rows -6..-2 and 6..10 only; width 16: every tap reads data
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 5, 16), "float32")) -> R.Tensor((1, 4, 5, 16), "float32"):
            with R.dataflow():
                gv = R.nn.conv2d(x, R.const(W5), padding=[6, 6, 6, 6], dilation=[3, 3])
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 5, 16), "float32")) -> R.Tensor((1, 4, 5, 16), "float32"):
            with R.dataflow():
                gv = R.nn.conv2d(x, R.const(W5[:, :, 1:4, :]), padding=[3, 6, 3, 6], dilation=[3, 3])
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(DropPaddingTaps(Before), Expected, map_free_vars=True)


def test_convs_whose_taps_all_read_data_are_left_alone():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 8, 8), "float32"), w: R.Tensor((4, 2, 3, 3), "float32")
                 ) -> R.Tensor((1, 4, 8, 8), "float32"):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(W3), padding=[1, 1, 1, 1])
                b = R.nn.conv2d(x, R.const(W3), padding=[2, 2, 2, 2], dilation=[2, 2])
                c = R.nn.conv2d(x, w, padding=[12, 12, 12, 12], dilation=[12, 12])  # weight not constant
                gv = R.add(R.add(a, b), c)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(DropPaddingTaps(Before), Before)


class _ASPP(nn.Module):
    """DeepLabV3's atrous branches on a small map, plus a branch pruned along the height only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branches = nn.ModuleList([nn.Conv2d(16, 8, 3, padding=r, dilation=r, bias=False) for r in (2, 6, 12)])
        self.tall = nn.Conv2d(16, 8, 5, padding=6, dilation=3)
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x):
        return torch.relu(self.bn(torch.cat([b(x) for b in self.branches] + [self.tall(x)], 1)))


@pytest.mark.parametrize("int8", [False, True])
def test_aspp_matches_pytorch(tmp_path, int8):
    module = _ASPP().eval()
    module.bn.running_mean.normal_()
    module.bn.running_var.uniform_(0.5, 2.0)
    built = build_like_pytorch(tmp_path, module, (1, 16, 5, 9), int8)
    inference = (tmp_path / "ir" / "01-inference.py").read_text()
    # rate 2 reads data with every tap; rate 6 keeps its width taps, rate 12 only the centre
    assert "dilation=[2, 2]" in inference and "dilation=[1, 6]" in inference
    assert "dilation=[12, 12]" not in inference and "dilation=[6, 6]" not in inference
    if int8:
        assert not built.manifest.quantization["float_layers"]
