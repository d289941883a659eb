"""ActivationsAsElementwise: ``gelu``, ``gelu_tanh`` and ``silu`` written with ``erf``, ``tanh``
and ``sigmoid`` before FastMathTransform.

TVM 0.27 legalizes ``R.nn.gelu`` with TOPI's ``erf``, ``R.nn.gelu_tanh`` with its ``tanh`` and
``R.nn.silu`` with its ``sigmoid``: scalar libm calls per element, which FastMathTransform
(it rewrites only the ``erf``, ``tanh`` and ``exp`` ops) never sees. ``torch.export`` models and
ONNX ``Gelu`` nodes (opset 20; the dynamo exporter) import as these ops, so their GELU ran as a
scalar loop in each MLP's epilogue while the same model exported through ``Erf`` got the
vectorized polynomial. Written as the elementwise expressions TVM legalizes them to, they get
the fast ``erf``/``tanh`` and, through SigmoidAsExp, the fast ``exp``.
"""
from __future__ import annotations

import math

import tvm
from tvm import relax

from qcompile.passes.bindings import Emitter, dtype_of, rewrite_calls

FLOATS = ("float32", "float16")  # the dtypes these rewrites (and PowerAsMultiply) take


def _gelu(em: Emitter, var, value):
    """``x * (0.5 + 0.5 * erf(x / sqrt(2)))``, TVM's legalization of ``gelu``."""
    dtype = dtype_of(var)
    if dtype not in FLOATS:
        return None
    x = em.subst(value.args[0])
    erf = em.emit(relax.op.erf(em.emit(relax.op.multiply(x, relax.const(0.5 ** 0.5, dtype)))))
    half = em.emit(relax.op.add(relax.const(0.5, dtype), em.emit(relax.op.multiply(erf, relax.const(0.5, dtype)))))
    return relax.op.multiply(x, half)


def _gelu_tanh(em: Emitter, var, value):
    """``0.5 * x * (1 + tanh(sqrt(2 / pi) * x * (1 + 0.044715 * x * x)))``."""
    dtype = dtype_of(var)
    if dtype not in FLOATS:
        return None
    x = em.subst(value.args[0])
    square = em.emit(relax.op.multiply(x, x))
    inner = em.emit(relax.op.add(relax.const(1.0, dtype), em.emit(relax.op.multiply(square, relax.const(0.044715, dtype)))))
    arg = em.emit(relax.op.multiply(em.emit(relax.op.multiply(x, relax.const(math.sqrt(2.0 / math.pi), dtype))), inner))
    one_plus = em.emit(relax.op.add(relax.const(1.0, dtype), em.emit(relax.op.tanh(arg))))
    return relax.op.multiply(em.emit(relax.op.multiply(x, relax.const(0.5, dtype))), one_plus)


def _silu(em: Emitter, var, value):
    """``x * sigmoid(x)``."""
    if dtype_of(var) not in FLOATS:
        return None
    x = em.subst(value.args[0])
    return relax.op.multiply(x, em.emit(relax.op.sigmoid(x)))


@tvm.transform.module_pass(opt_level=0, name="ActivationsAsElementwise")
def ActivationsAsElementwise(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with ``main``'s float ``gelu``, ``gelu_tanh`` and ``silu`` as elementwise ops."""
    return rewrite_calls(mod, {"relax.nn.gelu": _gelu, "relax.nn.gelu_tanh": _gelu_tanh, "relax.nn.silu": _silu})
