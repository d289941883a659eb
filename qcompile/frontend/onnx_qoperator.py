"""Rewrite ONNX QOperator graphs into QDQ form before import.

ONNX Runtime's ``QuantFormat.QOperator`` writes fused integer operators (QLinearConv,
QLinearMatMul, ConvInteger, MatMulInteger, and com.microsoft's QGemm, QLinearAdd,
QLinearMul, QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool, QLinearSigmoid,
QLinearLeakyRelu, QLinearSoftmax, QLinearWhere) that TVM's ONNX frontend does not convert.
Each is replaced by DequantizeLinear -> float op -> QuantizeLinear, exactly its definition,
so the one realize pass turns it back into integer kernels.

ONNX Runtime's ``quantize_dynamic`` writes DynamicQuantizeLinear -> MatMulInteger /
ConvInteger -> Cast -> Mul by ``x_scale * w_scale``: the activation's scale and zero point
are computed at run time.  DynamicQuantizeLinear is written out as its definition (with
ONNX Runtime's scale for an all-zero tensor), the integer op's DequantizeLinear reads the
zero point as a tensor, and :mod:`qcompile.quantize.dynamic` realizes that pattern as an
integer kernel.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qcompile.errors import ModelImportError

_MS = "com.microsoft"


class _Rewriter:
    def __init__(self, proto, where: str) -> None:
        from onnx import numpy_helper

        self.graph = proto.graph
        self.where = where
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.counter = 0
        self.nodes: list = []
        self.readers: dict[str, list] = {}  # tensor -> the nodes that read it
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}
        self.absorbed: set[str] = set()  # first outputs of the nodes a converter took over
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__qdq{self.counter}"

    def const(self, value: np.ndarray, base: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = value
        return name

    def value(self, node, name: str) -> np.ndarray:
        if name not in self.inits:
            raise ModelImportError(
                f"{self.where}: {node.op_type} node {node.name!r} has a non-constant quantization "
                f"parameter {name!r}; only static quantization is realized"
            )
        return self.inits[name]

    def dq(self, x: str, scale: str, zp: str | None, axis: int | None = None) -> str:
        from onnx import helper

        out = self.fresh(x)
        attrs = {"axis": axis} if axis is not None else {}
        self.nodes.append(helper.make_node("DequantizeLinear", [x, scale] + ([zp] if zp else []), [out], **attrs))
        return out

    def q(self, x: str, scale: str, zp: str | None, out: str) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("QuantizeLinear", [x, scale] + ([zp] if zp else []), [out]))

    def op(self, op_type: str, inputs: list[str], node, domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.fresh(node.output[0])
        new = helper.make_node(op_type, inputs, [out], domain=domain, name=node.name)
        new.attribute.extend(a for a in node.attribute if not attrs or a.name not in attrs)
        for key, value in attrs.items():
            new.attribute.append(helper.make_attribute(key, value))
        self.nodes.append(new)
        return out

    def bias(self, node, b: str, sx: str, sw: str, base: str) -> str:
        """int32 bias dequantized at scale sx * sw (per output channel)."""
        given = self.inits.get(b)
        if given is not None and given.dtype != np.int32:
            # ONNX Runtime's quantizer writes this when the float bias is one initializer shared
            # with an activation it quantized (an exporter merging equal all-zero tensors);
            # all zeros read the same in any type, other values have no defined meaning.
            if given.any():
                raise ModelImportError(
                    f"{self.where}: {node.op_type} node {node.name!r} has a {given.dtype} bias {b!r}, not int32; "
                    "re-quantize the model with its initializers unshared"
                )
            b = self.const(np.zeros(given.shape, np.int32), base)
        scale = (self.value(node, sx).astype(np.float32) * self.value(node, sw).astype(np.float32)).reshape(-1)
        return self.dq(b, self.const(scale.astype(np.float32), base + "_scale"), None, axis=0)


def _weight_axis(rw: _Rewriter, node, scale: str, axis: int) -> int | None:
    return axis if rw.value(node, scale).size > 1 else None


def _qlinear_conv(rw: _Rewriter, node) -> None:
    x, sx, zx, w, sw, zw, sy, zy = node.input[:8]
    inputs = [rw.dq(x, sx, zx), rw.dq(w, sw, zw, _weight_axis(rw, node, sw, 0))]
    if len(node.input) > 8 and node.input[8]:
        inputs.append(rw.bias(node, node.input[8], sx, sw, node.input[8]))
    rw.q(rw.op("Conv", inputs, node), sy, zy, node.output[0])


def _qlinear_matmul(rw: _Rewriter, node) -> None:
    a, sa, za, b, sb, zb, sy, zy = node.input[:8]
    out = rw.op("MatMul", [rw.dq(a, sa, za), rw.dq(b, sb, zb, _weight_axis(rw, node, sb, 1))], node)
    rw.q(out, sy, zy, node.output[0])


def _qgemm(rw: _Rewriter, node) -> None:
    from onnx import helper

    a, sa, za, b, sb, zb = node.input[:6]
    trans_b = next((helper.get_attribute_value(x) for x in node.attribute if x.name == "transB"), 0)
    inputs = [rw.dq(a, sa, za), rw.dq(b, sb, zb, _weight_axis(rw, node, sb, 0 if trans_b else 1))]
    if len(node.input) > 6 and node.input[6]:
        inputs.append(rw.bias(node, node.input[6], sa, sb, node.input[6]))
    out = rw.op("Gemm", inputs, node)
    if len(node.input) > 7 and node.input[7]:
        rw.q(out, node.input[7], node.input[8] if len(node.input) > 8 else None, node.output[0])
    else:  # no output scale: QGemm returns float
        rw.nodes.append(helper.make_node("Identity", [out], [node.output[0]]))


def _qlinear_binary(op_type: str) -> Callable:
    def convert(rw: _Rewriter, node) -> None:
        a, sa, za, b, sb, zb, sy, zy = node.input[:8]
        rw.q(rw.op(op_type, [rw.dq(a, sa, za), rw.dq(b, sb, zb)], node), sy, zy, node.output[0])

    return convert


def _qlinear_unary(op_type: str) -> Callable:
    def convert(rw: _Rewriter, node) -> None:
        from onnx import helper

        channels_last = next((helper.get_attribute_value(x) for x in node.attribute if x.name == "channels_last"), 0)
        if channels_last:
            raise ModelImportError(f"{rw.where}: {node.op_type} node {node.name!r} with channels_last=1 is not supported")
        # QLinearSigmoid / QLinearLeakyRelu may leave out the trailing zero point (0 then).
        x, sx, zx, sy, zy = (list(node.input) + [""] * 5)[:5]
        kept = [a for a in node.attribute if a.name != "channels_last"]
        del node.attribute[:]
        node.attribute.extend(kept)
        rw.q(rw.op(op_type, [rw.dq(x, sx, zx)], node), sy, zy, node.output[0])

    return convert


def _qlinear_softmax(rw: _Rewriter, node) -> None:
    """QLinearSoftmax: its ``opset`` attribute says which ONNX Softmax it quantizes -- before
    opset 13 Softmax coerces the input to 2-D at ``axis`` (default 1), from 13 on it reduces
    over ``axis`` alone (default -1).  The float Softmax takes the graph's opset, so the axis
    is passed on as is where both lie on the same side of 13; across, only the last axis means
    the same in both."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    legacy = int(attrs.get("opset", rw.opset)) < 13
    axis = int(attrs.get("axis", 1 if legacy else -1))
    if legacy != (rw.opset < 13) and axis != -1:
        raise ModelImportError(
            f"{rw.where}: QLinearSoftmax node {node.name!r} has opset={attrs.get('opset')} axis={axis} in an "
            f"opset-{rw.opset} graph, whose Softmax reads that axis otherwise; only axis=-1 is supported there"
        )
    x, sx, zx, sy, zy = (list(node.input) + [""] * 5)[:5]
    out = rw.fresh(node.output[0])
    rw.nodes.append(helper.make_node("Softmax", [rw.dq(x, sx, zx)], [out], name=node.name, axis=axis))
    rw.q(out, sy, zy, node.output[0])


def _qlinear_where(rw: _Rewriter, node) -> None:
    cond, x, sx, zx, y, sy, zy, sz, zz = node.input[:9]
    out = rw.op("Where", [cond, rw.dq(x, sx, zx), rw.dq(y, sy, zy)], node)
    rw.q(out, sz, zz, node.output[0])


def _qlinear_concat(rw: _Rewriter, node) -> None:
    sy, zy = node.input[:2]
    rest = list(node.input[2:])
    parts = [rw.dq(rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3)]
    rw.q(rw.op("Concat", parts, node), sy, zy, node.output[0])


def _integer(op_type: str, weight_axis: int) -> Callable:
    """ConvInteger / MatMulInteger: (a - za) op (b - zb) in int32 == DQ at scale 1, then Cast.

    A zero point may be a run-time tensor (DynamicQuantizeLinear's): a scalar, read as
    such by the DequantizeLinear.  When the only reader of the output is a Cast to float
    (quantize_dynamic's), the float op's result replaces the Cast's: the int32 round trip
    changes no integer value, and TVM imports a float -> int32 Cast as a chain of
    wrap-around ops."""

    def convert(rw: _Rewriter, node) -> None:
        from onnx import TensorProto, helper

        a, b = node.input[:2]
        za = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zb = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if za is not None and za in rw.inits and rw.inits[za].size > 1:
            raise ModelImportError(f"{rw.where}: {node.op_type} node {node.name!r} has a per-row input zero point; "
                                   "only a per-tensor one is supported")
        one = rw.const(np.array(1.0, np.float32), "one")
        zb_size = rw.inits[zb].size if zb is not None and zb in rw.inits else 1
        zb_axis = weight_axis if zb_size > 1 else None
        one_b = rw.const(np.ones(zb_size, np.float32), "ones") if zb_axis is not None else one
        out = rw.op(op_type, [rw.dq(a, one, za), rw.dq(b, one_b, zb, zb_axis)], node)
        readers = rw.readers.get(node.output[0], [])
        if len(readers) == 1 and _is_cast_to_float(readers[0]) and node.output[0] not in rw.outputs:
            rw.absorbed.add(readers[0].output[0])
            rw.nodes.append(helper.make_node("Identity", [out], [readers[0].output[0]]))
        else:
            rw.nodes.append(helper.make_node("Cast", [out], [node.output[0]], to=TensorProto.INT32))

    return convert


def _dynamic_quantize_linear(rw: _Rewriter, node) -> None:
    """DynamicQuantizeLinear as its definition, in ops TVM's frontend imports:
    ``s = (max(0, max x) - min(0, min x)) / 255``, ``zp = round(clip(-min(0, min x) / s, 0, 255))``,
    ``y = QuantizeLinear(x, s, zp)``, with the two maxima as Relu and the zero point's
    round-and-saturate as QuantizeLinear at scale 1 (a handful of small ops); an all-zero
    tensor gets scale 1 (the definition divides by 0 there; ONNX Runtime returns zeros)."""
    from onnx import helper

    def emit(op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or rw.fresh(node.output[0])
        rw.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    x = node.input[0]
    y, scale_out, zp_out = (list(node.output) + ["", ""])[:3]
    zero, one = rw.const(np.array(0.0, np.float32), "zero"), rw.const(np.array(1.0, np.float32), "one")
    qmax, zero_u8 = rw.const(np.array(255.0, np.float32), "qmax"), rw.const(np.array(0, np.uint8), "zero_u8")
    hi = emit("Relu", [emit("ReduceMax", [x], keepdims=0)])
    neg_lo = emit("Relu", [emit("Neg", [emit("ReduceMin", [x], keepdims=0)])])  # -min(0, min x)
    raw = emit("Div", [emit("Add", [hi, neg_lo]), qmax])
    scale = emit("Where", [emit("Equal", [raw, zero]), one, raw], scale_out or None)
    zp = emit("QuantizeLinear", [emit("Div", [neg_lo, scale]), one, zero_u8], zp_out or None)
    if y:
        emit("QuantizeLinear", [x, scale, zp], y)


def _is_cast_to_float(node) -> bool:
    from onnx import TensorProto, helper

    return node.op_type == "Cast" and node.domain in ("", "ai.onnx") and any(
        a.name == "to" and helper.get_attribute_value(a) == TensorProto.FLOAT for a in node.attribute)


CONVERTERS: dict[tuple[str, str], Callable] = {
    ("", "QLinearConv"): _qlinear_conv,
    ("", "QLinearMatMul"): _qlinear_matmul,
    ("", "ConvInteger"): _integer("Conv", 0),
    ("", "MatMulInteger"): _integer("MatMul", 1),
    ("", "DynamicQuantizeLinear"): _dynamic_quantize_linear,
    (_MS, "QGemm"): _qgemm,
    (_MS, "QLinearAdd"): _qlinear_binary("Add"),
    (_MS, "QLinearMul"): _qlinear_binary("Mul"),
    (_MS, "QLinearAveragePool"): _qlinear_unary("AveragePool"),
    (_MS, "QLinearGlobalAveragePool"): _qlinear_unary("GlobalAveragePool"),
    (_MS, "QLinearConcat"): _qlinear_concat,
    (_MS, "QLinearSigmoid"): _qlinear_unary("Sigmoid"),
    (_MS, "QLinearLeakyRelu"): _qlinear_unary("LeakyRelu"),
    (_MS, "QLinearSoftmax"): _qlinear_softmax,
    (_MS, "QLinearWhere"): _qlinear_where,
}


def is_qoperator(proto) -> bool:
    return any((n.domain if n.domain != "ai.onnx" else "", n.op_type) in CONVERTERS for n in proto.graph.node)


def to_qdq(proto, where: str):
    """The model with every QOperator node replaced by its QDQ definition."""
    rw = _Rewriter(proto, where)
    for node in proto.graph.node:
        if node.output and node.output[0] in rw.absorbed:
            continue
        convert = CONVERTERS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if convert is None:
            if node.domain == _MS:
                raise ModelImportError(
                    f"{where}: com.microsoft operator {node.op_type} (node {node.name!r}) is not supported; "
                    "re-quantize with quant_format=QuantFormat.QDQ"
                )
            rw.nodes.append(node)
        else:
            convert(rw, node)
    del proto.graph.node[:]
    proto.graph.node.extend(rw.nodes)
    return proto
