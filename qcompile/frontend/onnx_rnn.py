"""Recurrent ONNX operators before import: one fused kernel per node, or unrolled.

TVM's Relax ONNX frontend has no ``LSTM``, ``GRU`` or ``RNN`` converter (nor ONNX Runtime's
``com.microsoft::DynamicQuantizeLSTM``).  Once input shapes are fixed the sequence length is
static, and :func:`lower_recurrent` rewrites each recurrent node in one of two forms.
:func:`fusion_blocker` makes the choice, per node, in this one place:

* **Fused** (float32 ``LSTM`` and ``GRU``, both ``linear_before_reset`` values, every
  direction and layout, with or without initial states): the input projection of all steps
  becomes one ``MatMul`` (``X W^T``, both directions' weights side by side), which the
  build's dense kernels and int8 quantization take like any linear layer; the recurrence
  becomes one ``qcompile::RecurrentSequence`` node, which the importer
  (:mod:`qcompile.frontend.from_onnx`) turns into a call of the hand-scheduled kernel
  :mod:`qcompile.kernels.recurrent`: the time loop inside, per step ``R h + Rb``, the biased
  gates and the state update.  The recurrence stays float32 under int8 quantization (as ONNX
  Runtime's ``quantize_static`` leaves LSTM float).  ``DynamicQuantizeLSTM`` is fused on the
  same terms where ONNX Runtime quantizes each batch row's state apart: its input projection
  becomes the quantized-GEMM pattern below, its recurrence the kernel's ``quantized_state``
  form, which quantizes ``h`` at each step inside the time loop.
* **Unrolled** (everything else: ``RNN``; ``DynamicQuantizeLSTM`` whose state ONNX Runtime
  quantizes over several batch rows together; shorter ``sequence_lens``; peepholes; ``clip``;
  activations other than the defaults; non-float32 models): the node is rewritten into its
  definition over time steps: one MatMul of all steps' inputs with the input weights, then
  per step a MatMul with the recurrent weights, Split into gates, Sigmoid/Tanh/Mul/Add, and
  Concat of the step outputs.  :func:`unroll_recurrent` unrolls every node (a plain ONNX
  graph that ONNX Runtime runs too).

DynamicQuantizeLSTM keeps ONNX Runtime's arithmetic: each of its two GEMMs quantizes its
float operand at run time (uint8, asymmetric, from the operand's own range) and multiplies
it with the integer weights, ``float(acc) * (x_scale * w_scale)``.  The input projection
quantizes the whole sequence X at once; the recurrent one quantizes H_{t-1} afresh at every
step.  Each becomes the DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul pattern that
``quantize_dynamic`` writes for a MatMul, which the QDQ rewrite
(:mod:`qcompile.frontend.onnx_qoperator`) and :func:`qcompile.quantize.dynamic.realize_dynamic`
turn into integer kernels (in the fused form, the recurrent one is inside the kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.errors import ModelImportError

_MS = "com.microsoft"
# (domain, op_type) -> (kind, gates per step)
_RECURRENT = {
    ("", "LSTM"): ("LSTM", 4),
    ("", "GRU"): ("GRU", 3),
    ("", "RNN"): ("RNN", 1),
    (_MS, "DynamicQuantizeLSTM"): ("LSTM", 4),
}
# Activations with a parameterless ONNX operator of the same meaning.
_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# The fused form's node: (X W^T, R^T, Wb, Rb, h0[, c0]) -> (Y, Y_h[, Y_c]), see _Unroller.emit_fused
# (with quantized_state=1: (XW, Rq - Rzp, B, R_scale, h0, c0), DynamicQuantizeLSTM's recurrence).
FUSED_DOMAIN = "qcompile"
FUSED_OP = "RecurrentSequence"


def _key(node) -> tuple[str, str]:
    return ("" if node.domain == "ai.onnx" else node.domain, node.op_type)


def has_recurrent(proto) -> bool:
    """Whether the top-level graph holds an operator this module rewrites."""
    return any(_key(n) in _RECURRENT for n in proto.graph.node)


def unroll_recurrent(proto, where: str):
    """The model with every top-level LSTM/GRU/RNN/DynamicQuantizeLSTM node unrolled."""
    return _rewrite(proto, where, fuse=False)


def lower_recurrent(proto, where: str):
    """The model with each top-level recurrent node fused or unrolled, as
    :func:`fusion_blocker` decides (the module docstring describes both forms)."""
    return _rewrite(proto, where, fuse=True)


def _rewrite(proto, where: str, fuse: bool):
    if not has_recurrent(proto):
        return proto
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 -- best effort: the sequence length may still be known from the inputs
        inferred = proto
    from onnx import helper

    from qcompile.frontend.onnx_shapes import drop_unused_initializers, static_shapes

    graph = proto.graph
    builder = _Builder(graph, _opset(proto), static_shapes(inferred.graph), _dtypes(inferred.graph))
    for node in graph.node:
        if _key(node) in _RECURRENT:
            unroller = _Unroller(builder, node, where)
            if fuse and fusion_blocker(node, builder) is None:
                unroller.emit_fused()
            else:
                unroller.emit()
        else:
            builder.nodes.append(node)
    del graph.node[:]
    graph.node.extend(builder.nodes)
    drop_unused_initializers(graph)
    if not any(n.domain == _MS for n in graph.node):
        kept = [o for o in proto.opset_import if o.domain != _MS]
        del proto.opset_import[:]
        proto.opset_import.extend(kept)
    if any(n.domain == FUSED_DOMAIN for n in graph.node) and not any(
            o.domain == FUSED_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    return proto


def fusion_blocker(node, builder: _Builder) -> str | None:
    """Why ``node`` is unrolled rather than fused (None: it is fused).

    Fused: ONNX ``LSTM`` and ``GRU`` on float32 with the default activations, no ``clip``,
    no peepholes, no ``input_forget``, and no ``sequence_lens`` shorter than the sequence
    (absent, or a constant equal to it); ``DynamicQuantizeLSTM`` on the same terms where
    ONNX Runtime quantizes each batch row's state apart (:func:`_ort_rows_per_gemm`) and the
    recurrent GEMM's integer sums stay exact in float32 (at most 2^24)."""
    from onnx import helper

    domain, op = _key(node)
    quantized = (domain, op) == (_MS, "DynamicQuantizeLSTM")
    if not quantized and (domain != "" or op not in ("LSTM", "GRU")):
        return f"{domain + '::' if domain else ''}{op} is always unrolled"
    if quantized:
        why = _quantized_fusion_blocker(node, builder)
        if why:
            return why
        op = "LSTM"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    names = [n.decode() if isinstance(n, bytes) else n for n in attrs.get("activations", [])]
    defaults = [a.lower() for a in _DEFAULT_ACTIVATIONS[op]]
    if names and any(n.lower() != defaults[i % len(defaults)] for i, n in enumerate(names)):
        return f"activations {names}"
    if "clip" in attrs:
        return "clip"
    if op == "LSTM" and attrs.get("input_forget", 0):
        return "input_forget"
    inputs = list(node.input) + [""] * 8
    if op == "LSTM" and inputs[7]:
        return "peepholes"
    x = inputs[0]
    elem = builder.dtypes.get(x)
    if elem not in (None, 1):  # TensorProto.FLOAT
        return "not float32"
    shape = builder.shapes.get(x)
    if shape is None or len(shape) != 3:
        return "input shape not static"
    if inputs[4]:
        seq = shape[1] if int(attrs.get("layout", 0)) else shape[0]
        lens = builder.consts.get(inputs[4])
        if lens is None or not np.all(lens == seq):
            return "sequence_lens"
    if any(inputs[i] and inputs[i] not in builder.consts for i in (1, 2, 3)):
        return "run-time weights"
    return None


def _quantized_fusion_blocker(node, builder: _Builder) -> str | None:
    """The DynamicQuantizeLSTM-only conditions of :func:`fusion_blocker`."""
    inputs = list(node.input) + [""] * 12
    r, r_zp = builder.consts.get(inputs[2]), builder.consts.get(inputs[11]) if inputs[11] else None
    shape = builder.shapes.get(inputs[0])
    if r is None or r.ndim != 3 or shape is None or len(shape) != 3:
        return "run-time weights or input shape"
    layout = next((int(a.i) for a in node.attribute if a.name == "layout"), 0)
    batch, hidden = (shape[0] if layout else shape[1]), r.shape[1]
    if batch > 1 and _ort_rows_per_gemm(batch, hidden) != 1:
        return "the whole batch's state quantized together"
    zp = np.zeros(r.shape[0]) if r_zp is None else np.asarray(r_zp).reshape(r.shape[0], -1)[:, 0]
    largest = max(int(np.abs(r[d].astype(np.int64) - int(zp[d])).max()) for d in range(r.shape[0]))
    if hidden * 255 * largest > 2**24:
        return "recurrent sums beyond float32's exact integers"
    return None


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)


def _dtypes(graph) -> dict[str, int]:
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        out[init.name] = init.data_type
    return out


class _Builder:
    """Emits ONNX nodes and constants with fresh names, in the model's opset."""

    def __init__(self, graph, opset: int, shapes: dict, dtypes: dict) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.opset = opset
        self.shapes = shapes
        self.dtypes = dtypes
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:  # large Constant nodes stay nodes after shape folding
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                value = _constant_value(n)
                if value is not None:
                    self.consts[n.output[0]] = value
        self.taken = {i.name for i in graph.initializer} | {i.name for i in graph.input}
        self.taken |= {o for n in graph.node for o in n.output}
        self.counter = 0
        self.nodes: list = []

    def fresh(self, base: str) -> str:
        while True:
            self.counter += 1
            name = f"{base}__rnn{self.counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, value: np.ndarray, base: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or self.fresh(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def split(self, x: str, sizes: list[int], axis: int, base: str) -> list[str]:
        from onnx import helper

        outs = [self.fresh(base) for _ in sizes]
        if self.opset >= 13:
            node = helper.make_node("Split", [x, self.const(np.array(sizes, np.int64), base)], outs, axis=axis)
        else:
            node = helper.make_node("Split", [x], outs, axis=axis, split=sizes)
        self.nodes.append(node)
        return outs

    def unsqueeze(self, x: str, axes: list[int], base: str) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array(axes, np.int64), base)], base)
        return self.op("Unsqueeze", [x], base, axes=axes)


def _constant_value(node) -> np.ndarray | None:
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
    return None


@dataclass
class _QWeight:
    """A DynamicQuantizeLSTM weight of one direction: integer [K, gates*hidden], its scale (a
    scalar per tensor, or [gates*hidden] per output channel) and its scalar zero point."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


@dataclass
class _Dir:
    """One direction's weights, in the orientation the unrolled MatMuls take."""

    w_t: np.ndarray | None  # [input, gates*hidden]; None where wq is set
    r_t: np.ndarray | None  # [hidden, gates*hidden]; None where rq is set
    wb: np.ndarray  # [gates*hidden]
    rb: np.ndarray  # [gates*hidden]
    p: np.ndarray | None  # LSTM peepholes [3*hidden] (i, o, f)
    acts: list[str]
    wq: _QWeight | None = None
    rq: _QWeight | None = None


class _Unroller:
    """Rewrites one recurrent node (ONNX operator definitions, gate orders iofc / zrh)."""

    def __init__(self, b: _Builder, node, where: str) -> None:
        from onnx import helper

        self.b = b
        self.node = node
        self.where = where
        self.kind, self.gates = _RECURRENT[_key(node)]
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.label = f"{where}: {node.op_type} node {node.name!r}"
        self.base = node.name or node.op_type

    def fail(self, what: str) -> ModelImportError:
        return ModelImportError(f"{self.label}: {what}")

    def input(self, i: int) -> str:
        return self.node.input[i] if len(self.node.input) > i else ""

    def constant(self, i: int, what: str) -> np.ndarray | None:
        name = self.input(i)
        if not name:
            return None
        if name not in self.b.consts:
            raise self.fail(f"{what} ({name!r}) is computed at run time; only constant weights are unrolled")
        return self.b.consts[name]

    def emit(self) -> None:
        a = self.attrs
        direction = a.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "reverse", "bidirectional"):
            raise self.fail(f"unknown direction {direction!r}")
        reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        if self.kind == "LSTM" and a.get("input_forget", 0):
            raise self.fail("input_forget=1 (coupled input and forget gates) is not supported")
        layout = int(a.get("layout", 0))
        self.clip = float(a["clip"]) if "clip" in a else None
        x = self.input(0)
        shape = self.b.shapes.get(x)
        if shape is None or len(shape) != 3:
            raise self.fail(
                f"the shape of its input {x!r} is not static, so the sequence cannot be unrolled; "
                "fix the model's input shapes with --input-shape"
            )
        seq = shape[1] if layout else shape[0]
        self.seq, self.batch = seq, shape[0] if layout else shape[1]
        self.x_quantized: tuple[str, str, str] | None = None  # shared by both directions
        self.dtype = self._float_dtype(x)
        dirs = self._weights(len(reverse))
        if layout:
            x = self.b.op("Transpose", [x], self.base + "_x", perm=[1, 0, 2])
        masks = self._masks(seq)
        h0 = self._state(5, len(reverse), layout)
        c0 = self._state(6, len(reverse), layout) if self.kind == "LSTM" else [None] * len(reverse)
        ys, hs, cs = [], [], []
        for d, rev in enumerate(reverse):
            y, h, c = self._direction(x, seq, dirs[d], rev, h0[d], c0[d], masks)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        outs = list(self.node.output) + [""] * 3
        if outs[0]:
            y = ys[0] if len(ys) == 1 else self.b.op("Concat", ys, self.base + "_y", axis=1)
            self._output(y, outs[0], [2, 0, 1, 3] if layout else None)
        for states, name in ((hs, outs[1]), (cs, outs[2])):
            if not name:
                continue
            stacked = [self.b.unsqueeze(s, [0], self.base + "_state") for s in states]
            s = stacked[0] if len(stacked) == 1 else self.b.op("Concat", stacked, self.base + "_state", axis=0)
            self._output(s, name, [1, 0, 2] if layout else None)

    def emit_fused(self) -> None:
        """The input projection of all steps (one MatMul, both directions side by side) and
        one ``qcompile::RecurrentSequence`` node over it, which adds the biases (what
        :func:`fusion_blocker` admits)."""
        from onnx import TensorProto, helper

        b, a = self.b, self.attrs
        direction = a.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "reverse", "bidirectional"):
            raise self.fail(f"unknown direction {direction!r}")
        reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        layout = int(a.get("layout", 0))
        x = self.input(0)
        shape = self.b.shapes[x]
        self.seq, self.batch = (shape[1], shape[0]) if layout else (shape[0], shape[1])
        self.dtype = np.dtype(np.float32)
        self.x_quantized = None
        dirs = self._weights(len(reverse))
        hid, n = self.hidden, len(reverse)
        quantized = dirs[0].rq is not None
        if layout:
            x = b.op("Transpose", [x], self.base + "_x", perm=[1, 0, 2])
        if quantized:
            # DynamicQuantizeLSTM: X quantized once, per direction its integer input GEMM; the
            # kernel gets the integer R minus its zero point, all of the bias, R's scale per column
            parts = [self._int_matmul(self._quantized_input(x, None), self._qweight(d.wq, self.base + "_W"),
                                      self.base + "_xw") for d in dirs]
            xw = parts[0] if n == 1 else b.op("Concat", parts, self.base + "_xw", axis=-1)
            r_t = np.stack([d.rq.q.astype(np.float32) - np.float32(d.rq.zero_point) for d in dirs])
            wb = np.stack([d.wb + d.rb for d in dirs])
            rb = np.stack([np.broadcast_to(d.rq.scale, (self.gates * hid,)) for d in dirs]).astype(np.float32)
        else:
            w_all = np.concatenate([d.w_t for d in dirs], axis=1)  # [input, dirs * G * H]
            xw = b.op("MatMul", [x, b.const(w_all, self.base + "_W")], self.base + "_xw")
            r_t = np.stack([d.r_t for d in dirs])  # [dirs, H, G * H]
            wb, rb = np.stack([d.wb for d in dirs]), np.stack([d.rb for d in dirs])  # [dirs, G * H]
        states = []
        for i in (5, 6) if self.kind == "LSTM" else (5,):
            name = self.input(i)
            if not name:
                name = b.const(np.zeros((n, self.batch, hid), np.float32), self.base + "_zeros")
            elif layout:  # [batch, dirs, hidden] -> [dirs, batch, hidden]
                name = b.op("Transpose", [name], self.base + "_state", perm=[1, 0, 2])
            states.append(name)
        outs = [b.fresh(self.base + s) for s in ("_y", "_y_h", "_y_c")[:1 + len(states)]]
        shapes = [[self.seq, n, self.batch, hid]] + [[n, self.batch, hid]] * len(states)
        for name, dims in zip(outs, shapes):  # for the shape inference of later rewrites
            b.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        b.nodes.append(helper.make_node(
            FUSED_OP, [xw, b.const(r_t, self.base + "_R"), b.const(wb, self.base + "_Wb"),
                       b.const(rb, self.base + "_Rb"), *states], outs,
            name=self.node.name, domain=FUSED_DOMAIN, kind=self.kind, hidden_size=hid,
            reverse=[int(r) for r in reverse], quantized_state=int(quantized),
            linear_before_reset=int(a.get("linear_before_reset", 0)) if self.kind == "GRU" else 0))
        wanted = list(self.node.output) + [""] * 3
        if wanted[0]:
            self._output(outs[0], wanted[0], [2, 0, 1, 3] if layout else None)
        for out, name in zip(outs[1:], wanted[1:3]):
            if name:
                self._output(out, name, [1, 0, 2] if layout else None)

    def _dynamic_quantize(self, x: str, base: str) -> tuple[str, str, str]:
        """(uint8 tensor, scale, zero point) of ``x`` from its own range, as ONNX Runtime's
        quantized GEMM computes them (DynamicQuantizeLinear's definition)."""
        from onnx import helper

        outs = [self.b.fresh(base + s) for s in ("_q", "_scale", "_zp")]
        self.b.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], outs))
        return outs[0], outs[1], outs[2]

    def _quantized_input(self, x: str, masks: list[str] | None) -> tuple[str, str, str]:
        """X quantized once, all steps together (ONNX Runtime's input GEMM over the sequence)."""
        if self.x_quantized is None:
            if masks is not None:
                # ONNX Runtime quantizes only the steps up to the longest sequence.  Zeros in the
                # steps after it leave the range (which always holds 0) as it is, and no output
                # reads those steps.
                b = self.b
                lens = b.op("Cast", [self.input(4)], self.base + "_lens", to=7)
                longest = b.op("ReduceMax", [lens], self.base + "_lens", keepdims=0)
                steps = b.const(np.arange(self.seq, dtype=np.int64).reshape(-1, 1, 1), "t")
                live = b.op("Less", [steps, longest], self.base + "_live")
                x = b.op("Where", [live, x, b.const(np.array(0, self.dtype), "zero")], self.base + "_x")
            self.x_quantized = self._dynamic_quantize(x, self.base + "_x")
        return self.x_quantized

    def _int_matmul(self, xq: tuple[str, str, str], w: tuple[str, str, str], base: str) -> str:
        """``float(MatMulInteger(xq, Wq)) * (x_scale * w_scale)``: quantize_dynamic's MatMul."""
        b = self.b
        acc = b.op("MatMulInteger", [xq[0], w[0], xq[2], w[2]], base + "_acc")
        acc = b.op("Cast", [acc], base + "_acc", to=1)
        return b.op("Mul", [acc, b.op("Mul", [xq[1], w[1]], base + "_scale")], base)

    def _qweight(self, qw: _QWeight, base: str) -> tuple[str, str, str]:
        """(weight, scale, zero point) constants of one direction's integer weight."""
        b = self.b
        return b.const(qw.q, base), b.const(qw.scale, base + "_scale"), b.const(qw.zero_point, base + "_zp")

    def _recurrent(self, h: str, r_all: str | None, rq: tuple[str, str, str] | None) -> str:
        """H_{t-1} R: float, or quantized per step in ONNX Runtime's row groups."""
        b, base = self.b, self.base + "_hr"
        if rq is None:
            return b.op("MatMul", [h, r_all], base)
        rows = _ort_rows_per_gemm(self.batch, self.hidden)
        if rows >= self.batch:
            return self._int_matmul(self._dynamic_quantize(h, base), rq, base)
        sizes = [min(rows, self.batch - i) for i in range(0, self.batch, rows)]
        parts = [self._int_matmul(self._dynamic_quantize(p, base), rq, base) for p in b.split(h, sizes, 0, base)]
        return b.op("Concat", parts, base, axis=0)

    def _output(self, value: str, name: str, perm: list[int] | None) -> None:
        if perm:
            self.b.op("Transpose", [value], name, out=name, perm=perm)
        else:
            self.b.op("Identity", [value], name, out=name)

    def _float_dtype(self, x: str) -> np.dtype:
        from onnx import helper

        elem = self.b.dtypes.get(x)
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype(np.float32)

    def _activations(self, n_dirs: int) -> list[list[str]]:
        per_dir = len(_DEFAULT_ACTIVATIONS[self.kind])
        names = self.attrs.get("activations")
        if not names:
            return [list(_DEFAULT_ACTIVATIONS[self.kind]) for _ in range(n_dirs)]
        names = [n.decode() if isinstance(n, bytes) else n for n in names]
        if len(names) != per_dir * n_dirs:
            raise self.fail(f"expects {per_dir * n_dirs} activations, the node lists {names}")
        ops = []
        for n in names:
            if n.lower() not in _ACTIVATIONS:
                raise self.fail(
                    f"activation {n!r} is not supported (only {', '.join(sorted(set(_ACTIVATIONS.values())))}); "
                    "re-export the model with the default activations"
                )
            ops.append(_ACTIVATIONS[n.lower()])
        return [ops[i * per_dir:(i + 1) * per_dir] for i in range(n_dirs)]

    def _weights(self, n_dirs: int) -> list[_Dir]:
        g = self.gates
        w = self.constant(1, "W")
        r = self.constant(2, "R")
        quantized = _key(self.node)[0] == _MS  # W [dirs, input, 4H], R [dirs, hidden, 4H], integer
        hidden = r.shape[1] if quantized else r.shape[-1]
        if int(self.attrs.get("hidden_size", hidden)) != hidden or w.shape[0] != n_dirs or r.shape[0] != n_dirs:
            raise self.fail(f"W {list(w.shape)} / R {list(r.shape)} do not match hidden_size and direction")
        if quantized:
            wq = self._quantized_weight(w, 8, "W", n_dirs, g * hidden)
            rq = self._quantized_weight(r, 10, "R", n_dirs, g * hidden)
        bias = self.constant(3, "B")
        if bias is None:
            bias = np.zeros((n_dirs, 2 * g * hidden), self.dtype)
        peep = self.constant(7, "P") if self.kind == "LSTM" else None
        acts = self._activations(n_dirs)
        dirs = []
        for d in range(n_dirs):
            dirs.append(_Dir(
                w_t=None if quantized else w[d].T.astype(self.dtype),
                r_t=None if quantized else r[d].T.astype(self.dtype),
                wb=bias[d, :g * hidden].astype(self.dtype), rb=bias[d, g * hidden:].astype(self.dtype),
                p=None if peep is None else peep[d].astype(self.dtype), acts=acts[d],
                wq=wq[d] if quantized else None, rq=rq[d] if quantized else None,
            ))
        self.hidden = hidden
        return dirs

    def _quantized_weight(self, q: np.ndarray, i: int, what: str, n_dirs: int, channels: int) -> list[_QWeight]:
        """Per direction, the integer weight and its scale/zero point: [dirs] (per tensor) or
        [dirs, 4H] (per output channel), the shapes ONNX Runtime's kernel accepts."""
        scale = self.constant(i, f"{what}_scale")
        zp = self.constant(i + 1, f"{what}_zero_point")
        if scale is None or q.dtype not in (np.int8, np.uint8):
            raise self.fail(f"{what} must be int8/uint8 with a constant {what}_scale")
        zp = np.zeros(scale.shape, q.dtype) if zp is None else zp.astype(q.dtype)
        if scale.shape not in ((n_dirs,), (n_dirs, channels)) or zp.shape != scale.shape:
            raise self.fail(f"{what}_scale {list(scale.shape)} / {what}_zero_point {list(zp.shape)} are neither "
                            f"[{n_dirs}] nor [{n_dirs}, {channels}]")
        # ONNX Runtime's GEMM takes one zero point per direction, the first (it requires them all
        # equal, and zero for int8).
        return [_QWeight(q[d], scale[d].astype(np.float32), zp[d].reshape(-1)[:1].reshape(())) for d in range(n_dirs)]

    def _masks(self, seq: int) -> list[str] | None:
        """Per step a [batch, 1] bool 'step < sequence_lens', or None where every sequence is full."""
        lens = self.input(4)
        if not lens:
            return None
        value = self.b.consts.get(lens)
        if value is not None and np.all(value == seq):
            return None
        # Shorter sequences keep their state past their end and output zeros there; the reverse
        # direction, starting from the last step, then first moves at each sequence's own end.
        lens64 = self.b.op("Cast", [lens], self.base + "_lens", to=7)
        lens_col = self.b.unsqueeze(lens64, [1], self.base + "_lens")
        return [self.b.op("Less", [self.b.const(np.array(t, np.int64), "t"), lens_col], self.base + "_mask")
                for t in range(seq)]

    def _state(self, i: int, n_dirs: int, layout: int) -> list[str | None]:
        name = self.input(i)
        if not name:
            return [None] * n_dirs
        if layout:  # [batch, dirs, hidden] -> [dirs, batch, hidden]
            name = self.b.op("Transpose", [name], self.base + "_h0", perm=[1, 0, 2])
        return [self.b.op("Gather", [name, self.b.const(np.array(d, np.int64), "dir")], self.base + "_h0", axis=0)
                for d in range(n_dirs)]

    def _act(self, op: str, x: str, clip: bool = True) -> str:
        if clip and self.clip is not None:  # clipping bounds the activations' inputs
            c = self.clip
            x = self.b.op("Min", [x, self.b.const(np.array(c, self.dtype), "clip")], self.base + "_clip")
            x = self.b.op("Max", [x, self.b.const(np.array(-c, self.dtype), "clip")], self.base + "_clip")
        return self.b.op(op, [x], self.base + "_" + op.lower())

    def _direction(self, x: str, seq: int, w: _Dir, reverse: bool, h: str | None, c: str | None,
                   masks: list[str] | None) -> tuple[str, str, str | None]:
        b, base, hid = self.b, self.base, self.hidden
        gru_lbr = self.kind == "GRU" and int(self.attrs.get("linear_before_reset", 0))
        # Bias folded into the input projection: all of it, except GRU's hidden-gate
        # recurrent bias which sits inside r * (...) with linear_before_reset.
        x_bias = w.wb + w.rb
        if self.kind == "GRU" and gru_lbr:
            x_bias = w.wb + np.concatenate([w.rb[:2 * hid], np.zeros(hid, self.dtype)])
        if w.wq is not None:
            xw = self._int_matmul(self._quantized_input(x, masks), self._qweight(w.wq, base + "_W"), base + "_xw")
        else:
            xw = b.op("MatMul", [x, b.const(w.w_t, base + "_W")], base + "_xw")
        xw = b.op("Add", [xw, b.const(x_bias, base + "_B")], base + "_xw")
        r_q = self._qweight(w.rq, base + "_R") if w.rq is not None else None
        if r_q is not None:
            r_all = None
        elif self.kind == "GRU" and not gru_lbr:
            r_zr = b.const(w.r_t[:, :2 * hid], base + "_Rzr")
            r_h = b.const(w.r_t[:, 2 * hid:], base + "_Rh")
        else:
            r_all = b.const(w.r_t, base + "_R")
        rb_h = b.const(w.rb[2 * hid:], base + "_Rbh") if gru_lbr else None
        peep = None
        if w.p is not None:
            peep = [b.const(w.p[k * hid:(k + 1) * hid], base + "_P") for k in range(3)]  # i, o, f
        f, g = w.acts[0], w.acts[-2 if self.kind == "LSTM" else -1]
        steps = range(seq - 1, -1, -1) if reverse else range(seq)
        ys: dict[int, str] = {}
        for t in steps:
            xt = b.op("Gather", [xw, b.const(np.array(t, np.int64), "t")], base + "_xt", axis=0)
            if self.kind == "LSTM":
                gates = xt if h is None else b.op("Add", [xt, self._recurrent(h, r_all, r_q)], base + "_g")
                gi, go, gf, gc = b.split(gates, [hid] * 4, 1, base + "_gate")
                if peep is not None and c is not None:
                    gi = b.op("Add", [gi, b.op("Mul", [peep[0], c], base + "_pi")], base + "_gi")
                    gf = b.op("Add", [gf, b.op("Mul", [peep[2], c], base + "_pf")], base + "_gf")
                i_t = self._act(f, gi)
                c_new = b.op("Mul", [i_t, self._act(g, gc)], base + "_ic")
                if c is not None:
                    f_t = self._act(f, gf)
                    c_new = b.op("Add", [b.op("Mul", [f_t, c], base + "_fc"), c_new], base + "_c")
                if peep is not None:
                    go = b.op("Add", [go, b.op("Mul", [peep[1], c_new], base + "_po")], base + "_go")
                o_t = self._act(f, go)
                # The cell state is not clipped before h (ONNX Runtime's reading of the spec).
                h_new = b.op("Mul", [o_t, self._act(w.acts[2], c_new, clip=False)], base + "_h")
            elif self.kind == "GRU":
                xz, xr, xh = b.split(xt, [hid] * 3, 1, base + "_gate")
                if h is None:  # zero state: the recurrent terms vanish, except lbr's bias
                    z = self._act(f, xz)
                    r = self._act(f, xr)
                    pre = xh if not gru_lbr else b.op("Add", [xh, b.op("Mul", [r, rb_h], base + "_rh")], base + "_n")
                    n = self._act(g, pre)
                    h_new = b.op("Sub", [n, b.op("Mul", [z, n], base + "_zn")], base + "_h")
                else:
                    if gru_lbr:
                        hz, hr, hh = b.split(b.op("MatMul", [h, r_all], base + "_hr"), [hid] * 3, 1, base + "_hg")
                        hh = b.op("Add", [hh, rb_h], base + "_hh")
                    else:
                        hz, hr = b.split(b.op("MatMul", [h, r_zr], base + "_hr"), [hid] * 2, 1, base + "_hg")
                    z = self._act(f, b.op("Add", [xz, hz], base + "_z"))
                    r = self._act(f, b.op("Add", [xr, hr], base + "_r"))
                    if gru_lbr:
                        rec = b.op("Mul", [r, hh], base + "_rh")
                    else:
                        rec = b.op("MatMul", [b.op("Mul", [r, h], base + "_rh"), r_h], base + "_rhR")
                    n = self._act(g, b.op("Add", [xh, rec], base + "_n"))
                    # (1 - z) * n + z * h == n + z * (h - n)
                    diff = b.op("Sub", [h, n], base + "_d")
                    h_new = b.op("Add", [n, b.op("Mul", [z, diff], base + "_zd")], base + "_h")
                c_new = None
            else:
                pre = xt if h is None else b.op("Add", [xt, b.op("MatMul", [h, r_all], base + "_hr")], base + "_g")
                h_new = self._act(f, pre)
                c_new = None
            if masks is not None:
                zero = b.const(np.array(0, self.dtype), "zero")
                ys[t] = b.op("Where", [masks[t], h_new, zero], base + "_y")
                h_new = b.op("Where", [masks[t], h_new, h or zero], base + "_h")
                if c_new is not None:
                    c_new = b.op("Where", [masks[t], c_new, c or zero], base + "_c")
            else:
                ys[t] = h_new
            h, c = h_new, c_new
        # Y of one direction: [seq, 1, batch, hidden] in time order.
        steps_y = [b.unsqueeze(ys[t], [0, 1], base + "_yt") for t in range(seq)]
        y = steps_y[0] if seq == 1 else b.op("Concat", steps_y, base + "_y", axis=0)
        return y, h, c


def convert_fused(bb, inputs: list, attrs: dict):
    """The Relax form of a ``qcompile::RecurrentSequence`` node: ``call_tir`` of
    :func:`qcompile.kernels.recurrent.recurrent_func`, a tuple of its outputs."""
    from tvm import relax

    from qcompile.kernels.recurrent import (
        QUANTIZED_NAME,
        RecurrentShape,
        recurrent_func,
    )

    kind = attrs["kind"].decode() if isinstance(attrs["kind"], bytes) else attrs["kind"]
    reverse = attrs["reverse"]
    reverse = tuple(bool(r) for r in (reverse if isinstance(reverse, (list, tuple)) else [reverse]))
    xw = inputs[0]
    seq, batch = (int(v) for v in xw.ty.shape.values[:2])
    hidden = int(attrs["hidden_size"])
    shape = RecurrentShape(kind, seq, batch, hidden, reverse, bool(attrs.get("linear_before_reset", 0)),
                           bool(attrs.get("quantized_state", 0)))
    name = QUANTIZED_NAME if shape.quantized_state else f"qc_{kind.lower()}_sequence"
    func = bb.add_func(recurrent_func(shape), name)
    dirs, states = shape.dirs, 2 if kind == "LSTM" else 1
    out = bb.emit(relax.call_tir(func, list(inputs), relax.TensorType((seq + states, dirs, batch, hidden), "float32")))
    # Y, then the final states, from the kernel's one output
    parts = [bb.emit(relax.op.strided_slice(out, [0], [0], [seq]))]
    for i in range(states):
        row = bb.emit(relax.op.strided_slice(out, [0], [seq + i], [seq + i + 1]))
        parts.append(bb.emit(relax.op.reshape(row, (dirs, batch, hidden))))
    return relax.Tuple(parts)


def _ort_rows_per_gemm(batch: int, hidden: int) -> int:
    """The rows of H_{t-1} that ONNX Runtime's LSTM quantizes together at each step.

    Its kernel splits the batch across the intra-op threads where ``batch > 4`` or
    ``batch >= 2 and hidden <= 256``, each thread quantizing its own ``ceil(batch / threads)``
    rows; otherwise one GEMM quantizes the whole batch.  The thread count is the runtime's,
    not the model's: the split is taken as one row per thread, what ONNX Runtime does once it
    has at least ``batch`` threads (always for batch 1)."""
    return 1 if batch > 4 or (batch >= 2 and hidden <= 256) else batch
