"""FoldChannelAffine: fold per-channel affine chains after conv2d into its weight and bias.

TVM's FoldBatchnormToConv2D only matches ``conv2d -> batch_norm``; a conv with its own
bias before the batch norm (and other exporters' graphs) decomposes into
``conv2d -> add -> subtract -> divide -> multiply -> add`` with per-channel constants.
This pass rewrites such a single-use chain into ``conv2d(x, W * scale) + shift``: one op
fewer per element at inference, and one quantizable layer instead of a float tail.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Emitter,
    Graph,
    UnsupportedForm,
    const_value,
    op_name,
    rebuild,
    with_main,
)

_AFFINE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide"}


def _per_channel(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """The constant as a (channels,) vector if it broadcasts along NCHW's channel axis."""
    if value is None:
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]), np.float64)
    shape = value.shape
    if value.size == channels and (shape == (channels, 1, 1) or shape == (1, channels, 1, 1)):
        return value.reshape(-1).astype(np.float64)
    return None


def _chain(graph: Graph, var, channels: int):
    """Follow single-use affine ops from ``var``: (vars in chain, scale, shift)."""
    scale, shift = np.ones(channels), np.zeros(channels)
    chain = []
    users: dict = {}
    for v, val in graph.bindings:
        for a in getattr(val, "args", []):
            if isinstance(a, relax.Var):
                users.setdefault(a, []).append((v, val))
    while graph.single_use(var) and len(users.get(var, [])) == 1:
        nxt, call = users[var][0]
        name = op_name(call)
        if name not in _AFFINE or len(call.args) != 2:
            break
        first = call.args[0].same_as(var)
        c = _per_channel(const_value(call.args[1] if first else call.args[0]), channels)
        if c is None or (name in ("relax.subtract", "relax.divide") and not first):
            break
        if name == "relax.add":
            shift = shift + c
        elif name == "relax.subtract":
            shift = shift - c
        elif name == "relax.multiply":
            scale, shift = scale * c, shift * c
        else:
            scale, shift = scale / c, shift / c
        chain.append(nxt)
        var = nxt
    return chain, scale, shift


@tvm.transform.module_pass(opt_level=0, name="FoldChannelAffine")
def FoldChannelAffine(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    func = mod["main"]
    try:
        graph = Graph.from_main(func)
    except UnsupportedForm:  # not a function of binding blocks: nothing to fold
        return mod
    plans = {}
    for var, value in graph.bindings:
        if op_name(value) != "relax.nn.conv2d" or str(value.attrs.kernel_layout) != "OIHW":
            continue
        if str(value.attrs.data_layout) != "NCHW":
            continue
        weight = const_value(value.args[1])
        if weight is None or weight.dtype != np.float32:
            continue
        chain, scale, shift = _chain(graph, var, weight.shape[0])
        has_scale = not np.allclose(scale, 1.0)
        if len(chain) >= 2 or (chain and has_scale):
            plans[var] = (chain, weight, scale, shift)
    if not plans:
        return mod
    chain_end = {plan[0][-1]: (conv, plan) for conv, plan in plans.items()}
    chain_inner = {v: conv for conv, plan in plans.items() for v in plan[0][:-1]}

    def rewrite(em: Emitter, var, value):
        if var in plans:
            _, weight, scale, _ = plans[var]
            folded = (weight * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
            return em.emit(relax.Call(value.op, [em.subst(value.args[0]), relax.const(folded)], value.attrs,
                                      value.ty_args), var.name)
        if var in chain_inner:  # only used inside the chain, which is replaced as a whole
            return em.vmap[chain_inner[var]]
        if var in chain_end:
            conv, (_, weight, _, shift) = chain_end[var]
            bias = relax.const(shift.astype(np.float32).reshape(1, -1, 1, 1))
            return em.emit(relax.op.add(em.vmap[conv], bias), var.name)
        return None

    try:
        return with_main(mod, rebuild(func, rewrite))
    except UnsupportedForm:  # a chain through a block boundary (see bindings): left unfolded
        return mod
