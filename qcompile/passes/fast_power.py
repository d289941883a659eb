"""PowerAsMultiply: ``power(x, c)`` with a constant small exponent as multiplications.

TVM lowers ``power`` to libm's scalar ``powf`` for every element, whatever the exponent. The
tanh form of GELU (GPT-2, Whisper, ``gelu_new``) computes ``x ** 3`` and RMS/LayerNorm
decompositions ``x ** 2``: in a GPT-2 block, the ``powf`` loop in the first MLP layer's
epilogue took more time than that layer's matrix product. ``x ** 2`` is ``x * x``, ``x ** 3``
``x * x * x`` (exact in float32 up to rounding, as ONNX Runtime's ``Pow`` kernel special-cases
them), ``x ** 0.5`` is ``sqrt(x)`` and ``x ** 1`` is ``x``.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import Emitter, const_value, dtype_of, rewrite_calls
from qcompile.passes.fast_activations import FLOATS


def _exponent(expr) -> float | None:
    value = const_value(expr)
    if value is None or value.size != 1:
        return None
    return float(np.asarray(value).reshape(()))


def _power(em: Emitter, var, value):
    exponent = _exponent(value.args[1])
    if dtype_of(var) not in FLOATS or exponent not in (0.5, 1.0, 2.0, 3.0):
        return None
    x = em.subst(value.args[0])
    if [str(d) for d in var.ty.shape.values] != [str(d) for d in x.ty.shape.values]:
        return None  # the exponent broadcasts the base: not an elementwise product of x alone
    if exponent == 0.5:
        return relax.op.sqrt(x)
    if exponent == 1.0:
        return x
    square = em.emit(relax.op.multiply(x, x))
    return square if exponent == 2.0 else relax.op.multiply(square, x)


@tvm.transform.module_pass(opt_level=0, name="PowerAsMultiply")
def PowerAsMultiply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with ``main``'s float ``power`` by a constant 0.5, 1, 2 or 3 written without ``powf``."""
    return rewrite_calls(mod, {"relax.power": _power})
