"""SinkReshapes: elementwise ops on a reshaped tensor computed before the reshape.

A dense layer runs on the packed conv kernels as ``reshape(conv(reshape(x)))``
(:mod:`qcompile.passes.pack_conv`), so its bias, activation, residual add or int8 requantize
arrive after a reshape. FuseOps does not fuse a reshape (an injective op) into a conv, so
each of them ran as a kernel of its own, one more pass over the layer's output: a GPT-2 block
ran its bias + GELU and both residual adds that way. Elementwise ops commute with a reshape
that keeps the last axis, ``f(reshape(x, S)) = reshape(f(x), S)``, when every other operand
is a scalar, a vector along that last axis, or a tensor of shape ``S`` (reshaped too); so do
quantize and dequantize per tensor or along the last axis. Moved before the reshape, they join
the conv's epilogue.

Chains of reshapes collapse into one (``reshape(reshape(x, A), B)`` is ``reshape(x, B)``),
and a reshape to its input's own shape is dropped: two reshapes in a row fuse into a copy
kernel, which RewriteDataflowReshape cannot turn back into a view.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Emitter,
    UnsupportedForm,
    const_value,
    op_name,
    rewrite_module,
)

# Ops that compute each output element from the same element of their operands.
ELEMENTWISE = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power", "relax.maximum",
    "relax.minimum", "relax.exp", "relax.tanh", "relax.erf", "relax.sigmoid", "relax.negative",
    "relax.sqrt", "relax.rsqrt", "relax.abs", "relax.round", "relax.floor", "relax.clip", "relax.astype",
    "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu",
})


def _static_shape(expr) -> tuple[int, ...] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
        return None
    return tuple(int(d) for d in values)


@tvm.transform.module_pass(opt_level=0, name="SinkReshapes")
def SinkReshapes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with ``main``'s elementwise ops moved before the reshapes they read (see the
    module docstring); ``mod`` itself where nothing moves."""
    if "main" not in mod or "R.reshape(" not in mod["main"].script():
        return mod
    views: dict = {}  # old var -> (new source, shape): the old var is reshape(new source, shape)

    def source(expr):
        """(new source, target shape) if ``expr`` is a reshape's result, else None."""
        return views.get(expr) if isinstance(expr, relax.Var) else None

    def through(args, shape):
        """(source, source shape) of the first of ``args`` that reshapes a tensor with the
        same last axis to ``shape`` (the op's output shape), else None."""
        for arg in args:
            seen = source(arg)
            if shape is None or seen is None or seen[1] != shape:
                continue
            base_shape = _static_shape(seen[0])
            if base_shape and base_shape[-1] == shape[-1]:
                return seen[0], base_shape
        return None

    def moved(em: Emitter, var, call, shape):
        """``call`` (over the source) bound, recorded as ``var``'s source, reshaped back."""
        new = em.emit(call)
        views[var] = (new, shape)
        return relax.op.reshape(new, shape)

    def reshape(em: Emitter, var, value):
        arg = value.args[0]
        shape = _static_shape(var)
        base = views[arg][0] if arg in views else em.subst(arg)
        base_shape = _static_shape(base)
        if shape is None or base_shape is None:
            return None
        views[var] = (base, shape)
        if base_shape == shape:
            return base  # a reshape to what it already is
        return relax.op.reshape(base, shape) if arg in views else None

    def operand(em: Emitter, arg, shape, base_shape):
        """``arg`` as an operand over ``base_shape`` instead of ``shape``, else None."""
        seen = source(arg)
        if seen is not None and seen[1] == shape and _static_shape(seen[0]) == base_shape:
            return seen[0]
        arg_shape = _static_shape(arg)
        if arg_shape is None:
            return None
        if len(arg_shape) == 0:
            return em.subst(arg)
        if arg_shape == shape:  # a residual: the same reshape applied to it
            constant = const_value(arg)
            if constant is not None:
                return relax.const(constant.reshape(base_shape), arg.ty.dtype)
            return em.emit(relax.op.reshape(em.subst(arg), base_shape))
        size = int(np.prod(arg_shape))
        if size == 1:
            return relax.const(const_value(arg).reshape(()), arg.ty.dtype) if const_value(arg) is not None else None
        if len(arg_shape) <= len(shape) and arg_shape[-1] == shape[-1] == base_shape[-1] and size == shape[-1]:
            vector = (1,) * (len(base_shape) - 1) + (shape[-1],)
            constant = const_value(arg)
            if constant is not None:
                return relax.const(constant.reshape(vector), arg.ty.dtype)
            return em.emit(relax.op.reshape(em.subst(arg), vector))
        return None

    def elementwise(em: Emitter, var, value):
        shape = _static_shape(var)
        found = through(value.args, shape)
        if found is None:
            return None
        base_shape = found[1]
        args = []
        for arg in value.args:
            if not isinstance(arg, relax.Var) and const_value(arg) is None:
                args.append(arg)  # a clip bound, not a tensor
                continue
            new = operand(em, arg, shape, base_shape)
            if new is None:
                return None
            args.append(new)
        return moved(em, var, relax.Call(value.op, args, value.attrs, value.ty_args), shape)

    def quantize(em: Emitter, var, value):
        """(de)quantize per tensor or along the last axis, which the reshape keeps."""
        shape = _static_shape(var)
        found = through(value.args[:1], shape)
        if found is None or int(value.attrs.axis) not in (-1, len(shape) - 1):
            return None
        base, base_shape = found
        op = relax.op.quantize if op_name(value) == "relax.quantize" else relax.op.dequantize
        scale, zero_point = (em.subst(a) for a in value.args[1:])
        return moved(em, var, op(base, scale, zero_point, axis=len(base_shape) - 1,
                                 out_dtype=str(value.attrs.out_dtype)), shape)

    def rewrite(em: Emitter, var, value):
        name = op_name(value)
        if name == "relax.reshape":
            return reshape(em, var, value)
        if name in ELEMENTWISE:
            return elementwise(em, var, value)
        if name in ("relax.quantize", "relax.dequantize"):
            return quantize(em, var, value)
        return None

    try:
        return rewrite_module(mod, rewrite)
    except UnsupportedForm:  # a main of several blocks whose views cross a block boundary
        return mod
