"""PackInt8Conv: run integer conv2d layers on the target's int8 dot-product instruction.

Where the target has one (:func:`qcompile.kernels.int8_dot.int8_dot_for`) and the model has
integer convs, the module is first converted to NHWC (TVM's ConvertLayout: elementwise ops,
pooling and the requantize chains follow, a transpose is left only at the ends), as ONNX
Runtime and TFLite run int8 convs: the kernel then reads 4 adjacent input channels per
instruction and writes whole channel vectors.

Then ``conv2d(x, W, out_dtype="int32")`` with ``x`` uint8/int8 (as the intrinsic takes),
``W`` a constant int8 weight, one group -- what :mod:`qcompile.quantize.realize` emits --
optionally behind the ``pad`` that realize inserts to pad with the input zero point, becomes
``call_tir`` of :mod:`qcompile.kernels.packed_conv2d` with the weight packed at compile
time.  Layers the intrinsic cannot compute exactly (AVX2 with 8-bit weights whose pairs
overflow int16) keep TVM's conv2d: slower, never wrong.  Depthwise int8 convs (groups =
channels) become :mod:`qcompile.kernels.depthwise_conv2d` calls, the same way.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..kernels import depthwise_conv2d, packed_conv2d
from ..kernels.int8_dot import Int8Dot, int8_dot_for
from .bindings import Graph, const_value, dtype_of, op_name, rebuild_module, shape_of


def pack_int8_conv(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, dict]:
    """The rewritten module and counts of conv layers: {"packed": n, "depthwise": n,
    "inexact": n} (inexact: one-group int8 convs left to TVM, see the module docstring)."""
    dot = int8_dot_for(target)
    counts = {"packed": 0, "depthwise": 0, "inexact": 0}
    if dot is None or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, counts
    weights = [_oihw_weight(v) for _, v in Graph.from_main(mod["main"]).bindings if _int8_conv(v, dot)]
    exact = [w is not None and dot.exact_for(packed_conv2d.pack_weight(w, dot.lanes)) for w in weights]
    if not any(exact):  # nothing to gain: leave the module (and its layout) alone
        counts["inexact"] = sum(w is not None for w in weights)
        return mod, counts
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
    mod = relax.transform.FoldConstant()(mod)  # the per-channel constants, transposed once
    graph = Graph.from_main(mod["main"])
    kernels: dict = {}  # (kind,) ConvShape -> GlobalVar: layers of one shape share one kernel

    def rewrite(em, var, value):
        if op_name(value) != "relax.nn.conv2d":
            return None
        depthwise = _match_depthwise(graph, value, dot)
        if depthwise is not None:
            data, zero_point, shape, weight = depthwise
            if ("depthwise", shape) not in kernels:
                func = depthwise_conv2d.depthwise_func(shape, dtype_of(data)).without_attr("global_symbol")
                kernels["depthwise", shape] = em.bb.add_func(func, "qc_depthwise_conv2d_int8")
            counts["depthwise"] += 1
            return _call(em, kernels["depthwise", shape], data, zero_point, weight, shape)
        match = _match(graph, value, dot)
        if match is None:
            return _hwio(em, value)
        data, zero_point, shape, weight = match
        packed = packed_conv2d.pack_weight(weight, dot.lanes, shape.folds_rows)
        if not dot.exact_for(packed):
            counts["inexact"] += 1
            return _hwio(em, value)
        if shape not in kernels:
            func = packed_conv2d.conv2d_func(shape, dot).without_attr("global_symbol")  # private, like legalized ops
            kernels[shape] = em.bb.add_func(func, "qc_conv2d_int8")
        counts["packed"] += 1
        return _call(em, kernels[shape], data, zero_point, packed, shape)

    return rebuild_module(mod, rewrite), counts


def _call(em, kernel: relax.GlobalVar, data, zero_point: int, weight: np.ndarray, shape: packed_conv2d.ConvShape):
    """``call_tir`` of one of qcompile's int8 conv kernels: (input, zero point, weight) -> int32 NHWC."""
    oh, ow = shape.out_hw
    zx = relax.const(np.array([zero_point], dtype_of(data)))
    return relax.call_tir(kernel, [em.subst(data), zx, relax.const(weight)],
                          relax.TensorType((shape.n, oh, ow, shape.oc), "int32"))


def _hwio(em, conv):
    """An NHWC conv left to TVM with its constant weight as HWIO: the output channels of one
    (kh, kw, ic) contiguous, so the default schedule's channel vectors load, not gather."""
    weight = const_value(conv.args[1])
    attrs = conv.attrs
    if weight is None or str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "OHWI":
        return None
    return relax.op.nn.conv2d(em.subst(conv.args[0]), relax.const(np.ascontiguousarray(weight.transpose(1, 2, 3, 0))),
                              strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
                              groups=int(attrs.groups), data_layout="NHWC", kernel_layout="HWIO",
                              out_layout="NHWC", out_dtype=str(attrs.out_dtype) or None)


def _int8_conv(value, dot: Int8Dot) -> bool:
    """An integer conv2d with a constant weight and the activation type ``dot`` multiplies."""
    if op_name(value) != "relax.nn.conv2d" or str(value.attrs.out_dtype) != "int32":
        return False
    weight = const_value(value.args[1])
    return weight is not None and weight.dtype == np.int8 and dtype_of(value.args[0]) == dot.activation_dtype


def _oihw_weight(conv) -> np.ndarray | None:
    """The constant weight of a one-group NCHW/OIHW or NHWC/OHWI conv2d, as OIHW."""
    layouts = (str(conv.attrs.data_layout), str(conv.attrs.kernel_layout), str(conv.attrs.out_layout))
    weight = const_value(conv.args[1])
    if weight is None or weight.ndim != 4 or int(conv.attrs.groups) != 1:
        return None
    if layouts == ("NCHW", "OIHW", "NCHW"):
        return weight
    if layouts == ("NHWC", "OHWI", "NHWC"):
        return weight.transpose(0, 3, 1, 2)
    return None


def _match(graph: Graph, conv, dot: Int8Dot):
    """(input, zero point, ConvShape, OIHW weight) for a conv the kernel computes, else None."""
    if not _int8_conv(conv, dot) or str(conv.attrs.data_layout) != "NHWC":
        return None
    weight = _oihw_weight(conv)
    if weight is None:
        return None
    oc, ic, kh, kw = weight.shape
    return _with_input(graph, conv, weight, oc, ic, (kh, kw))


def _match_depthwise(graph: Graph, conv, dot: Int8Dot):
    """(input, zero point, ConvShape, [KH, KW, C] weight) for an NHWC/OHWI depthwise int8
    conv (groups = channels, channel multiplier 1) with a constant weight, else None."""
    attrs = conv.attrs
    if not _int8_conv(conv, dot) or (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NHWC", "OHWI"):
        return None
    weight = const_value(conv.args[1])  # (C, KH, KW, 1)
    channels = int(attrs.groups)
    if weight.ndim != 4 or channels == 1 or weight.shape[0] != channels or weight.shape[3] != 1:
        return None
    return _with_input(graph, conv, np.ascontiguousarray(weight[..., 0].transpose(1, 2, 0)), channels, channels,
                       weight.shape[1:3])


def _with_input(graph: Graph, conv, weight: np.ndarray, oc: int, ic: int, kernel: tuple[int, int]):
    """(input, zero point, ConvShape, weight): the conv's input, or, behind realize's
    ``pad`` with the input zero point, the pad's input with the padding moved into the shape."""
    attrs = conv.attrs
    data, zero_point = conv.args[0], 0
    padding = tuple(int(p) for p in attrs.padding)
    pad = graph.call_of(data, "relax.nn.pad")
    if pad is not None and not any(padding) and str(pad.attrs.pad_mode) == "constant":
        widths = [int(p) for p in pad.attrs.pad_width]  # (before, after) per NHWC axis
        value = float(pad.attrs.pad_value)
        if widths[:2] == [0, 0] and widths[6:] == [0, 0] and value == int(value):
            top, bottom, left, right = widths[2:6]
            data, padding, zero_point = pad.args[0], (top, left, bottom, right), int(value)
    if dtype_of(data) != dtype_of(conv.args[0]) or len(shape_of(data)) != 4:
        return None
    if len(padding) == 2:
        padding = padding * 2
    n, h, w, channels = shape_of(data)
    if channels != ic:
        return None
    shape = packed_conv2d.ConvShape(n, ic, h, w, int(oc), int(kernel[0]), int(kernel[1]),
                                    tuple(int(s) for s in attrs.strides), padding,
                                    tuple(int(d) for d in attrs.dilation))
    return data, zero_point, shape, weight


def PackInt8Conv(target: tvm.target.Target):
    """The module pass form of :func:`pack_int8_conv` for ``target``."""

    @tvm.transform.module_pass(opt_level=0, name="qcompile.PackInt8Conv")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return pack_int8_conv(mod, target)[0]

    return _pass
