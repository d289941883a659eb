"""SinkReshapes: a dense layer's bias, activation and residual add move before the reshape
that ends the layer, so that they fuse into its kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import build_like_pytorch
from torch import nn
from tvm import relax

from qcompile.passes.sink_reshape import SinkReshapes

BIAS = np.linspace(-1, 1, 16).astype("float32")


def _module(body) -> tvm.IRModule:
    """A module whose ``main(x[1, 1, 32, 16], r[32, 16])`` is ``body(bb, x, r)``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, 32, 16), "float32"))
    r = relax.Var("r", relax.TensorType((32, 16), "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x, r))
        bb.emit_func_output(out)
    return bb.get()


def _sink(mod: tvm.IRModule) -> tvm.IRModule:
    return relax.transform.DeadCodeElimination(["main"])(SinkReshapes(mod))


def test_bias_activation_and_residual_move_before_the_reshape():
    def before(bb, x, r):
        a = bb.emit(relax.op.reshape(x, (32, 16)))
        b = bb.emit(relax.op.add(a, relax.const(BIAS)))
        g = bb.emit(relax.op.nn.gelu(b))
        return relax.op.add(g, r)

    def expected(bb, x, r):
        b = bb.emit(relax.op.add(x, relax.const(BIAS.reshape(1, 1, 1, 16))))
        g = bb.emit(relax.op.nn.gelu(b))
        s = bb.emit(relax.op.add(g, bb.emit(relax.op.reshape(r, (1, 1, 32, 16)))))
        return relax.op.reshape(s, (32, 16))

    tvm.ir.assert_structural_equal(_sink(_module(before)), _module(expected))


def test_chains_of_reshapes_collapse():
    def before(bb, x, r):
        a = bb.emit(relax.op.reshape(x, (32, 16)))
        b = bb.emit(relax.op.reshape(a, (1, 32, 16)))
        c = bb.emit(relax.op.reshape(b, (1, 1, 32, 16)))  # back to x's own shape
        d = bb.emit(relax.op.multiply(c, relax.const(2.0, "float32")))
        return relax.op.reshape(d, (512,))

    def expected(bb, x, r):
        return relax.op.reshape(bb.emit(relax.op.multiply(x, relax.const(2.0, "float32"))), (512,))

    tvm.ir.assert_structural_equal(_sink(_module(before)), _module(expected))


@pytest.mark.parametrize("other, shape", [
    (np.ones((32, 1), "float32"), (32, 16)),  # broadcast along a leading axis
    (np.ones(64, "float32"), (8, 64)),  # the reshape changes the last axis
])
def test_operands_that_do_not_follow_the_reshape_are_left_alone(other, shape):
    def before(bb, x, r):
        return relax.op.add(bb.emit(relax.op.reshape(x, shape)), relax.const(other))

    mod = _module(before)
    assert SinkReshapes(mod).same_as(mod)


class _Block(nn.Module):
    """A transformer MLP block over tokens: linear, GELU, linear, residual."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x), approximate="tanh"))


@pytest.mark.parametrize("int8", [False, True])
def test_dense_epilogues_fuse_into_their_kernels(tmp_path, int8):
    # x86-avx2: an integer dense kernel on every x86-64 CPU of this machine class
    build_like_pytorch(tmp_path, _Block().eval(), (1, 24, 32), int8, target="x86-avx2")
    lowered = (tmp_path / "ir" / "04-lower.py").read_text()
    kernels = [line.split("def ")[1].split("(")[0] for line in lowered.splitlines() if line.strip().startswith("def ")]
    convs = [k for k in kernels if "qc_conv2d" in k]
    assert len(convs) == 2, kernels
    # the second dense layer's kernel ends with the bias and the residual add
    assert any(k.endswith("_add") or "_add" in k.split("qc_conv2d")[1] for k in convs), convs
    assert not any("tanh" in k and "qc_conv2d" not in k for k in kernels), kernels
