"""Empirical bias correction (Nagel et al. 2019, section 4.2): remove the mean shift that
quantizing a layer's weights adds to its outputs.

With ``W_q`` the int8 weight as PTQ will write it (same granularity and range), a layer's
output moves by ``conv(x, W_q - W)``, whose per-channel mean over the calibration samples
is generally not zero: per-tensor weights round a small channel's values to a few levels,
all in one direction.  Convolution is linear in the weight, so that mean is exactly
``sum over (input channel, tap) of (W_q - W) * E[x at that tap]`` -- the window means of the
layer's float input (padding included), measured on the calibration samples; for a linear
layer ``E[x] @ (W_q - W)``.  The shift is subtracted from the layer's bias (a bias add is
inserted where the layer has none).  Each layer is measured on its float input, so the
corrections do not compound.  Covers conv2d (NCHW, any groups) and matmul layers with a
constant weight; other layers are left as they are.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Graph,
    const_value,
    output_vars,
    rebuild,
    shape_of,
    with_main,
)
from qcompile.quantize.config import Int8Config
from qcompile.quantize.op_tables import CONV_LAYOUTS
from qcompile.quantize.probe import probe
from qcompile.quantize.ptq import Region, annotate, weight_qparams


def correct_bias(mod: tvm.IRModule, batches: Iterable[dict[str, np.ndarray]], config: Int8Config,
                 target: tvm.target.Target) -> tuple[tvm.IRModule, tuple[str, ...]]:
    """``mod`` with the bias of each layer PTQ quantizes (under ``config``) corrected for
    its weights' quantization error, measured on ``batches`` run on ``target`` (this
    machine).  Returns the module and the layers corrected."""
    func = mod["main"]
    plan = annotate(func, config)
    outputs = set(output_vars(func.body.body))
    layers = [r for r in plan.regions if r.weight is not None and r.kind in ("conv2d", "matmul")
              and r.data not in outputs and _plain(r)]
    if not layers:
        return mod, ()
    inputs = list(dict.fromkeys(r.data for r in layers))
    producer = Graph.from_main(func).producer
    means = [_InputMeans(r, producer[r.anchor].attrs) for r in layers]
    for values in probe(mod, inputs, batches, target):
        by_var = dict(zip(inputs, values))
        for m, r in zip(means, layers):
            m.update(by_var[r.data])
    shifts = {}
    for m, r in zip(means, layers):
        if not m.count:
            continue
        axis = CONV_LAYOUTS[r.kind][2] if r.kind == "conv2d" else 1
        q, scale = weight_qparams(r.weight, axis, config.per_channel, config.weight_qmax)
        shape = [1] * r.weight.ndim
        shape[axis] = -1
        delta = q.astype(np.float64) * scale.reshape(shape) - r.weight.astype(np.float64)
        shifts[r.anchor] = (r, m.shift(delta))
    return _with_biases(mod, shifts), tuple(r.name for r, _ in shifts.values())


def _plain(region: Region) -> bool:
    """A layer whose input means this module can form: conv2d in NCHW/OIHW (annotate checked
    the layouts) or a matmul reading ``x[..., K]``."""
    return region.kind == "matmul" or region.weight.ndim == 4


class _InputMeans:
    """Running means of one layer's input: per (input channel, kernel tap) for a conv,
    per input feature for a matmul."""

    def __init__(self, region: Region, attrs) -> None:
        self.region = region
        self.attrs = attrs  # the conv's (strides, padding, dilation)
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        if self.region.kind == "matmul":
            flat = x.reshape(-1, x.shape[-1])
            total, n = flat.sum(axis=0), flat.shape[0]
        else:
            total, n = self._window_sums(x)
        self.sum = total if self.sum is None else self.sum + total
        self.count += n

    def _window_sums(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Sum over batch and output positions of the padded input each tap reads:
        (C, kh, kw), and the number of (sample, position) terms."""
        attrs = self.attrs
        kh, kw = self.region.weight.shape[2:]
        sh, sw = (int(v) for v in attrs.strides)
        dh, dw = (int(v) for v in attrs.dilation)
        top, left, bottom, right = (int(v) for v in attrs.padding)
        xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        out = np.empty((x.shape[1], kh, kw))
        for i in range(kh):
            for j in range(kw):
                window = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                out[:, i, j] = window.sum(axis=(0, 2, 3))
        return out, x.shape[0] * ho * wo

    def shift(self, delta: np.ndarray) -> np.ndarray:
        """The mean output shift, per output channel, of weight error ``delta``."""
        mean = self.sum / self.count
        if self.region.kind == "matmul":
            return mean @ delta
        out_channels, per_group_in = delta.shape[:2]
        groups = mean.shape[0] // per_group_in
        d = delta.reshape(groups, out_channels // groups, per_group_in, *delta.shape[2:])
        m = mean.reshape(groups, per_group_in, *mean.shape[1:])
        return np.einsum("goikl,gikl->go", d, m).reshape(out_channels)


def _with_biases(mod: tvm.IRModule, shifts: dict) -> tvm.IRModule:
    """``mod`` with ``shift`` subtracted from each layer's bias (by anchor var)."""
    by_bias = {r.bias_var: (r, s) for r, s in shifts.values() if r.bias_var is not None}

    def rewrite(em, var, value):
        if var in by_bias:
            region, shift = by_bias[var]
            const_arg = 1 if const_value(value.args[1]) is not None else 0
            old = const_value(value.args[const_arg])
            new = (old.astype(np.float64) - shift.reshape(old.shape)).astype(np.float32)
            args = [em.subst(a) for a in value.args]
            args[const_arg] = relax.const(new)
            return relax.Call(value.op, args, value.attrs, value.ty_args)
        entry = shifts.get(var)
        if entry is not None and entry[0].bias_var is None:
            region, shift = entry
            conv = em.emit(em.subst(value), var.name)
            rank = len(shape_of(var))
            shape = (-1,) if region.kind == "matmul" else (1, -1) + (1,) * (rank - 2)
            return relax.op.add(conv, relax.const((-shift).astype(np.float32).reshape(shape)))
        return None

    return with_main(mod, rebuild(mod["main"], rewrite))

