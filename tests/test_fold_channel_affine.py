"""FoldChannelAffine: a single-use chain of per-channel add/subtract/multiply/divide after an
NCHW/OIHW float32 conv2d becomes ``conv2d(x, W * scale) + shift``; anything else is left as is.

Modules are written in TVMScript with the weights and per-channel constants as parameters, then
bound as constants (``BindParams``), as an imported model holds them.  The constants are dyadic
(powers of two, small integers), so the folded values are exact in float32 whichever order the
pass multiplies them in.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.passes.fold_channel_affine import FoldChannelAffine

RNG = np.random.default_rng(0)
W = RNG.integers(-4, 5, (4, 3, 3, 3)).astype("float32")
B = np.array([1.0, -2.0, 3.0, 0.5], "float32").reshape(1, 4, 1, 1)
S = np.array([0.5, 2.0, 4.0, 0.25], "float32").reshape(1, 4, 1, 1)
D = np.array([2.0, 0.5, 8.0, 1.0], "float32").reshape(1, 4, 1, 1)


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    """``mod`` with the named parameters of ``main`` replaced by constants."""
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    """The first output of ``main(x)``, compiled for the CPU with TVM's default pipeline."""
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x))[0].numpy()


def per_channel(value: np.ndarray) -> np.ndarray:
    return value.reshape(-1, 1, 1, 1)


def test_add_multiply_chain_is_folded_into_the_conv():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32"),
                 s: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                lv1 = R.add(lv, b)
                lv2 = R.multiply(lv1, s)
                gv = R.nn.relu(lv2)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 shift: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                lv2 = R.add(lv, shift)
                gv = R.nn.relu(lv2)
                R.output(gv)
            return gv

    # The rewritten last op comes back bound to a new var that the block outputs (gv1 = gv);
    # CanonicalizeBindings, which the pipeline runs next, removes that alias.
    after = relax.transform.CanonicalizeBindings()(FoldChannelAffine(bind(Before, w=W, b=B, s=S)))
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W * per_channel(S), shift=B * S))


def test_subtract_divide_chain_is_folded_and_computes_the_same():
    # conv -> subtract(mean) -> divide(std) -> multiply(gamma) -> add(beta): a decomposed batch norm.
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 mean: R.Tensor((1, 4, 1, 1), "float32"), std: R.Tensor((1, 4, 1, 1), "float32"),
                 gamma: R.Tensor((1, 4, 1, 1), "float32"),
                 beta: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tuple(R.Tensor((1, 4, 6, 6), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                lv1 = R.subtract(lv, mean)
                lv2 = R.divide(lv1, std)
                lv3 = R.multiply(lv2, gamma)
                lv4 = R.add(lv3, beta)
                gv = (lv4,)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 shift: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tuple(R.Tensor((1, 4, 6, 6), "float32")):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                lv4 = R.add(lv, shift)
                gv = (lv4,)
                R.output(gv)
            return gv

    before = bind(Before, w=W, mean=B, std=D, gamma=S, beta=-B)
    after = FoldChannelAffine(before)
    scale = S / D
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W * per_channel(scale), shift=-B * scale - B))
    x = RNG.standard_normal((1, 3, 8, 8)).astype("float32")
    np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-5, atol=1e-5)


def test_scalar_constants_broadcast_over_the_channels():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 s: R.Tensor((), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                lv1 = R.multiply(s, lv)
                gv = R.nn.relu(lv1)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 shift: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                lv1 = R.add(lv, shift)
                gv = R.nn.relu(lv1)
                R.output(gv)
            return gv

    after = FoldChannelAffine(bind(Before, w=W, s=np.array(4.0, "float32")))
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W * 4, shift=np.zeros((1, 4, 1, 1), "float32")))


@I.ir_module
class _TwoUsers:
    """The conv feeds both the chain and the output: folding would change the output."""

    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
             b: R.Tensor((1, 4, 1, 1), "float32"),
             s: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tuple(R.Tensor((1, 4, 6, 6), "float32"),
                                                              R.Tensor((1, 4, 6, 6), "float32")):
        with R.dataflow():
            lv = R.nn.conv2d(x, w)
            lv1 = R.add(lv, b)
            lv2 = R.multiply(lv1, s)
            gv = (lv, lv2)
            R.output(gv)
        return gv


@I.ir_module
class _SpatialConstant:
    """A constant that varies over H and W is not a per-channel affine."""

    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
             b: R.Tensor((1, 4, 1, 1), "float32"),
             s: R.Tensor((1, 4, 6, 6), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        with R.dataflow():
            lv = R.nn.conv2d(x, w)
            lv1 = R.multiply(lv, s)
            lv2 = R.add(lv1, b)
            gv = R.nn.relu(lv2)
            R.output(gv)
        return gv


@I.ir_module
class _ConstantMinusConv:
    """``b - conv`` negates the conv: not the ``conv - b`` the pass folds."""

    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
             b: R.Tensor((1, 4, 1, 1), "float32"),
             s: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        with R.dataflow():
            lv = R.nn.conv2d(x, w)
            lv1 = R.subtract(b, lv)
            lv2 = R.multiply(lv1, s)
            gv = R.nn.relu(lv2)
            R.output(gv)
        return gv


@I.ir_module
class _BiasOnly:
    """conv + bias is already one conv and one add: nothing to fold."""

    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
             b: R.Tensor((1, 4, 1, 1), "float32"), s: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        with R.dataflow():
            lv = R.nn.conv2d(x, w)
            lv1 = R.add(lv, b)
            gv = R.nn.relu(lv1)
            R.output(gv)
        return gv


@I.ir_module
class _RuntimeWeight:
    """The weight is an input, not a constant: it cannot be scaled at compile time."""

    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
             b: R.Tensor((1, 4, 1, 1), "float32"), s: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        with R.dataflow():
            lv = R.nn.conv2d(x, w)
            lv1 = R.add(lv, b)
            lv2 = R.multiply(lv1, s)
            gv = R.nn.relu(lv2)
            R.output(gv)
        return gv


@I.ir_module
class _NHWC:
    """Only NCHW data with OIHW weights is folded."""

    @R.function
    def main(x: R.Tensor((1, 8, 8, 3), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
             b: R.Tensor((1, 1, 1, 4), "float32"), s: R.Tensor((1, 1, 1, 4), "float32")) -> R.Tensor((1, 6, 6, 4), "float32"):
        with R.dataflow():
            lv = R.nn.conv2d(x, w, data_layout="NHWC", out_layout="NHWC")
            lv1 = R.add(lv, b)
            lv2 = R.multiply(lv1, s)
            gv = R.nn.relu(lv2)
            R.output(gv)
        return gv


@pytest.mark.parametrize("module, params", [
    (_TwoUsers, {"w": W, "b": B, "s": S}),
    (_SpatialConstant, {"w": W, "b": B, "s": RNG.integers(1, 4, (1, 4, 6, 6)).astype("float32")}),
    (_ConstantMinusConv, {"w": W, "b": B, "s": S}),
    (_BiasOnly, {"w": W, "b": B, "s": S}),
    (_RuntimeWeight, {"b": B, "s": S}),
    (_NHWC, {"w": W, "b": B.reshape(1, 1, 1, 4), "s": S.reshape(1, 1, 1, 4)}),
], ids=["two-users", "spatial-constant", "constant-minus-conv", "bias-only", "runtime-weight", "nhwc"])
def test_declined_modules_are_unchanged(module, params):
    before = bind(module, **params)
    tvm.ir.assert_structural_equal(FoldChannelAffine(before), before)


def test_chain_ending_at_the_output_is_folded():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32"),
                 s: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                lv1 = R.add(lv, b)
                gv = R.multiply(lv1, s)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 shift: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                gv = R.add(lv, shift)
                R.output(gv)
            return gv

    # The rewritten last op comes back bound to a new var that the block outputs (gv1 = gv);
    # CanonicalizeBindings, which the pipeline runs next, removes that alias.
    after = relax.transform.CanonicalizeBindings()(FoldChannelAffine(bind(Before, w=W, b=B, s=S)))
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W * per_channel(S), shift=B * S))


def test_chains_are_folded_inside_a_block_never_across_blocks():
    # main of three blocks: the first conv's chain goes on outside its dataflow block (the
    # multiply reads the block's output), so it is left as it is; the second conv's chain
    # lies inside the last block and is folded.
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 w2: R.Tensor((4, 4, 1, 1), "float32"), b: R.Tensor((1, 4, 1, 1), "float32"),
                 s: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                out = R.add(lv, b)
                R.output(out)
            scaled = R.multiply(out, s)
            with R.dataflow():
                lv2 = R.nn.conv2d(scaled, w2)
                lv3 = R.add(lv2, b)
                lv4 = R.multiply(lv3, s)
                gv = R.nn.relu(lv4)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 w2: R.Tensor((4, 4, 1, 1), "float32"), b: R.Tensor((1, 4, 1, 1), "float32"),
                 s: R.Tensor((1, 4, 1, 1), "float32"),
                 shift: R.Tensor((1, 4, 1, 1), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, w)
                out = R.add(lv, b)
                R.output(out)
            scaled = R.multiply(out, s)
            with R.dataflow():
                lv2 = R.nn.conv2d(scaled, w2)
                lv4 = R.add(lv2, shift)
                gv = R.nn.relu(lv4)
                R.output(gv)
            return gv

    w2 = RNG.integers(-4, 5, (4, 4, 1, 1)).astype("float32")
    after = FoldChannelAffine(bind(Before, w=W, w2=w2, b=B, s=S))
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W, w2=w2 * per_channel(S), b=B, s=S, shift=B * S))
