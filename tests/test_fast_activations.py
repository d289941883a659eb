"""ActivationsAsElementwise (qcompile.passes.fast_activations): GELU and SiLU ops written with
erf/tanh/sigmoid, so that FastMathTransform gives them the vectorized functions; same values
as TVM's own legalization of the ops."""
from __future__ import annotations

import math

import numpy as np
import tvm
from conftest import run_relax
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.passes.fast_activations import ActivationsAsElementwise
from qcompile.passes.fast_sigmoid import SigmoidAsExp


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "float32"):
        with R.dataflow():
            lv = R.nn.gelu(x)
            lv1 = R.nn.silu(lv)
            gv = R.nn.gelu_tanh(lv1)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 64), "float32")) -> R.Tensor((4, 64), "float32"):
        with R.dataflow():
            lv = R.multiply(x, R.const(0.5 ** 0.5, "float32"))
            lv1 = R.erf(lv)
            lv2 = R.multiply(lv1, R.const(0.5, "float32"))
            lv3 = R.add(R.const(0.5, "float32"), lv2)
            lv4 = R.multiply(x, lv3)
            lv5 = R.sigmoid(lv4)
            lv6 = R.multiply(lv4, lv5)
            lv7 = R.multiply(lv6, lv6)
            lv8 = R.multiply(lv7, R.const(0.044715, "float32"))
            lv9 = R.add(R.const(1.0, "float32"), lv8)
            lv10 = R.multiply(lv6, R.const(math.sqrt(2.0 / math.pi), "float32"))
            lv11 = R.multiply(lv10, lv9)
            lv12 = R.tanh(lv11)
            lv13 = R.add(R.const(1.0, "float32"), lv12)
            lv14 = R.multiply(lv6, R.const(0.5, "float32"))
            gv = R.multiply(lv14, lv13)
            R.output(gv)
        return gv


def test_activations_are_written_as_elementwise_ops():
    tvm.ir.assert_structural_equal(ActivationsAsElementwise(Before), Expected, map_free_vars=True)


def test_fast_activations_match_tvm_legalization():
    x = np.concatenate([np.linspace(-12, 12, 128), np.random.default_rng(0).standard_normal(128) * 3])
    x = x.astype("float32").reshape(4, 64)

    fast = relax.transform.FastMathTransform()(SigmoidAsExp(ActivationsAsElementwise(Before)))
    np.testing.assert_allclose(run_relax(fast, x), run_relax(Before, x), rtol=1e-5, atol=1e-6)
    legalized = relax.transform.LegalizeOps()(fast).script()
    assert "fast_erf" in legalized and "fast_tanh" in legalized and "fast_exp" in legalized
    assert "T.erf(" not in legalized and "T.tanh(" not in legalized and "T.sigmoid(" not in legalized
