"""ConvAsConv2D (qcompile.passes.as_conv2d): conv1d and non-overlapping conv2d_transpose as conv2d.

The rewrite's structure (Before/Expected), then numbers: every form against PyTorch, float32
and int8 builds (the int8 build quantizes the conv2d the rewrite made), and a ConvTranspose2d
with overlapping windows left as it is.
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

from qcompile.passes.as_conv2d import ConvAsConv2D

W1 = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8, 4, 3)


def test_conv1d_becomes_a_1xk_conv2d():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 16), "float32")) -> R.Tensor((1, 8, 8), "float32"):
            with R.dataflow():
                gv = R.nn.conv1d(x, R.const(W1), strides=[2], padding=[1, 1], dilation=[1])
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 16), "float32")) -> R.Tensor((1, 8, 8), "float32"):
            with R.dataflow():
                lv = R.expand_dims(x, axis=[2])
                lv1 = R.nn.conv2d(lv, R.const(W1[:, :, None, :]), strides=[1, 2], padding=[0, 1, 0, 1],
                                  dilation=[1, 1])
                gv = R.squeeze(lv1, axis=[2])
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ConvAsConv2D(Before), Expected, map_free_vars=True)


def test_a_function_returning_a_tuple_is_rewritten():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 16), "float32")):
            with R.dataflow():
                a = R.nn.conv1d(x, R.const(W1), strides=[2], padding=[1, 1], dilation=[1])
                b = R.nn.relu(a)
                R.output(a, b)
            return (a, b)

    after = ConvAsConv2D(Before)
    assert "R.nn.conv2d(" in after.script() and "R.nn.conv1d(" not in after.script()
    assert len(after["main"].body.body.ty.fields) == 2


def test_overlapping_transposed_conv_is_left_alone():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32")) -> R.Tensor((1, 2, 17, 17), "float32"):
            with R.dataflow():
                gv = R.nn.conv2d_transpose(x, R.const(np.ones((4, 2, 3, 3), np.float32)), strides=[2, 2])
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ConvAsConv2D(Before), Before)


class _Audio(nn.Module):
    """conv1d forms: strided and padded, dilated, depthwise (groups), then a 2x2 stride-2
    ConvTranspose2d on a 2-D map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(8, 16, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2, groups=16)
        self.c3 = nn.Conv1d(16, 24, 1)
        self.bn = nn.BatchNorm1d(24)

    def forward(self, x):
        return self.bn(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))


class _Up(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.up(x)))


@pytest.mark.parametrize("net, shape", [(_Audio, (1, 8, 64)), (_Up, (1, 16, 8, 12))])
@pytest.mark.parametrize("int8", [False, True])
def test_rewritten_models_match_pytorch(tmp_path, net, shape, int8):
    module = net().eval()
    if isinstance(module, _Audio):  # batch-norm statistics that are not the identity
        module.bn.running_mean.normal_()
        module.bn.running_var.uniform_(0.5, 2.0)
    built = build_like_pytorch(tmp_path, module, shape, int8)
    lowered = (tmp_path / "ir" / "02-kernels.py").read_text()
    assert "conv1d" not in lowered and "conv2d_transpose" not in lowered
    if int8:  # every conv, the rewritten ones too, quantized
        quantization = built.manifest.quantization
        assert not quantization["float_layers"]
        assert len(quantization["layers"]) == sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d))
                                                  for m in module.modules())
