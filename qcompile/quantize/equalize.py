"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", sections 4.1 and 4.1.2).

Works on the float module after the ``inference`` phase (batch norm folded into the
convs), before calibration.  A *pair* is two convs in a row, the first one's output read
only by the second, through an optional per-channel bias add and a ReLU or nothing::

    y = conv2(act(conv1(x, W1) + b1), W2)

For a ReLU (or no activation), ``act(z / s) = act(z) / s`` for every positive ``s``, so
dividing output channel ``i`` of ``W1`` and ``b1`` by ``s_i`` and multiplying input channel
``i`` of ``W2`` by ``s_i`` computes the same function.  Equalization picks
``s_i = sqrt(r1_i * r2_i) / r2_i`` (``r1_i``: the largest ``|W1|`` of output channel ``i``;
``r2_i``: the largest ``|W2|`` reading input channel ``i``), which gives both the same range
``sqrt(r1_i * r2_i)``: a channel whose weights are tiny next to its neighbours' (what
batch-norm folding leaves in depthwise convs) stops losing its values to one per-tensor
weight scale.  Chains (conv -> depthwise -> pointwise -> ...) are swept until the scales
settle.  The second conv is a plain conv (groups 1) or a depthwise one (one group per
channel); a pair joined by ReLU6 (``clip(z, 0, 6)``) is skipped and reported: rescaling
would move the clip point per channel, which one ``clip`` cannot express.

High-bias absorption (:func:`absorb_high_bias`) then moves the part of an equalized
channel's bias that the ReLU always passes into the next layer's bias: with ``c_i`` at most
the smallest pre-activation value, ``relu(z - c) = relu(z) - c`` and ``conv2(relu(z) - c) +
conv2(c)`` is the same output with a smaller activation range.  Nagel et al. take ``c =
max(0, beta - 3 gamma)`` from the batch-norm statistics, which folding has consumed; here
``c_i = max(0, min(observed minimum, mean - 3 std))`` of the pre-activation on the
calibration samples, so absorption is exact on them.  It is applied only where the second
conv has no padding (1x1 pointwise convs), where ``conv2(c)`` is the same constant at every
output position.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Graph,
    const_value,
    op_name,
    output_vars,
    rebuild,
    with_main,
)
from qcompile.quantize.probe import probe
from qcompile.quantize.ptq import named_anchors

SWEEPS = 50  # sweeps over a chain of pairs at most
TOLERANCE = 1e-8  # a sweep whose scales all lie within 1 +- TOLERANCE ends equalization


@dataclass
class _Conv:
    """A conv2d with a constant OIHW weight, and its per-channel bias add (if any)."""

    name: str  # conv2d_N, as PTQ names the layer
    var: object
    weight: np.ndarray  # float64 while equalizing
    groups: int
    padded: bool
    bias_var: object | None = None
    bias: np.ndarray | None = None  # float64, as shaped in the model


@dataclass
class _Pair:
    first: _Conv
    second: _Conv
    activation: str  # "relu" or "identity"
    preact: object  # the var the activation reads (first's bias add, or the conv itself)

    @property
    def name(self) -> str:
        return f"{self.first.name} -> {self.second.name}"


@dataclass(frozen=True)
class Equalized:
    """The equalized module, the pairs rescaled and the pairs skipped (with the reason)."""

    mod: tvm.IRModule
    pairs: tuple[str, ...]
    skipped: tuple[str, ...]


def equalize(mod: tvm.IRModule) -> Equalized:
    """``mod`` with every conv pair of ``main`` joined by ReLU or nothing equalized."""
    pairs, skipped = _find_pairs(mod["main"])
    if not pairs:
        return Equalized(mod, (), tuple(skipped))
    for _ in range(SWEEPS):
        settled = True
        for pair in pairs:
            r1 = _output_ranges(pair.first.weight)
            r2 = _input_ranges(pair.second)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            if np.all(np.abs(s - 1.0) <= TOLERANCE):
                continue
            settled = False
            pair.first.weight = pair.first.weight / s[:, None, None, None]
            if pair.first.bias is not None:
                pair.first.bias = pair.first.bias / s.reshape(pair.first.bias.shape)
            pair.second.weight = pair.second.weight * _along_inputs(pair.second, s)
        if settled:
            break
    touched = {c.var: c for p in pairs for c in (p.first, p.second)}
    return Equalized(_with_params(mod, touched), tuple(p.name for p in pairs), tuple(skipped))


def absorb_high_bias(mod: tvm.IRModule, batches: Iterable[dict[str, np.ndarray]],
                     target: tvm.target.Target, pairs: Iterable[str] | None = None) -> tuple[tvm.IRModule, tuple[str, ...]]:
    """``mod`` with each ReLU pair's always-passed bias moved into the next conv's bias (see
    the module docstring), measured on ``batches`` run on ``target`` (this machine); only the
    pairs named in ``pairs`` (default: all).  Returns the module and the pairs changed."""
    found, _ = _find_pairs(mod["main"])
    wanted = set(pairs) if pairs is not None else None
    candidates = [p for p in found if p.activation == "relu" and p.first.bias is not None
                  and p.second.bias is not None and not p.second.padded and (wanted is None or p.name in wanted)]
    outputs = set(output_vars(mod["main"].body.body))
    candidates = [p for p in candidates if p.preact not in outputs]
    if not candidates:
        return mod, ()
    n = [0] * len(candidates)
    lo = [None] * len(candidates)
    total = [0.0] * len(candidates)
    total_sq = [0.0] * len(candidates)
    for values in probe(mod, [p.preact for p in candidates], batches, target):
        for k, z in enumerate(values):
            z = np.moveaxis(z.astype(np.float64), 1, 0).reshape(z.shape[1], -1)
            lo[k] = z.min(axis=1) if lo[k] is None else np.minimum(lo[k], z.min(axis=1))
            total[k] = total[k] + z.sum(axis=1)
            total_sq[k] = total_sq[k] + (z * z).sum(axis=1)
            n[k] += z.shape[1]
    changed = []
    for k, pair in enumerate(candidates):
        if not n[k]:
            continue
        mean = total[k] / n[k]
        std = np.sqrt(np.maximum(total_sq[k] / n[k] - mean * mean, 0.0))
        c = np.maximum(0.0, np.minimum(lo[k], mean - 3.0 * std))
        if not np.any(c > 0):
            continue
        pair.first.bias = pair.first.bias - c.reshape(pair.first.bias.shape)
        # conv2(c): without padding, every output position sums the whole kernel over c
        second = pair.second
        taps = second.weight.sum(axis=(2, 3))  # (O, I/groups)
        per_group = second.weight.shape[0] // second.groups
        cg = c.reshape(second.groups, -1)  # (groups, I/groups)
        shift = np.einsum("goi,gi->go", taps.reshape(second.groups, per_group, -1), cg).reshape(-1)
        second.bias = second.bias + shift.reshape(second.bias.shape)
        changed.append(pair)
    if not changed:
        return mod, ()
    touched = {c.var: c for p in changed for c in (p.first, p.second)}
    return _with_params(mod, touched), tuple(p.name for p in changed)


def _find_pairs(func) -> tuple[list[_Pair], list[str]]:
    """The conv pairs of ``func`` to equalize, and the pairs skipped (with why)."""
    graph = Graph.from_main(func)
    users: dict = {}
    for var, value in graph.bindings:
        for arg in getattr(value, "args", []):
            if isinstance(arg, relax.Var):
                users.setdefault(arg, []).append(var)
    convs: dict = {}
    for name, kind, weight, var, value in named_anchors(graph):
        if kind != "conv2d":
            continue
        conv = _Conv(name, var, weight.astype(np.float64), int(value.attrs.groups),
                     any(int(p) for p in value.attrs.padding))
        bias = _bias_add(graph, users, var, weight.shape[0])
        if bias is not None:
            conv.bias_var, conv.bias = bias[0], bias[1].astype(np.float64)
        convs[var] = conv

    def only_reader(var):
        readers = users.get(var, [])
        return readers[0] if graph.single_use(var) and len(readers) == 1 else None

    pairs, skipped = [], []
    for conv in convs.values():
        preact = conv.bias_var if conv.bias_var is not None else conv.var
        nxt, activation = only_reader(preact), "identity"
        value = graph.producer.get(nxt) if nxt is not None else None
        if op_name(value) == "relax.nn.relu":
            activation, nxt = "relu", only_reader(nxt)
        elif op_name(value) == "relax.clip":
            second = convs.get(only_reader(nxt)) if only_reader(nxt) is not None else None
            if second is not None:
                skipped.append(f"{conv.name} -> {second.name} (clip/ReLU6 between them: equalizing would move "
                               "the clip point per channel)")
            continue
        second = convs.get(nxt)  # (its data input: the weight is a constant)
        if second is None:
            continue
        channels = conv.weight.shape[0]
        plain = second.groups == 1 and second.weight.shape[1] == channels
        if plain or (second.groups == channels and second.weight.shape[1] == 1):  # or depthwise
            pairs.append(_Pair(conv, second, activation, preact))
        else:
            skipped.append(f"{conv.name} -> {second.name} (grouped conv with {second.groups} groups)")
    return pairs, skipped


def _bias_add(graph: Graph, users: dict, var, channels: int):
    """(add var, bias constant) of a per-channel constant bias add reading only ``var``."""
    readers = users.get(var, [])
    if not graph.single_use(var) or len(readers) != 1 or op_name(graph.producer.get(readers[0])) != "relax.add":
        return None
    add = graph.producer[readers[0]]
    other = add.args[1] if add.args[0].same_as(var) else add.args[0]
    bias = const_value(other)
    # (1, C, 1, 1): a (C,) constant would broadcast along the width axis, not the channels
    if bias is None or bias.dtype != np.float32 or bias.shape != (1, channels, 1, 1):
        return None
    return readers[0], bias


def _output_ranges(weight: np.ndarray) -> np.ndarray:
    return np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)


def _input_ranges(conv: _Conv) -> np.ndarray:
    """The largest ``|W|`` reading each input channel (a depthwise conv's channel ``i`` is
    read by its output channels ``i*m .. i*m + m - 1``)."""
    w = np.abs(conv.weight)
    if conv.groups == 1:
        return w.max(axis=(0, 2, 3))
    return w.reshape(conv.groups, -1).max(axis=1)


def _along_inputs(conv: _Conv, s: np.ndarray) -> np.ndarray:
    """``s`` shaped to multiply ``conv``'s weight along its input channels."""
    if conv.groups == 1:
        return s[None, :, None, None]
    return np.repeat(s, conv.weight.shape[0] // conv.groups)[:, None, None, None]


def _with_params(mod: tvm.IRModule, convs: dict) -> tvm.IRModule:
    """``mod`` with the weights and biases of ``convs`` (by conv var) replaced."""
    biases = {c.bias_var: c for c in convs.values() if c.bias_var is not None}

    def rewrite(em, var, value):
        conv = convs.get(var)
        if conv is not None:
            weight = relax.const(conv.weight.astype(np.float32))
            return relax.Call(value.op, [em.subst(value.args[0]), weight], value.attrs, value.ty_args)
        conv = biases.get(var)
        if conv is not None:
            const_arg = 1 if const_value(value.args[1]) is not None else 0
            args = [em.subst(a) for a in value.args]
            args[const_arg] = relax.const(conv.bias.astype(np.float32))
            return relax.Call(value.op, args, value.attrs, value.ty_args)
        return None

    return with_main(mod, rebuild(mod["main"], rewrite))

