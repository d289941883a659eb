"""Relax passes that take bytes (and work) out of the built library without changing a result.

* :func:`CancelTransposePairs` (kernels phase, after the NHWC conversion): ConvertLayout
  has no layout rule for ``quantize``/``dequantize``, so it wraps each one that sits between
  NHWC ops in ``permute_dims`` to NCHW and back (a float transpose, the quantize, a uint8
  transpose: one fused kernel per int8 layer input, mobilenet_v3_small has 26).  An
  elementwise op commutes with a transpose, so
  ``permute_dims(quantize(permute_dims(x, p), axis=a), q)`` is ``quantize(x, axis=p[a])``
  when ``q`` undoes ``p`` (else one transpose of the result).
* :func:`FoldScalarArguments` (after scheduling, before the VM lowering): a kernel argument
  that every call passes as the same one-element constant (a requantize's zero point and
  clip bounds, a quantize's scale) becomes an immediate in the kernel.  Each tensor argument
  costs its kernel's entry function ~800 bytes of argument checks (ndim, dtype, shape,
  strides, device, each with its own error message) and the VM one constant load per call;
  realize's integer layers take 3-5 of them each, float layers none.  A value that differs
  between the calls of a shared kernel (two layers with one shape) stays an argument, so no
  kernel is duplicated.
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

from qcompile.passes.bindings import Graph, const_value, op_name, rebuild_module

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


# -- scalar kernel arguments -----------------------------------------------------------------------

def _scalar(expr) -> np.ndarray | None:
    """The value of a one-element constant tensor, else None."""
    value = const_value(expr)
    return value if value is not None and value.size == 1 else None


def _immediate(value: np.ndarray, dtype: str) -> tirx.Expr:
    item = value.reshape(()).item()
    return tirx.const(bool(item) if dtype == "bool" else item, dtype)


def bind_scalar_params(func: tirx.PrimFunc, values: dict[int, np.ndarray]) -> tirx.PrimFunc:
    """``func`` without the parameters at the indices of ``values``, each of its reads of
    them replaced by the value (``values``: parameter index -> one-element array)."""
    bound = {func.params[i]: _immediate(value, str(func.params[i].dtype)) for i, value in values.items()}

    def is_bound(buffer) -> bool:
        return any(buffer.same_as(p) for p in bound)

    def load(node):
        for param, value in bound.items():
            if node.source.same_as(param):
                return value
        return node

    def block(node):
        reads = [r for r in node.reads if not is_bound(r.source)]
        if len(reads) == len(node.reads):
            return node
        return s_tir.SBlock(node.iter_vars, reads, node.writes, node.name_hint, node.body, node.init,
                            node.alloc_buffers, node.match_buffers, node.annotations)

    body = tvm_ffi.structural_map(func.body, [(tvm.ir.expr.TensorLoad, load), (s_tir.SBlock, block)])
    params = [p for i, p in enumerate(func.params) if i not in values]
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs)


def _uses_only_loads(func: tirx.PrimFunc, param) -> bool:
    """Whether ``param`` appears in ``func`` only as loads and block read regions (not as
    a pointer handed to an intrinsic or external call, which needs the tensor)."""
    other = []

    def visit(node):
        if isinstance(node, s_tir.stmt.MatchBufferRegion) and node.source.source.same_as(param):
            other.append(node)  # a view of it (a tensor intrinsic's operand)
            return tvm_ffi.structural.WalkResult.SKIP
        if isinstance(node, (tvm.ir.expr.TensorLoad, tvm.ir.expr.TensorRegion)) and node.source.same_as(param):
            return tvm_ffi.structural.WalkResult.SKIP  # its indices read no tensor
        if isinstance(node, tvm.ir.expr.Var) and node.same_as(param):
            other.append(node)
        return None

    tvm_ffi.structural_walk(func.body, visit, order="pre")
    return not other


def fold_scalar_arguments(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each kernel argument that all of the kernel's ``call_tir`` calls pass as
    the same one-element constant made an immediate of the kernel (see the module docstring)."""
    main = mod["main"]
    calls: dict = {}  # GlobalVar -> [call]
    other_uses: set = set()

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and op_name(expr) == "relax.call_tir":
            calls.setdefault(expr.args[0], []).append(expr)
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                if isinstance(arg, relax.GlobalVar):
                    other_uses.add(arg)

    relax.analysis.post_order_visit(main, visit)
    folds: dict = {}  # GlobalVar -> {param index: value}
    for gvar, sites in calls.items():
        func = mod[gvar]
        if gvar in other_uses or not isinstance(func, tirx.PrimFunc) or any(
                not isinstance(c.args[1], relax.Tuple) for c in sites):
            continue
        values = {}
        for index, arg in enumerate(sites[0].args[1].fields):
            first = _scalar(arg)
            if first is None or str(first.dtype) != str(func.params[index].dtype):
                continue
            if all((v := _scalar(c.args[1].fields[index])) is not None and v.dtype == first.dtype
                   and np.array_equal(v, first, equal_nan=True) for c in sites[1:]) \
                    and _uses_only_loads(func, func.params[index]):
                values[index] = first
        if values:
            folds[gvar] = values
    if not folds:
        return mod

    # the new kernels keep their names: the old ones leave the module first (a GlobalVar
    # carries its function's signature, so the calls move to new GlobalVars)
    rest = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in folds}, attrs=mod.attrs)

    @relax.expr_functor.mutator
    class DropArgs(relax.PyExprMutator):
        """Calls of the folded kernels, without the folded arguments, to the new kernels."""

        def __init__(self) -> None:
            super().__init__(rest)
            self.renamed = {gvar: self.builder_.add_func(bind_scalar_params(mod[gvar], values), gvar.name_hint)
                            for gvar, values in folds.items()}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if op_name(call) != "relax.call_tir" or call.args[0] not in folds:
                return call
            keep = [a for i, a in enumerate(call.args[1].fields) if i not in folds[call.args[0]]]
            return relax.Call(call.op, [self.renamed[call.args[0]], relax.Tuple(keep), *call.args[2:]],
                              call.attrs, call.ty_args)

    mutator = DropArgs()
    mutator.builder_.update_func(rest.get_global_var("main"), mutator.visit_expr(main))
    return mutator.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="qcompile.FoldScalarArguments")
def FoldScalarArguments(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """:func:`fold_scalar_arguments` on ``main``'s kernels."""
    if "main" not in [gv.name_hint for gv in mod.functions]:
        return mod
    return fold_scalar_arguments(mod)
