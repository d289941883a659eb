"""Small helpers to read and rebuild a Relax ``main`` made of one dataflow block.

After the inference phase every imported model is a single dataflow block of call
bindings; the quantizer's passes walk those bindings in order and re-emit them through a
BlockBuilder, replacing some.  This is simpler to reason about (and to test) than
nested pattern rewrites, and keeps every rewrite in program order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm
from tvm import relax


def op_name(expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call to a Relax operator, else None."""
    op = getattr(expr, "op", None)
    return getattr(op, "name", None) if isinstance(op, tvm.ir.Op) else None


def const_value(expr) -> np.ndarray | None:
    """The numpy value of a Relax constant, else None."""
    value = getattr(expr, "value", None)
    if isinstance(value, tvm.runtime.Tensor):
        return value.numpy()
    return None


def shape_of(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape.values)


def dtype_of(expr) -> str:
    return str(expr.ty.dtype)


@dataclass
class Graph:
    """The bindings of ``main`` in order, with producers and use counts."""

    params: list
    bindings: list  # [(var, value)]
    output: object
    producer: dict = field(default_factory=dict)  # var -> value
    uses: dict = field(default_factory=dict)  # var -> number of uses

    @classmethod
    def from_main(cls, func) -> "Graph":
        body = func.body
        if len(body.blocks) != 1 or not isinstance(body.blocks[0], relax.DataflowBlock):
            raise ValueError("expected main to be one dataflow block (run the inference phase first)")
        bindings = [(b.var, b.value) for b in body.blocks[0].bindings]
        graph = cls(list(func.params), bindings, body.body)
        for var, value in bindings:
            graph.producer[var] = value
            for arg in _var_args(value):
                graph.uses[arg] = graph.uses.get(arg, 0) + 1
        for arg in _var_args(body.body):
            graph.uses[arg] = graph.uses.get(arg, 0) + 1
        return graph

    def single_use(self, var) -> bool:
        return self.uses.get(var, 0) == 1

    def call_of(self, expr, name: str):
        """The producing call of ``expr`` if it is a call to operator ``name``."""
        value = self.producer.get(expr) if isinstance(expr, relax.Var) else None
        return value if value is not None and op_name(value) == name else None


def _var_args(expr) -> list:
    out = []
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        for f in expr.fields:
            out.extend(_var_args(f))
    elif isinstance(expr, relax.TupleGetItem):
        out.extend(_var_args(expr.tuple_value))
    elif hasattr(expr, "args") and hasattr(expr, "op"):
        for a in expr.args:
            out.extend(_var_args(a))
    return out


class Emitter:
    """Re-emits bindings into a BlockBuilder, mapping old vars to new ones."""

    def __init__(self, bb: relax.BlockBuilder) -> None:
        self.bb = bb
        self.vmap: dict = {}

    def subst(self, expr):
        if isinstance(expr, relax.Var):
            return self.vmap.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.subst(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self.subst(expr.tuple_value), expr.index)
        if hasattr(expr, "args") and hasattr(expr, "op"):
            return relax.Call(expr.op, [self.subst(a) for a in expr.args], expr.attrs, expr.ty_args)
        return expr

    def emit(self, expr, name: str = ""):
        return self.bb.emit(expr, name_hint=name)


# A rewrite gets (emitter, old var, old value) and returns the new var/expr to bind to
# the old var (a constant replaces the var at its uses), or None to re-emit the binding.
Rewrite = Callable[[Emitter, object, object], object]


def rebuild(func, rewrite: Rewrite, extra_outputs: Callable[[Emitter], list] | None = None):
    """A new ``main`` with each binding passed through ``rewrite``.

    ``extra_outputs`` (given the emitter at the end) returns more values to return:
    the function then returns ``(original outputs..., extra...)`` flattened into one tuple.
    """
    return _rebuild(func, rewrite, extra_outputs)["main"]


def rebuild_module(mod: tvm.IRModule, rewrite: Rewrite) -> tvm.IRModule:
    """``mod`` with ``main`` rebuilt through ``rewrite``, keeping the functions that the
    rewrite added with ``em.bb.add_func`` (e.g. kernels for ``call_tir``)."""
    built = _rebuild(mod["main"], rewrite, None)
    new = with_main(mod, built["main"])
    for gv, fn in built.functions.items():
        if gv.name_hint != "main":
            new[gv] = fn
    return new


def _rebuild(func, rewrite: Rewrite, extra_outputs) -> tvm.IRModule:
    graph = Graph.from_main(func)
    bb = relax.BlockBuilder()
    em = Emitter(bb)
    with bb.function("main", graph.params):
        with bb.dataflow():
            output_var = graph.output
            for var, value in graph.bindings:
                if var.same_as(output_var):
                    continue
                new = rewrite(em, var, value)
                if new is None:
                    new = em.emit(em.subst(value), var.name)
                elif not isinstance(new, relax.Var) and const_value(new) is None:
                    new = em.emit(new, var.name)  # constants are substituted, not bound
                em.vmap[var] = new
            # The output's binding goes through ``rewrite`` too (a rewrite may target the last
            # op), but is returned rather than bound here: emit_output binds it.
            value = graph.producer.get(output_var)
            new = rewrite(em, output_var, value) if isinstance(value, relax.Call) else None
            out = new if new is not None else em.subst(value if value is not None else output_var)
            if extra_outputs is not None:
                if isinstance(out, relax.Call):  # the last op may be observed: bind it so extras can name it
                    out = em.emit(out, output_var.name)
                    em.vmap[output_var] = out
                fields = list(out.fields) if isinstance(out, relax.Tuple) else [out]
                out = relax.Tuple(fields + list(extra_outputs(em)))
            result = bb.emit_output(out)
        bb.emit_func_output(result)
    return bb.get()


def with_main(mod: tvm.IRModule, main) -> tvm.IRModule:
    new = tvm.IRModule({"main": main}, attrs=mod.attrs)
    for gv, fn in mod.functions.items():
        if gv.name_hint != "main":
            new[gv] = fn
    return new
