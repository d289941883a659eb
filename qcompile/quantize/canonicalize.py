"""Canonicalize imported QDQ graphs into the form ``realize`` matches.

Frontends write constants' layout changes after the ``dequantize``: ONNX Conv biases as
``reshape(dequantize(b_int32))`` and Gemm/MatMul weights as
``permute_dims(dequantize(W_int8))``.  Applying the layout change to the integer
constant (and moving the quantization axis with it) gives ``dequantize(const)`` directly
in front of the op, so one realize pass serves every source.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Emitter,
    Graph,
    const_value,
    op_name,
    rebuild,
    with_main,
)


def has_qdq(mod: tvm.IRModule) -> bool:
    """True when ``main`` contains quantize/dequantize calls (a pre-quantized model)."""
    try:
        graph = Graph.from_main(mod["main"])
    except ValueError:
        return False
    return any(op_name(v) in ("relax.quantize", "relax.dequantize") for _, v in graph.bindings)


def canonicalize_qdq(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold reshape / permute_dims of dequantized constants (and reshape / permute_dims /
    astype of plain constants, e.g. PT2E's int64 zero points) into the constants."""
    graph = Graph.from_main(mod["main"])

    def const_dequantize(em: Emitter, expr):
        call = graph.call_of(expr, "relax.dequantize")
        if call is None:
            return None
        values = [const_value(em.subst(a)) for a in call.args]
        return None if any(v is None for v in values) else (call, values)

    def rewrite(em: Emitter, var, value):
        name = op_name(value)
        if name not in ("relax.reshape", "relax.permute_dims", "relax.astype"):
            return None
        plain = const_value(em.subst(value.args[0]))
        if plain is not None:  # layout/dtype change of a plain constant: fold it
            return _fold_plain(value, plain)
        if name == "relax.astype":
            return None
        found = const_dequantize(em, value.args[0])
        if found is None:
            return None
        call, (q, scale, zp) = found
        axis = int(call.attrs.axis) % max(q.ndim, 1)
        per_channel = scale.size > 1
        if name == "relax.permute_dims":
            axes = [int(a) for a in value.attrs.axes] if value.attrs.axes is not None else list(range(q.ndim))[::-1]
            new_q = np.transpose(q, axes)
            new_axis = axes.index(axis) if per_channel else -1
        else:
            new_shape = [int(d) for d in value.ty.shape.values]
            new_q = q.reshape(new_shape)
            if per_channel:  # the channel must survive as its own axis of the same size
                matches = [i for i, d in enumerate(new_shape) if d == q.shape[axis]]
                if len(matches) != 1 or int(np.prod(new_shape)) != q.size:
                    return None
                new_axis = matches[0]
            else:
                new_axis = -1
        return em.emit(relax.op.dequantize(relax.const(new_q), relax.const(scale), relax.const(zp),
                                           axis=new_axis, out_dtype=str(call.attrs.out_dtype)), var.name)

    return with_main(mod, rebuild(mod["main"], rewrite))


def _fold_plain(call, value: np.ndarray):
    name = op_name(call)
    if name == "relax.astype":
        return relax.const(value.astype(str(call.attrs.dtype)))
    if name == "relax.permute_dims":
        axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else None
        return relax.const(np.ascontiguousarray(np.transpose(value, axes)))
    return relax.const(value.reshape([int(d) for d in call.ty.shape.values]))
