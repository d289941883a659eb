"""Relax passes that take bytes (and work) out of the built library without changing a result.

* :func:`CancelTransposePairs` (kernels phase, after the NHWC conversion): ConvertLayout
  has no layout rule for ``quantize``/``dequantize``, so it wraps each one that sits between
  NHWC ops in ``permute_dims`` to NCHW and back (a float transpose, the quantize, a uint8
  transpose: one fused kernel per int8 layer input, mobilenet_v3_small has 26).  An
  elementwise op commutes with a transpose, so
  ``permute_dims(quantize(permute_dims(x, p), axis=a), q)`` is ``quantize(x, axis=p[a])``
  when ``q`` undoes ``p`` (else one transpose of the result).
"""
from __future__ import annotations

import tvm
from tvm import relax

from qcompile.passes.bindings import Graph, op_name, rebuild_module

_ELEMENTWISE_QDQ = ("relax.quantize", "relax.dequantize")


def _axes(call) -> list[int] | None:
    """The permutation of a ``permute_dims`` call (None: reverse, as numpy's default)."""
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


def cancel_transpose_pairs(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with ``permute_dims -> quantize|dequantize -> permute_dims`` chains on one
    tensor rewritten as the quantize (or dequantize) of the untransposed tensor, plus the one
    transpose the two leave (none when they undo each other); see the module docstring."""
    graph = Graph.from_main(mod["main"])

    def chain(value):
        """(inner permute_dims, quantize|dequantize) under the outer ``value``, or None."""
        if op_name(value) != "relax.permute_dims" or _axes(value) is None:
            return None
        qdq = graph.producer.get(value.args[0]) if isinstance(value.args[0], relax.Var) else None
        if op_name(qdq) not in _ELEMENTWISE_QDQ or not graph.single_use(value.args[0]):
            return None
        inner = graph.call_of(qdq.args[0], "relax.permute_dims")
        return (inner, qdq) if inner is not None and _axes(inner) is not None else None

    def rewrite(em, var, value):
        found = chain(value)
        if found is None:
            return None
        inner, qdq = found
        inner_axes = _axes(inner)
        ndim = len(inner_axes)
        axis = int(qdq.attrs.axis) % ndim
        # out[k] = qdq[outer[k]] = x[inner[outer[k]]]; qdq's axis a is x's axis inner[a]
        composed = [inner_axes[k] for k in _axes(value)]
        args = [em.subst(a) for a in (inner.args[0], *qdq.args[1:])]
        make = relax.op.quantize if op_name(qdq) == "relax.quantize" else relax.op.dequantize
        moved = make(*args, axis=inner_axes[axis], out_dtype=str(qdq.attrs.out_dtype))
        if composed == list(range(ndim)):
            return moved
        return relax.op.permute_dims(em.emit(moved, var.name + "_q"), composed)

    if not any(chain(value) is not None for _, value in graph.bindings):
        return mod  # untouched: a rebuilt main would rename its output
    return relax.transform.DeadCodeElimination(["main"])(rebuild_module(mod, rewrite))


@tvm.transform.module_pass(opt_level=0, name="qcompile.CancelTransposePairs")
def CancelTransposePairs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """:func:`cancel_transpose_pairs` (a ``main`` the binding helpers cannot read is left as it is)."""
    from qcompile.passes.bindings import UnsupportedForm

    try:
        return cancel_transpose_pairs(mod)
    except UnsupportedForm:
        return mod
