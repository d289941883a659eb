"""PowerAsMultiply (qcompile.passes.fast_power): x ** 2 and x ** 3 (tanh GELU) as products,
x ** 0.5 as sqrt, without libm's scalar powf; same values as TVM's power."""
from __future__ import annotations

import numpy as np
import tvm
from conftest import run_relax
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.passes.fast_power import PowerAsMultiply


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "float32"):
        with R.dataflow():
            lv = R.power(x, R.const(3.0, "float32"))
            lv1 = R.power(lv, R.const(2.0, "float32"))
            lv2 = R.power(lv1, R.const(0.5, "float32"))
            gv = R.power(lv2, R.const(1.5, "float32"))  # no short form: stays
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "float32"):
        with R.dataflow():
            lv = R.multiply(x, x)
            lv1 = R.multiply(lv, x)
            lv2 = R.multiply(lv1, lv1)
            lv3 = R.sqrt(lv2)
            gv = R.power(lv3, R.const(1.5, "float32"))
            R.output(gv)
        return gv


@I.ir_module
class Variable:
    @R.function
    def main(x: R.Tensor((4, 1), "float32"), e: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "float32"):
        with R.dataflow():
            gv = R.power(x, e)  # not a constant exponent
            R.output(gv)
        return gv


def test_small_exponents_are_products():
    tvm.ir.assert_structural_equal(PowerAsMultiply(Before), Expected, map_free_vars=True)


def test_variable_exponents_are_left_alone():
    assert PowerAsMultiply(Variable).same_as(Variable)


def test_products_match_tvm_power():
    x = np.abs(np.random.default_rng(0).standard_normal((4, 64)) * 3).astype("float32") + 0.1

    np.testing.assert_allclose(run_relax(PowerAsMultiply(Before), x), run_relax(Before, x), rtol=1e-5)
    assert "R.power(x" not in PowerAsMultiply(Before).script()
