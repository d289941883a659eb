"""SigmoidAsExp: ``sigmoid(x)`` as ``1 / (1 + exp(-x))`` before FastMathTransform.

TVM 0.27's FastMathTransform replaces ``exp``, ``erf`` and ``tanh`` with vectorized polynomial
approximations but leaves ``sigmoid``, whose lowering calls libm's scalar ``expf`` per element:
every SiLU (EfficientNet, YOLO, MobileNetV3's squeeze-excite gates) ran a scalar loop inside
the conv epilogue it was fused into.  Written with ``exp`` it gets the fast one (relative
error ~1e-7; the input clamped to +-88, where the sigmoid is 0 or 1 in float32 anyway).
"""
from __future__ import annotations

import tvm
from tvm import relax

from qcompile.passes.bindings import Emitter, dtype_of, op_name, rewrite_module


@tvm.transform.module_pass(opt_level=0, name="SigmoidAsExp")
def SigmoidAsExp(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with every float32 ``sigmoid`` of ``main`` written with ``exp``."""
    if "main" not in mod or "R.sigmoid(" not in mod["main"].script():
        return mod

    def rewrite(em: Emitter, var, value):
        if op_name(value) != "relax.sigmoid" or dtype_of(value.args[0]) != "float32":
            return None
        one = relax.const(1.0, "float32")
        e = em.emit(relax.op.exp(em.emit(relax.op.negative(em.subst(value.args[0])))))
        return relax.op.divide(one, em.emit(relax.op.add(one, e)))

    return rewrite_module(mod, rewrite)
