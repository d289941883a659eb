"""Small helpers to read and rebuild a Relax ``main`` binding by binding.

After the inference phase an imported model is usually one dataflow block of call
bindings; the quantizer's passes walk those bindings in order and re-emit them through a
BlockBuilder, replacing some.  This is simpler to reason about (and to test) than
nested pattern rewrites, and keeps every rewrite in program order.

A ``main`` of several blocks (a top-level ``If`` between two dataflow blocks, bindings
outside any dataflow block, ``match_cast``) is read and rebuilt block by block, with the
block structure kept.  A dataflow block's locals are invisible to later blocks, so a
rewrite must not reach through a block boundary: :class:`Graph` shows no producer for a
value that a dataflow block hands on (an output of any block but the one the function
returns from) and counts the hand-over as one more use, so a pattern that follows a
producer or a single-use chain stops there.  Values an ``If`` (or any other non-call
binding) computes are opaque: rewrites see them as inputs, their branches are copied with
the new variables substituted, never rewritten.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax


class UnsupportedForm(ValueError):
    """A function these helpers cannot read or rebuild soundly: the pass leaves it as it is."""


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
class Block:
    """One binding block of ``main``: its bindings in order; ``dataflow`` for a dataflow block."""

    dataflow: bool
    bindings: list  # [(var, value)]


@dataclass
class Graph:
    """The bindings of ``main`` in order, with producers and use counts.

    ``bindings`` lists every top-level binding of every block in program order; ``blocks``
    keeps them by block.  ``casts`` maps a ``match_cast`` binding's var to its type (its value
    is the var it casts)."""

    params: list
    bindings: list  # [(var, value)]
    output: object
    producer: dict = field(default_factory=dict)  # var -> value
    uses: dict = field(default_factory=dict)  # var -> number of uses
    blocks: list[Block] = field(default_factory=list)
    casts: dict = field(default_factory=dict)  # var -> the type a match_cast binding casts to

    @classmethod
    def from_main(cls, func) -> Graph:
        """The graph of ``func`` (a Relax function whose body is a sequence of blocks);
        :class:`UnsupportedForm` for anything else."""
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            raise UnsupportedForm(f"expected a Relax function with a block body, got {type(func).__name__}")
        body = func.body
        graph = cls(list(func.params), [], body.body)
        for block in body.blocks:
            bindings = []
            for binding in block.bindings:
                bindings.append((binding.var, binding.value))
                if isinstance(binding, relax.MatchCast):
                    graph.casts[binding.var] = binding.ty
            graph.blocks.append(Block(isinstance(block, relax.DataflowBlock), bindings))
            graph.bindings.extend(bindings)
        handed_on = set(graph.handed_on())
        for var, value in graph.bindings:
            if var not in handed_on:
                graph.producer[var] = value
            for arg in _var_args(value):
                graph.uses[arg] = graph.uses.get(arg, 0) + 1
        for arg in list(_var_args(body.body)) + list(handed_on):
            graph.uses[arg] = graph.uses.get(arg, 0) + 1
        return graph

    @property
    def return_block(self) -> int | None:
        """The index of the block the function's result is built in: the last block when it
        is a dataflow block (the result is emitted as its output), else None."""
        return len(self.blocks) - 1 if self.blocks and self.blocks[-1].dataflow else None

    def handed_on(self) -> list:
        """The outputs of the dataflow blocks other than the return block: values later
        blocks read, whose producers rewrites must not see."""
        return [var for i, block in enumerate(self.blocks) if block.dataflow and i != self.return_block
                for var, _ in block.bindings if not isinstance(var, relax.DataflowVar)]

    def single_use(self, var) -> bool:
        return self.uses.get(var, 0) == 1

    def call_of(self, expr, name: str):
        """The producing call of ``expr`` if it is a call to operator ``name``."""
        value = self.producer.get(expr) if isinstance(expr, relax.Var) else None
        return value if value is not None and op_name(value) == name else None


def _var_args(expr) -> list:
    """The variables ``expr`` reads: its arguments (with repeats) for a var, tuple, tuple item
    or call; the free variables of anything else (an ``If``, a function)."""
    out = []
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        for f in expr.fields:
            out.extend(_var_args(f))
    elif isinstance(expr, relax.TupleGetItem):
        out.extend(_var_args(expr.tuple_value))
    elif isinstance(expr, relax.Call):
        if isinstance(expr.op, relax.Var):  # a closure call
            out.append(expr.op)
        for a in expr.args:
            out.extend(_var_args(a))
    elif isinstance(expr, relax.Expr) and not isinstance(expr, (tvm.ir.expr.Constant, relax.GlobalVar, tvm.ir.Op)):
        out.extend(relax.analysis.free_vars(expr))
    return out


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    """Replaces the free variables of an expression (an ``If``'s branches, a function) by
    their new values."""

    def __init__(self, emitter: Emitter) -> None:
        super().__init__()
        self.emitter = emitter

    def visit_var_(self, var):
        return self.emitter.subst(var) if var in self.emitter.vmap else super().visit_var_(var)

    def visit_dataflow_var_(self, var):
        return self.emitter.subst(var) if var in self.emitter.vmap else super().visit_dataflow_var_(var)


class Emitter:
    """Re-emits bindings into a BlockBuilder, mapping old vars to new ones."""

    def __init__(self, bb: relax.BlockBuilder, check_blocks: bool = False) -> None:
        self.bb = bb
        self.vmap: dict = {}
        # With ``check_blocks`` (a function of several blocks): the dataflow vars emitted in
        # the current block, so that no binding reads another block's locals.
        self._block_locals: set | None = set() if check_blocks else None
        self._dataflow = True
        self._exports: dict = {}  # a dataflow var -> the output of its block that later blocks read

    def begin_block(self, dataflow: bool) -> None:
        """A new block starts: the previous block's dataflow vars are out of reach."""
        self._dataflow = dataflow
        if self._block_locals is not None:
            self._block_locals = set()

    def _defined(self, var) -> None:
        if self._block_locals is not None and isinstance(var, relax.DataflowVar):
            self._block_locals.add(var)

    def subst(self, expr):
        if isinstance(expr, relax.Var):
            new = self.vmap.get(expr, expr)
            if self._block_locals is not None and isinstance(new, relax.DataflowVar) and new not in self._block_locals:
                return self._exports.get(new, new)  # read from a later block: through its output
            return new
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.subst(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self.subst(expr.tuple_value), expr.index)
        if isinstance(expr, relax.Call):
            op = self.subst(expr.op) if isinstance(expr.op, relax.Var) else expr.op
            return relax.Call(op, [self.subst(a) for a in expr.args], expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Expr) and any(v in self.vmap for v in _var_args(expr)):
            return _Substitute(self).visit_expr(expr)
        return expr

    def emit(self, expr, name: str = ""):
        self.check_visible(expr)
        var = self.bb.emit(expr, name_hint=name)
        self._defined(var)
        return var

    def emit_shared(self, expr, name: str = ""):
        """Bind ``expr`` as :meth:`emit` does, where later blocks can read it too (a value
        mapped in ``vmap`` for all uses, such as a model input's quantize/dequantize): in a
        function of several blocks, also as an output of the current dataflow block, which
        :meth:`subst` gives later blocks."""
        var = self.emit(expr, name)
        if self._block_locals is not None and self._dataflow:
            self.export(var, name)
        return var

    def export(self, var, name: str = ""):
        """``var`` (a dataflow var of the current block) bound as an output of the block
        too, for later blocks; returns the output."""
        self.check_visible(var)
        out = self.bb.emit_output(var, name_hint=name)
        self._exports[var] = out
        return out

    def check_visible(self, expr) -> None:
        """:class:`UnsupportedForm` if ``expr`` reads a dataflow var of another block (a
        rewrite that reached through a block boundary; see the module docstring)."""
        if self._block_locals is None:
            return
        for var in _var_args(expr):
            if isinstance(var, relax.DataflowVar) and var not in self._block_locals:
                raise UnsupportedForm(f"a rewrite reads {var.name} outside the dataflow block that defines it")


# A rewrite gets (emitter, old var, old value) and returns the new var/expr to bind to
# the old var (a constant replaces the var at its uses), or None to re-emit the binding.
Rewrite = Callable[[Emitter, object, object], object]


def rebuild(func, rewrite: Rewrite, extra_outputs: Sequence | None = None):
    """A new ``main`` with each binding passed through ``rewrite``.

    ``extra_outputs`` (vars of ``func``): their new values are returned too, the function
    then returning ``(original outputs..., extra...)`` flattened into one tuple.
    :class:`UnsupportedForm` if ``func`` is not a function of blocks, or a rewrite reaches
    into another dataflow block.
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


def rewrite_module(mod: tvm.IRModule, rewrite: Rewrite) -> tvm.IRModule:
    """:func:`rebuild_module`, but ``mod`` itself where ``rewrite`` replaced no binding: a pass
    that finds nothing to do leaves the module (and its variable names, which error messages
    quote) as it was."""
    replaced = False

    def tracked(em: Emitter, var, value):
        nonlocal replaced
        new = rewrite(em, var, value)
        replaced = replaced or new is not None
        return new

    new = rebuild_module(mod, tracked)
    return new if replaced else mod


def rewrite_calls(mod: tvm.IRModule, rewrites: dict[str, Rewrite]) -> tvm.IRModule:
    """``mod`` with each call in ``main`` to an operator named in ``rewrites`` passed through its
    rewrite (None: kept); ``mod`` itself where ``main`` calls none of them, nothing was replaced,
    or the function is not in a form :func:`rebuild_module` takes."""
    if "main" not in mod or not any(op_name(b.value) in rewrites for block in getattr(mod["main"].body, "blocks", ())
                                    for b in block.bindings):
        return mod

    def rewrite(em: Emitter, var, value):
        convert = rewrites.get(op_name(value))
        return convert(em, var, value) if convert else None

    try:
        return rewrite_module(mod, rewrite)
    except UnsupportedForm:
        return mod


def _rebuild(func, rewrite: Rewrite, extra_outputs: Sequence | None) -> tvm.IRModule:
    graph = Graph.from_main(func)
    bb = relax.BlockBuilder()
    em = Emitter(bb, check_blocks=len(graph.blocks) > 1)
    extras = list(extra_outputs) if extra_outputs is not None else None
    # values the result reads: a block other than the return block hands them on as outputs
    wanted = set(graph.handed_on()) | set(extras or ())
    attrs = dict(func.attrs.items()) if func.attrs is not None else {}
    result = None
    with bb.function("main", graph.params, attrs=attrs or None, pure=bool(func.is_pure)):
        for index, block in enumerate(graph.blocks):
            em.begin_block(block.dataflow)
            if index == graph.return_block:
                with bb.dataflow():
                    result = _emit_return_block(em, graph, block, rewrite, extras)
            elif block.dataflow:
                with bb.dataflow():
                    for var, value in block.bindings:
                        em.vmap[var] = _emit_binding(em, graph, rewrite, var, value, output=var in wanted)
            else:
                for var, value in block.bindings:
                    em.vmap[var] = _emit_binding(em, graph, rewrite, var, value)
        if result is None:  # the result is read outside any dataflow block
            out = em.subst(graph.output)
            if extras is not None:
                fields = list(out.fields) if isinstance(out, relax.Tuple) else [out]
                out = relax.Tuple(fields + [em.subst(v) for v in extras])
            em.check_visible(out)
            result = out
        bb.emit_func_output(result)
    return bb.get()


def _emit_binding(em: Emitter, graph: Graph, rewrite: Rewrite, var, value, output: bool = False):
    """The new var (or constant) for one binding, passed through ``rewrite`` (``match_cast``
    bindings are re-emitted as they are); with ``output``, bound as an output of the current
    dataflow block (a value later blocks read)."""
    if var in graph.casts:
        em.check_visible(em.subst(value))
        new = em.bb.match_cast(em.subst(value), graph.casts[var], name_hint=var.name)
        em._defined(new)
        return em.bb.emit_output(new, name_hint=var.name) if output else new
    new = rewrite(em, var, value)
    if new is None:  # re-emitted as it was
        new = em.subst(value)
        if output:
            em.check_visible(new)
            return em.bb.emit_output(new, name_hint=var.name)
        return em.emit(new, var.name)
    if isinstance(new, relax.Var) or const_value(new) is not None:
        em.check_visible(new)  # a var or a constant replaces the old var at its uses
    else:
        new = em.emit(new, var.name)
    if output and isinstance(new, relax.DataflowVar):
        em.export(new, var.name)  # this block keeps reading the dataflow var: its producer stays visible
    return new


def _emit_return_block(em: Emitter, graph: Graph, block: Block, rewrite: Rewrite, extras: list | None):
    """Re-emit the dataflow block the function returns from; returns the result var."""
    output_var = graph.output
    bound_here = any(v.same_as(output_var) for v, _ in block.bindings) and output_var not in graph.casts
    for var, value in block.bindings:
        if bound_here and var.same_as(output_var):
            continue
        em.vmap[var] = _emit_binding(em, graph, rewrite, var, value)
    # The output's binding goes through ``rewrite`` too (a rewrite may target the last
    # op), but is returned rather than bound here: emit_output binds it.
    value = graph.producer.get(output_var) if bound_here else None
    new = rewrite(em, output_var, value) if isinstance(value, relax.Call) else None
    out = new if new is not None else em.subst(value if value is not None else output_var)
    if extras is not None:
        if isinstance(out, relax.Call):  # the last op may be observed: bind it so extras can name it
            out = em.emit(out, output_var.name)
            em.vmap[output_var] = out
        fields = list(out.fields) if isinstance(out, relax.Tuple) else [out]
        out = relax.Tuple(fields + [em.subst(v) for v in extras])
    em.check_visible(out)
    # the user's name for the result, where it is one variable (error messages quote it)
    named = extras is None and isinstance(output_var, relax.Var)
    return em.bb.emit_output(out, name_hint=output_var.name if named else "")


def with_main(mod: tvm.IRModule, main) -> tvm.IRModule:
    new = tvm.IRModule({"main": main}, attrs=mod.attrs)
    for gv, fn in mod.functions.items():
        if gv.name_hint != "main":
            new[gv] = fn
    return new


def output_vars(expr) -> list:
    """The variables a function's output names (through nested tuples)."""
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        return [v for f in expr.fields for v in output_vars(f)]
    return []


@contextlib.contextmanager
def readable(model_name: str) -> Iterator[None]:
    """A model whose ``main`` the quantization passes cannot read or rebuild
    (:class:`UnsupportedForm`) is a ConfigError naming it."""
    from qcompile.errors import ConfigError

    try:
        yield
    except UnsupportedForm as exc:
        raise ConfigError(f"model {model_name} cannot be quantized: {exc}; build it in float32") from exc
