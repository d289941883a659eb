"""Canonicalize imported QDQ graphs into the form ``realize`` matches.

Frontends write constants' layout changes after the ``dequantize``: ONNX Conv biases as
``reshape(dequantize(b_int32))`` and Gemm/MatMul weights as
``permute_dims(dequantize(W_int8))``.  Applying the layout change to the integer
constant (and moving the quantization axis with it) gives ``dequantize(const)`` directly
in front of the op, so one realize pass serves every source.

PyTorch's ``linear`` on ``[B, T, C]`` tokens reaches Relax as
``matmul(reshape(dequantize(xq)), W)``: a reshape or permute_dims of a per-tensor
dequantized activation that only conv/matmul read moves in front of the ``dequantize``
(the two commute for one scale and zero point), so the op reads ``dequantize`` directly.
Shape ops that other ops read stay where they are: realize keeps ``quantize(reshape(dq(x)))``
in int8 as it is.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Emitter,
    Graph,
    const_value,
    dtype_of,
    op_name,
    rebuild,
    shape_of,
    with_main,
)
from qcompile.quantize.op_tables import ANCHORS

# Ops that only move or regroup values: they commute with a per-tensor dequantize.
_SHAPE_OPS = frozenset({"relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
                        "relax.flatten"})


def has_qdq(mod: tvm.IRModule) -> bool:
    """True when ``main`` contains quantize/dequantize calls (a pre-quantized model)."""
    try:
        graph = Graph.from_main(mod["main"])
    except ValueError:
        return False
    return any(op_name(v) in ("relax.quantize", "relax.dequantize") for _, v in graph.bindings)


def canonicalize_qdq(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold reshape / permute_dims of dequantized constants (and reshape / permute_dims /
    astype of plain constants, e.g. PT2E's int64 zero points) into the constants, and move
    shape ops between a per-tensor dequantized activation and the conv/matmul that read
    them in front of the dequantize."""
    graph = Graph.from_main(mod["main"])
    into_anchors = _shape_ops_into_anchors(graph)
    moved: dict = {}  # a moved shape op's old var -> the dequantize call that replaced it

    def const_dequantize(em: Emitter, expr):
        call = graph.call_of(expr, "relax.dequantize")
        if call is None:
            return None
        values = [const_value(em.subst(a)) for a in call.args]
        return None if any(v is None for v in values) else (call, values)

    def rewrite(em: Emitter, var, value):
        name = op_name(value)
        if var in into_anchors:
            new = _move_before_dequantize(em, graph, moved, var, value)
            if new is not None:
                return new
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


def _shape_ops_into_anchors(graph: Graph) -> set:
    """Vars of shape ops whose every reader is a conv/matmul or another such shape op."""
    anchor_reads: dict = {}
    shape_reads: dict = {}  # var -> the shape-op vars that read it
    for var, value in graph.bindings:
        name = op_name(value)
        if name in ANCHORS:
            for arg in value.args:
                if isinstance(arg, relax.Var):
                    anchor_reads[arg] = anchor_reads.get(arg, 0) + 1
        elif name in _SHAPE_OPS and isinstance(value.args[0], relax.Var):
            shape_reads.setdefault(value.args[0], []).append(var)
    found: set = set()
    for var, value in reversed(graph.bindings):
        if op_name(value) not in _SHAPE_OPS or var not in graph.producer:
            continue
        readers = shape_reads.get(var, [])
        if readers and not all(r in found for r in readers):
            continue
        if anchor_reads.get(var, 0) + len(readers) == graph.uses.get(var, 0) > 0:
            found.add(var)
    return found


def _move_before_dequantize(em: Emitter, graph: Graph, moved: dict, var, value):
    """``shape_op(dequantize(xq, s, z))`` of an activation with one scale and zero point as
    ``dequantize(shape_op(xq), s, z)``, else None."""
    arg = value.args[0]
    call = moved[arg] if arg in moved else graph.call_of(arg, "relax.dequantize")
    if call is None:
        return None
    data, scale, zp = (em.subst(a) for a in call.args)
    if const_value(data) is not None:
        return None  # a constant's layout change folds into the constant instead
    if _size(scale) != 1 or _size(zp) != 1 or str(call.attrs.out_dtype) != dtype_of(value):
        return None  # per channel; one scale and zero point may be computed at run time
    shaped = em.emit(relax.Call(value.op, [data] + [em.subst(a) for a in value.args[1:]], value.attrs,
                                value.ty_args))
    new = relax.op.dequantize(shaped, scale, zp, axis=-1, out_dtype=str(call.attrs.out_dtype))
    moved[var] = new
    return new


def _size(expr) -> int:
    """The number of elements of a tensor with a static shape, else -1."""
    try:
        return int(np.prod(shape_of(expr)))
    except (AttributeError, TypeError, ValueError):
        return -1


def _fold_plain(call, value: np.ndarray):
    name = op_name(call)
    if name == "relax.astype":
        return relax.const(value.astype(str(call.attrs.dtype)))
    if name == "relax.permute_dims":
        axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else None
        return relax.const(np.ascontiguousarray(np.transpose(value, axes)))
    return relax.const(value.reshape([int(d) for d in call.ty.shape.values]))
