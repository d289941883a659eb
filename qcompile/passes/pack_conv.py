"""PackConv: run conv2d layers on qcompile's own CPU kernels (:mod:`qcompile.kernels`).

On LLVM (CPU) targets the module is first converted to NHWC (TVM's ConvertLayout:
elementwise ops, pooling and the requantize chains follow, a transpose is left only at the
ends), as ONNX Runtime, oneDNN and TFLite run convs on CPUs: a kernel then reads adjacent
input channels and writes whole channel vectors.  Only conv2d is asked for NHWC; the ops
that would follow it are kept in the model's layout where the result would have no
lowering or no kernel (:func:`to_nhwc`): the other convolutions (conv2d_transpose in a
U-Net decoder, conv1d on a sequence), and any op whose TVM legalization does not take the
converted layout.  A model the conversion cannot handle keeps its layout (and TVM's
convs), with a note saying why.  Then, with the weight constant:

* an integer conv -- ``conv2d(x, W, out_dtype="int32")``, ``x`` uint8/int8 as the target's
  int8 dot-product instruction takes it (:func:`qcompile.kernels.int8_dot.int8_dot_for`),
  one group, what :mod:`qcompile.quantize.realize` emits, optionally behind realize's
  ``pad`` with the input zero point -- becomes ``call_tir`` of
  :mod:`qcompile.kernels.packed_conv2d` with the weight packed at compile time.  Layers the
  instruction cannot compute exactly (AVX2 with 8-bit weights whose pairs overflow int16)
  keep TVM's conv2d: slower, never wrong ("int8_inexact");
* an integer depthwise conv (groups = channels) becomes :mod:`qcompile.kernels.depthwise_conv2d`;
* a float32 3x3 stride-1 conv with enough channels and pixels
  (:func:`qcompile.kernels.winograd_conv2d.applies`) becomes the Winograd F(2x2, 3x3) kernel
  ("float_winograd": 2.25x fewer multiply-adds, the weight transformed at compile time);
* any other float32 conv becomes :mod:`qcompile.kernels.float_conv2d` (output channels a multiple
  of 8; 16-lane blocks where the target's are and they divide the channels), a float32
  depthwise conv the float form of the depthwise kernel, a float32 grouped conv whose groups
  hold whole lane blocks (RegNet's, ResNeXt's) the float kernel with each block reducing over
  its group's inputs ("float_grouped": on TVM's grouped conv, regnet_y_400mf's ran at
  4 GMAC/s and took half the model's time); an integer grouped conv the packed int8 kernel
  the same way, a group narrower than the instruction's lanes sharing a block with its
  neighbours, zero weights between them ("int8_grouped", :func:`packed_conv2d.block_inputs`);
* an integer dense layer -- ``matmul(x[M, K], W[K, N], out_dtype="int32")`` with ``W``
  constant int8, the classifier and linear layers realize emits -- becomes the packed int8
  conv as a 1x1 conv over a 1 x M image ("int8_dense"): the weight then streams in the
  instruction's contiguous blocks instead of ``N``-strided rows (mobilenet_v2's 1280x1000
  classifier took ~9% of the int8 model on TVM's matmul), and the M rows (tokens) share each
  loaded weight vector within a register tile;
* a float32 dense layer (a transformer's linear layers over its tokens, a CNN's classifier
  on one image) becomes the float conv kernel the same way ("float_dense"): on one row too,
  where the register tile has nothing to share, because the packed weight streams each
  block's channels contiguously, where TVM's matmul steps through ``W[K, N]`` a row (4 KB
  for mobilenet_v2's classifier) at a time: 0.25 vs 0.76 ms of that classifier in the
  model, 2-vCPU Xeon with AVX-512 (``qcompile bench --profile``).

An int8 model is converted only where some layer gets the int8 dot-product kernel (else the
layout is left alone: nothing to gain).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from qcompile.errors import first_line
from qcompile.kernels import (
    depthwise_conv2d,
    float_conv2d,
    packed_conv2d,
    winograd_conv2d,
)
from qcompile.kernels.int8_dot import Int8Dot, int8_dot_for
from qcompile.passes.bindings import (
    Graph,
    UnsupportedForm,
    const_value,
    dtype_of,
    op_name,
    rebuild_module,
    shape_of,
)

COUNTS = ("int8", "int8_depthwise", "int8_dense", "int8_inexact", "float", "float_depthwise", "float_dense",
          "float_grouped", "int8_grouped", "float_winograd")

# Convolutions without a qcompile kernel keep the model's layout: ConvertLayout would make
# them follow an NHWC input, and TVM 0.27 lowers conv2d_transpose only in NCHW (its NWC and
# NDHWC convs are plain loops, no faster than the transposes they save).
KEEP_LAYOUT = ("relax.nn.conv1d", "relax.nn.conv3d", "relax.nn.conv1d_transpose",
               "relax.nn.conv2d_transpose", "relax.nn.conv3d_transpose")
# Ops that ConvertLayout gives the layout asked for (the others follow their input): those
# it can keep in the model's layout when the converted one has no lowering.
_PINNABLE = KEEP_LAYOUT + ("relax.image.resize2d", "relax.image.resize3d")
_NHWC = {"relax.nn.conv2d": ["NHWC", "OHWI"]}


def pack_conv(mod: tvm.IRModule, target: tvm.target.Target,
              notes: list[str] | None = None) -> tuple[tvm.IRModule, dict[str, int]]:
    """The rewritten module and counts of conv layers per kernel (:data:`COUNTS`;
    ``int8_inexact``: one-group int8 convs left to TVM, see the module docstring).
    ``notes`` (if given) receives a line when the layout conversion is left out."""
    counts = dict.fromkeys(COUNTS, 0)
    if target.kind.name != "llvm" or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, counts
    try:
        return _pack_conv(mod, target, counts, notes)
    except UnsupportedForm as exc:  # a main these rewrites cannot read (see bindings): TVM's convs
        if notes is not None:
            notes.append(f"convs stay on TVM's generic conv2d: {exc}")
        return mod, dict.fromkeys(COUNTS, 0)


def _pack_conv(mod: tvm.IRModule, target: tvm.target.Target, counts: dict[str, int],
               notes: list[str] | None) -> tuple[tvm.IRModule, dict[str, int]]:
    dot = int8_dot_for(target)
    float_registers = float_conv2d.vector_registers(target)
    float_lanes = float_conv2d.vector_lanes(target)
    bindings = [v for _, v in Graph.from_main(mod["main"]).bindings]
    weights = [_oihw_weight(v) for v in bindings if dot is not None and _int8_conv(v, dot)]
    exact = [w is not None and dot.exact_for(packed_conv2d.pack_weight(w, dot.lanes)) for w in weights]
    grouped = any(dot is not None and _int8_conv(v, dot) and _grouped_not_depthwise(v) for v in bindings)
    if not any(exact) and not grouped and not any(_float_conv(v) for v in bindings) and not any(
            _int8_dense(v, dot) is not None or _float_dense(v, float_lanes) is not None
            for v in bindings):  # nothing to gain: leave the layout alone
        counts["int8_inexact"] = sum(w is not None for w in weights)
        return mod, counts
    converted, reason = to_nhwc(mod)
    if converted is None:  # the layout stays; the layout-free rewrites (int8 dense) still apply
        if notes is not None:
            notes.append(f"convs stay in the model's layout on TVM's generic conv2d: {reason}")
    else:
        mod = relax.transform.FoldConstant()(converted)  # the per-channel constants, transposed once
    graph = Graph.from_main(mod["main"])
    kernels: dict = {}  # (kernel, ConvShape) -> GlobalVar: layers of one shape share one kernel

    def kernel(em, kind: str, shape: packed_conv2d.ConvShape, make) -> relax.GlobalVar:
        if (kind, shape) not in kernels:  # private functions, like legalized ops
            kernels[kind, shape] = em.bb.add_func(make().without_attr("global_symbol"), f"qc_{kind}")
        return kernels[kind, shape]

    def rewrite(em, var, value):
        dense = _int8_dense(value, dot)
        if dense is not None:
            shape, packed = dense
            counts["int8_dense"] += 1
            func = kernel(em, "conv2d_int8", shape, lambda: packed_conv2d.conv2d_func(shape, dot))
            return _dense_call(em, value, func, packed, shape, 0)
        fdense = _float_dense(value, float_lanes)
        if fdense is not None:
            shape, lanes = fdense
            counts["float_dense"] += 1
            func = kernel(em, "conv2d_float32", shape, lambda: float_conv2d.conv2d_func(shape, lanes, float_registers))
            packed = float_conv2d.pack_weight(np.ascontiguousarray(const_value(value.args[1]).T)[:, :, None, None], lanes)
            return _dense_call(em, value, func, packed, shape, None)
        if op_name(value) != "relax.nn.conv2d":
            return None
        integer = dot is not None and _int8_conv(value, dot)
        if not integer and not _float_conv(value):
            return _hwio(em, value)
        depthwise = _match_depthwise(graph, value)
        if depthwise is not None:
            data, zero_point, shape, weight = depthwise
            dtype = dtype_of(data)
            counts["int8_depthwise" if integer else "float_depthwise"] += 1
            func = kernel(em, f"depthwise_conv2d_{'int8' if integer else 'float32'}", shape,
                          lambda: depthwise_conv2d.depthwise_func(shape, dtype))
            return _call(em, func, data, weight, shape, zero_point)
        match = _match(graph, value)
        if integer:
            match = match or _match_grouped(graph, value, dot.lanes, integer=True)
            if match is None:
                return _hwio(em, value)
            data, zero_point, shape, weight = match
            packed = packed_conv2d.pack_weight(weight, dot.lanes, shape.folds_rows, shape.groups)
            if not dot.exact_for(packed):
                counts["int8_inexact"] += 1
                return _hwio(em, value)
            counts["int8_grouped" if shape.groups > 1 else "int8"] += 1
            func = kernel(em, "conv2d_int8", shape, lambda: packed_conv2d.conv2d_func(shape, dot))
            return _call(em, func, data, packed, shape, zero_point)
        if match is None:
            grouped = _match_grouped(graph, value, float_lanes)
            if grouped is None:
                return _hwio(em, value)
            data, _, shape, weight = grouped
            lanes = _float_group_lanes(shape.oc // shape.groups, float_lanes)
            counts["float_grouped"] += 1
            func = kernel(em, "conv2d_float32", shape, lambda: float_conv2d.conv2d_func(shape, lanes, float_registers))
            return _call(em, func, data, float_conv2d.pack_weight(weight, lanes), shape)
        data, zero_point, shape, weight = match
        if zero_point:
            return _hwio(em, value)
        lanes = float_conv2d.lanes_for(shape.oc, float_lanes)  # weight and kernel alike
        if winograd_conv2d.applies(shape):
            counts["float_winograd"] += 1
            func = kernel(em, "conv2d_winograd", shape, lambda: winograd_conv2d.conv2d_func(shape, lanes))
            return _call(em, func, data, winograd_conv2d.pack_weight(weight, lanes), shape)
        counts["float"] += 1
        func = kernel(em, "conv2d_float32", shape, lambda: float_conv2d.conv2d_func(shape, lanes, float_registers))
        return _call(em, func, data, float_conv2d.pack_weight(weight, lanes), shape)

    # DCE: pads whose input a conv kernel now takes directly
    return relax.transform.DeadCodeElimination(["main"])(rebuild_module(mod, rewrite)), counts


def to_nhwc(mod: tvm.IRModule) -> tuple[tvm.IRModule | None, str | None]:
    """``(mod with its conv2d layers in NHWC/OHWI, None)``, or ``(None, why)`` where TVM's
    ConvertLayout fails on the module or would leave an op that legalization cannot lower
    (after :func:`_before_conversion`).

    The convolutions of :data:`KEEP_LAYOUT` are asked for the layout they have; an op that
    then has no lowering in the layout it followed (and had one before) is kept in its own
    layout too where ConvertLayout takes a layout for it (:data:`_PINNABLE`), else the
    module is not converted.  Run under the build's target (legalization may depend on it)."""
    mod = _before_conversion(mod)
    calls = _layout_calls(mod)
    pins = {name: _layouts(calls[name][0]) for name in KEEP_LAYOUT if name in calls}
    before: set[str] | None = None
    while True:
        try:
            converted = relax.transform.ConvertLayout({**_NHWC, **pins})(mod)
        except Exception as exc:  # noqa: BLE001 -- TVM's layout inference rejects some graphs (an internal error)
            return None, f"TVM's layout conversion failed ({first_line(exc, 200)})"
        broken = _unlowerable(_layout_calls(converted))
        if broken:
            before = _unlowerable(calls) if before is None else before
            broken -= before  # ops the model already has in a form TVM cannot lower: reported later
        if not broken:
            return converted, None
        pinnable = {name for name in broken if name in _PINNABLE and name not in pins}
        if not pinnable:
            return None, f"{', '.join(sorted(broken))} would have no lowering in the converted layout"
        pins.update({name: _layouts(calls[name][0]) for name in pinnable})


def _layouts(call) -> list[str]:
    """An op's layouts as ConvertLayout's desired layouts take them: [data, kernel, output]
    for a convolution, [layout] for a resize."""
    attrs = call.attrs
    if hasattr(attrs, "data_layout"):
        return [str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)]
    return [str(attrs.layout)]


def _layout_calls(mod: tvm.IRModule) -> dict[str, list]:
    """Calls to operators with a layout attribute in ``mod``'s ``main`` (if-branches
    included), by operator name, in program order."""
    found: dict[str, list] = {}

    @relax.expr_functor.visitor
    class Finder(relax.PyExprVisitor):
        def visit_call_(self, call) -> None:
            name = op_name(call)
            if name is not None and (hasattr(call.attrs, "data_layout") or hasattr(call.attrs, "layout")):
                found.setdefault(name, []).append(call)
            super().visit_call_(call)

    Finder().visit_expr(mod["main"])
    return found


def _unlowerable(calls: dict[str, list]) -> set[str]:
    """The operators among ``calls`` (but conv2d, which the kernels take) that TVM's
    legalization leaves as they are in the attributes and types of some call."""
    broken = set()
    for name, group in calls.items():
        legalize = tvm.ir.Op.get(name).get_attr("FLegalize")
        if name == "relax.nn.conv2d" or legalize is None:
            continue
        seen = set()
        for call in group:
            key = (str(call.attrs), tuple(str(a.ty) for a in call.args))
            if key in seen:
                continue
            seen.add(key)
            lowered = legalize(relax.BlockBuilder(), call)
            if isinstance(lowered, relax.Call) and lowered.op.same_as(call.op):
                broken.add(name)
                break
    return broken


def _before_conversion(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with the ops ConvertLayout handles badly rewritten into equal ones it handles.

    * ``clip(x, lo, hi)`` (ReLU6) as ``minimum(maximum(x, lo), hi)``: ConvertLayout has no
      layout rule for clip and wrapped each one in two transposes (mobilenet_v2 fp32: 11 ms
      of transposes in a 17 ms run); elementwise binary ops follow the layout and still fuse.
    * ``squeeze`` with its axes counted from the front: TVM 0.27's layout rule for squeeze
      indexes with the axis as given, so a negative one (a CRNN's ``squeeze(-2)`` after its
      convs, as torch.export writes it) fails: std::bad_alloc, or a corrupt layout that a
      later op rejects ("Invalid SLayout: can't find S in source layout ABC").
    """

    def rewrite(em, var, value):
        name = op_name(value)  # (a Tuple / TupleGetItem binding has no op and no args)
        if name == "relax.clip":
            bounds = [getattr(a, "value", None) for a in value.args[1:]]  # FloatImm / IntImm in TVM 0.27
            if not all(isinstance(b, (int, float)) for b in bounds):
                return None
            dtype = dtype_of(value.args[0])
            lo, hi = (relax.const(np.array(b, dtype)) for b in bounds)
            return relax.op.minimum(em.emit(relax.op.maximum(em.subst(value.args[0]), lo)), hi)
        if name == "relax.squeeze" and value.attrs.axis is not None:
            axes = [int(a) for a in value.attrs.axis]
            ndim = getattr(value.args[0].ty, "ndim", -1)
            if ndim < 0 or all(a >= 0 for a in axes):
                return None
            return relax.op.squeeze(em.subst(value.args[0]), axis=[a % ndim for a in axes])
        return None

    return rebuild_module(mod, rewrite)


def _call(em, kernel: relax.GlobalVar, data, weight: np.ndarray, shape: packed_conv2d.ConvShape,
          zero_point: int | None = None):
    """``call_tir`` of one of the kernels: (input[, zero point], weight) -> NHWC output."""
    oh, ow = shape.out_hw
    dtype = dtype_of(data)
    args = [em.subst(data)]
    if not isinstance(args[0], relax.Var):  # an input taken through a transpose
        args[0] = em.emit(args[0])
    if zero_point is not None:  # the padding value, a tensor (the kernel does not depend on it)
        args.append(relax.const(np.array([zero_point], dtype)))
    out_dtype = "float32" if dtype == "float32" else "int32"
    return relax.call_tir(kernel, args + [relax.const(weight)], relax.TensorType((shape.n, oh, ow, shape.oc), out_dtype))


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
                              out_layout="NHWC", out_dtype=_out_dtype(conv))


def _int8_conv(value, dot: Int8Dot) -> bool:
    """An integer conv2d with a constant weight and the activation type ``dot`` multiplies."""
    if op_name(value) != "relax.nn.conv2d" or str(value.attrs.out_dtype) != "int32":
        return False
    weight = const_value(value.args[1])
    return weight is not None and weight.dtype == np.int8 and dtype_of(value.args[0]) == dot.activation_dtype


def _grouped_not_depthwise(conv) -> bool:
    """A conv2d of several groups with more than one input channel each (OIHW or OHWI)."""
    weight = const_value(conv.args[1])
    axis = 1 if str(conv.attrs.kernel_layout) == "OIHW" else 3
    return int(conv.attrs.groups) > 1 and weight is not None and weight.ndim == 4 and weight.shape[axis] > 1


def _dense_shape(m: int, k: int, n: int) -> packed_conv2d.ConvShape:
    """``x[M, K] @ W[K, N]`` as a 1x1 conv over a 1 x M image: the M rows (tokens) are the
    pixels a register tile shares each weight vector between."""
    return packed_conv2d.ConvShape(1, k, 1, m, n, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))


def _dense_call(em, value, func, packed: np.ndarray, shape: packed_conv2d.ConvShape, zero_point: int | None):
    """The dense layer ``value`` (``matmul(x[..., K], W)``) through a 1x1 conv kernel."""
    lead = shape_of(value.args[0])[:-1]
    data = em.emit(relax.op.reshape(em.subst(value.args[0]), (1, 1, shape.w, shape.ic)))
    out = em.emit(_call(em, func, data, packed, shape, zero_point))
    return relax.op.reshape(out, (*lead, shape.oc))


def _float_dense(value, lanes: int) -> tuple[packed_conv2d.ConvShape, int] | None:
    """(ConvShape of the 1x1 conv, lanes) for a float32 ``matmul(x[..., K], W[K, N])`` with a
    constant ``W`` and N a multiple of 8, else None."""
    if op_name(value) != "relax.matmul" or _out_dtype(value) not in (None, "float32"):
        return None
    weight = const_value(value.args[1])
    xshape = shape_of(value.args[0])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or dtype_of(value.args[0]) != "float32" \
            or len(xshape) < 2 or xshape[-1] != weight.shape[0] or weight.shape[1] % float_conv2d.LANES:
        return None
    return _dense_shape(int(np.prod(xshape[:-1])), weight.shape[0], weight.shape[1]), float_conv2d.lanes_for(weight.shape[1], lanes)


def _int8_dense(value, dot: Int8Dot | None) -> tuple[packed_conv2d.ConvShape, np.ndarray] | None:
    """(ConvShape of the 1x1 conv, packed weight) for an integer ``matmul(x[M, K], W[K, N])``
    with a constant int8 ``W`` that ``dot`` computes exactly, else None."""
    if dot is None or op_name(value) != "relax.matmul" or str(value.attrs.out_dtype) != "int32":
        return None
    weight = const_value(value.args[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.int8 or dtype_of(value.args[0]) != dot.activation_dtype:
        return None
    if len(shape_of(value.args[0])) != 2:
        return None
    (m, k), n = shape_of(value.args[0]), weight.shape[1]
    packed = packed_conv2d.pack_weight(np.ascontiguousarray(weight.T)[:, :, None, None], dot.lanes)
    if not dot.exact_for(packed):
        return None
    return _dense_shape(m, k, n), packed


def _float_conv(value) -> bool:
    """A float32 conv2d with a constant float32 weight (the float kernels' input)."""
    if op_name(value) != "relax.nn.conv2d" or _out_dtype(value) not in (None, "float32"):
        return False
    weight = const_value(value.args[1])
    return weight is not None and weight.dtype == np.float32 and dtype_of(value.args[0]) == "float32"


def _out_dtype(conv) -> str | None:
    """A conv2d's ``out_dtype`` attribute; None where unset (the input's type)."""
    dtype = str(conv.attrs.out_dtype)
    return None if dtype in ("", "None", "void") else dtype


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


def _match(graph: Graph, conv):
    """(input, zero point, ConvShape, OIHW weight) for a one-group NHWC conv, else None."""
    weight = _oihw_weight(conv) if str(conv.attrs.data_layout) == "NHWC" else None
    if weight is None:
        return None
    oc, ic, kh, kw = weight.shape
    return _with_input(graph, conv, weight, oc, ic, (kh, kw))


def _match_grouped(graph: Graph, conv, lanes: int, integer: bool = False):
    """(input, zero point, ConvShape, OIHW weight [OC, IC / groups, KH, KW]) for an NHWC/OHWI
    grouped conv (neither one group nor depthwise; RegNet's and ResNeXt's group width 8, 16,
    ...): float32 where its groups hold whole blocks of ``lanes`` (or 8) output channels,
    integer (``integer``, realize's zero-point pad taken in) where the int8 kernel's
    ``lanes`` fit it (:func:`packed_conv2d.fits_groups`); else None."""
    attrs = conv.attrs
    groups = int(attrs.groups)
    weight = const_value(conv.args[1])
    if groups == 1 or weight is None or weight.ndim != 4 or \
            (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NHWC", "OHWI", "NHWC"):
        return None
    oc, kh, kw, group_in = weight.shape
    if oc % groups:
        return None
    if not integer and _float_group_lanes(oc // groups, lanes) is None:
        return None
    match = _with_input(graph, conv, np.ascontiguousarray(weight.transpose(0, 3, 1, 2)), oc, group_in * groups, (kh, kw))
    if match is None or (match[1] and not integer):  # (a zero-point pad: integer convs only)
        return None
    data, zero_point, shape, oihw = match
    shape = dataclasses.replace(shape, groups=groups)
    if integer and not packed_conv2d.fits_groups(shape, lanes):
        return None
    return data, zero_point, shape, oihw


def _float_group_lanes(group_out: int, lanes: int) -> int | None:
    """The float kernel's lanes for groups of ``group_out`` output channels: the target's
    ``lanes`` or 8, whichever fills whole blocks per group; None if neither does."""
    return next((n for n in (lanes, float_conv2d.LANES) if group_out % n == 0), None)


def _match_depthwise(graph: Graph, conv):
    """(input, zero point, ConvShape, [KH, KW, C] weight) for an NHWC/OHWI depthwise conv
    (groups = channels, channel multiplier 1) with a constant weight, else None."""
    attrs = conv.attrs
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NHWC", "OHWI", "NHWC"):
        return None
    weight = const_value(conv.args[1])  # (C, KH, KW, 1)
    channels = int(attrs.groups)
    if weight is None or weight.ndim != 4 or channels == 1 or weight.shape[0] != channels or weight.shape[3] != 1:
        return None
    return _with_input(graph, conv, np.ascontiguousarray(weight[..., 0].transpose(1, 2, 0)), channels, channels,
                       weight.shape[1:3])


def _with_input(graph: Graph, conv, weight: np.ndarray, oc: int, ic: int, kernel: tuple[int, int]):
    """(input, zero point, ConvShape, weight): the conv's input, or, behind realize's
    ``pad`` with the input zero point, the pad's input with the padding moved into the shape."""
    attrs = conv.attrs
    data, zero_point = conv.args[0], 0
    padding = tuple(int(p) for p in attrs.padding)
    pad, unpadded, spatial = _zero_point_pad(graph, data)
    if pad is not None and not any(padding) and str(pad.attrs.pad_mode) == "constant":
        widths = [int(p) for p in pad.attrs.pad_width]  # (before, after) per axis
        value = float(pad.attrs.pad_value)
        if all(w == 0 for i, w in enumerate(widths) if i // 2 not in spatial) and value == int(value):
            (top, bottom), (left, right) = (widths[2 * a:2 * a + 2] for a in spatial)
            data, padding, zero_point = unpadded, (top, left, bottom, right), int(value)
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


def _zero_point_pad(graph: Graph, data):
    """Realize's ``pad`` (with the input zero point) in front of an NHWC conv: (pad call,
    the conv's input without it, the padded axes H and W), or (None, data, ()).  The model
    input's pad is still NCHW, behind ConvertLayout's transpose (TVM has no layout rule for
    pad): its input is then taken through that transpose, so the conv kernel pads with the
    zero point as an argument rather than a pad kernel with the zero point as a literal
    (a new kernel and a missed tuning record for every calibration)."""
    pad = graph.call_of(data, "relax.nn.pad")
    if pad is not None:
        return pad, pad.args[0], (1, 2)
    transpose = graph.call_of(data, "relax.permute_dims")
    pad = graph.call_of(transpose.args[0], "relax.nn.pad") if transpose is not None else None
    if pad is None or [int(a) for a in transpose.attrs.axes or ()] != [0, 2, 3, 1]:
        return None, data, ()
    nhwc = relax.BlockBuilder().normalize(relax.op.permute_dims(pad.args[0], [0, 2, 3, 1]))  # typed
    return pad, nhwc, (2, 3)


def PackConv(target: tvm.target.Target, counts: dict | None = None, notes: list[str] | None = None):
    """The module pass form of :func:`pack_conv` for ``target``; ``counts`` (if given)
    is updated with the layer counts, ``notes`` (if given) receives pack_conv's notes."""

    @tvm.transform.module_pass(opt_level=0, name="qcompile.PackConv")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, found = pack_conv(mod, target, notes)
        if counts is not None:
            counts.update(found)
        return mod

    return _pass
