"""SigmoidAsExp (qcompile.passes.fast_sigmoid): sigmoid written with exp, so that the build's
FastMathTransform gives it the vectorized exp; same values as TVM's sigmoid."""
from __future__ import annotations

import numpy as np
import tvm
from conftest import run_relax
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.passes.fast_sigmoid import SigmoidAsExp


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "float32"):
        with R.dataflow():
            lv = R.sigmoid(x)
            gv = R.multiply(x, lv)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "float32"):
        with R.dataflow():
            lv = R.negative(x)
            lv1 = R.exp(lv)
            lv2 = R.add(R.const(1.0, "float32"), lv1)
            lv3 = R.divide(R.const(1.0, "float32"), lv2)
            gv = R.multiply(x, lv3)
            R.output(gv)
        return gv


def test_sigmoid_is_written_with_exp():
    tvm.ir.assert_structural_equal(SigmoidAsExp(Before), Expected, map_free_vars=True)


def test_fast_silu_matches_tvm_sigmoid():
    x = np.concatenate([np.linspace(-120, 120, 128), np.random.default_rng(0).standard_normal(128) * 4])
    x = x.astype("float32").reshape(4, 64)

    def run(mod):
        return run_relax(relax.transform.FastMathTransform()(mod), x)

    fast = run(SigmoidAsExp(Before))
    np.testing.assert_allclose(fast, run(Before), rtol=1e-5, atol=1e-6)
    assert "exp" in SigmoidAsExp(Before).script() and "sigmoid" not in SigmoidAsExp(Before).script()
