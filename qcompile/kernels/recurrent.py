"""LSTM and GRU sequences as one kernel: the time loop inside, the state in local buffers.

A recurrent layer's per-step work is small (hidden 48: a 48 x 192 mat-vec and a few
elementwise ops), so a graph of per-step operators spends its time in kernel calls and the
VM's bookkeeping, not in arithmetic (a 100-step bidirectional LSTM: ~1,200 kernel calls per
run).  This kernel runs a whole sequence in one call.  What it takes is what stays outside
it: the input projection of every step at once, ``XW = X W^T`` (one large matmul, which the
build's dense kernels and int8 quantization serve), as ``[seq, batch, dirs * G * H]``
(direction ``d``'s ``G * H`` gate columns at ``d * G * H``; ONNX gate orders ``i o f c`` and
``z r h``).  Per step it computes ``R h + Rb`` (vectorized over the ``G * H`` gate rows, a
register tile of them accumulated over the hidden units), then the gates (``XW[t] + Wb``
plus that) and the new state as ONNX defines them, with sigmoid and tanh only (the ONNX
defaults).  The input bias is added here, not after the matmul: one kernel less per run.

Arguments (``dirs`` 1 or 2, ``G`` 4 for LSTM, 3 for GRU):
``xw [seq, batch, dirs*G*H]``, ``r [dirs, H, G*H]`` (R transposed), ``wb [dirs, G*H]``,
``rb [dirs, G*H]``,
``h0 [dirs, batch, H]`` (and ``c0`` for LSTM), then one output ``[seq + S, dirs, batch, H]``:
ONNX's ``Y`` in the first ``seq`` rows, then ``Y_h`` (and ``Y_c`` for LSTM, ``S`` = 2).  One
tensor, not a tuple, so that the quantizer's report counts the kernel among the operations
left in float32.  Direction ``d`` runs backwards in time when ``reverse[d]``.

``RecurrentShape.quantized_state`` is ONNX Runtime's DynamicQuantizeLSTM recurrence: at each
step ``h`` is quantized from its own range (uint8, DynamicQuantizeLinear's scale and zero
point, round half to even) and multiplied with the integer recurrent weights, then scaled
by ``h_scale * r_scale[column]``.  ``r`` then holds the integer weights minus their zero
point (as float32: the products and their sums over at most 2^24 are exact, so the float
mat-vec is the integer GEMM), ``wb`` all of the bias (input and recurrent), and ``rb`` the
recurrent weight's scale per gate column.  Each (direction, batch row) quantizes its own
``h``, ONNX Runtime's split of the batch rows over its threads.

tanh is TVM's ``topi.fast_tanh`` rational approximation (inputs clamped to +-9, a few ULP
from ``tanh``); sigmoid is ``0.5 + 0.5 tanh(x / 2)``, which cannot overflow.  Both vectorize.
The (direction, batch row) sequences are independent and run in parallel over the cores
(each its own time loop on one core); the kernel is marked scheduled and opaque, so the
build's default schedules and operator fusion leave it as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

QUANTIZED_NAME = "qc_qlstm_sequence"  # the kernel's name with a quantized state (the report finds it)
OPAQUE = 8  # relax.transform.AnnotateTIROpPattern's kOpaque: FuseOps fuses nothing into the kernel
# topi.fast_tanh's coefficients (TVM's fast_tanh_float, from Eigen): tanh(x) ~ x p(x^2) / q(x^2)
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


@dataclass(frozen=True)
class RecurrentShape:
    """What one kernel is specialized for."""

    kind: str  # "LSTM" or "GRU"
    seq: int
    batch: int
    hidden: int
    reverse: tuple[bool, ...]  # per direction
    linear_before_reset: bool = False  # GRU only
    quantized_state: bool = False  # LSTM only: DynamicQuantizeLSTM's integer recurrence

    @property
    def gates(self) -> int:
        return 4 if self.kind == "LSTM" else 3

    @property
    def dirs(self) -> int:
        return len(self.reverse)


def fast_tanh(x):
    """tanh(x) as ``topi.fast_tanh`` computes it, on a float32 PrimExpr.  The clamped input
    appears in the expression once per use (no Let: MetaSchedule's analyses reject it); LLVM
    computes it once."""
    x = tirx.max(tirx.const(-9.0, "float32"), tirx.min(tirx.const(9.0, "float32"), x))
    x2 = x * x
    p = tirx.const(_TANH_P[0], "float32")
    for c in _TANH_P[1:]:
        p = p * x2 + tirx.const(c, "float32")
    q = tirx.const(_TANH_Q[0], "float32")
    for c in _TANH_Q[1:]:
        q = q * x2 + tirx.const(c, "float32")
    return x * p / q


def sigmoid(x):
    """1 / (1 + exp(-x)) as ``0.5 + 0.5 tanh(x / 2)``: no exp to overflow, and it vectorizes."""
    half = tirx.const(0.5, "float32")
    return half + half * fast_tanh(x * half)


def _mix(z, n, h):
    """The GRU update ``(1 - z) n + z h`` as ``n + z (h - n)``."""
    return n + z * (h - n)


def _tile(extent: int, cap: int = 64) -> int:
    """The widest power-of-two tile of at most ``cap`` lanes dividing ``extent`` (LLVM
    splits a 64-lane vector into whole AVX-512, AVX2 or NEON registers; a 48-lane one
    measured 2x slower than 16-lane ones in the GRU kernel here)."""
    return next(size for size in (64, 32, 16, 8, 4, 2, 1) if size <= cap and extent % size == 0)


def recurrent_func(shape: RecurrentShape) -> tirx.PrimFunc:
    """The scheduled kernel for ``shape`` (see the module docstring for its arguments)."""
    if shape.kind not in ("LSTM", "GRU"):
        raise ValueError(f"recurrent kernel: {shape.kind} is neither LSTM nor GRU")
    if shape.quantized_state and shape.kind != "LSTM":
        raise ValueError("recurrent kernel: a quantized state is LSTM only")
    func = _lstm(shape) if shape.kind == "LSTM" else _gru(shape)
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)


def _common(shape: RecurrentShape):
    """(seq, batch, hidden, dirs, gate rows G*H, the directions running backwards as indices
    (-1: none), the elementwise vector tile)."""
    seq, batch, hid, dirs = shape.seq, shape.batch, shape.hidden, shape.dirs
    rev0 = 0 if shape.reverse[0] else -1
    rev1 = 1 if dirs == 2 and shape.reverse[1] else -1
    return seq, batch, hid, dirs, shape.gates * hid, rev0, rev1, _tile(hid, 16)


def _rows_loop(shape: RecurrentShape):
    """The (direction, batch row) loop: over the cores where there are several rows."""
    return T.parallel if shape.dirs * shape.batch > 1 else T.serial


def _lstm(shape: RecurrentShape) -> tirx.PrimFunc:
    """The LSTM; with ``shape.quantized_state`` DynamicQuantizeLSTM's per-step quantized ``h``
    (``r`` then holds the integer weights, ``rb`` their scale per column: see the module docstring)."""
    seq, batch, hid, dirs, gh, rev0, rev1, vt = _common(shape)
    rows, rows_loop = dirs * batch, _rows_loop(shape)
    jt = _tile(gh)  # the mat-vec's register tile of gate rows
    tanh, sig = fast_tanh, sigmoid
    quantized = shape.quantized_state

    def gate(xw, wb, acc, t, b, d, k, j):
        """Gate ``k``'s pre-activation at unit ``j``: (X W^T + Wb) + (R h + Rb)."""
        return xw[t, b, d * gh + k * hid + j] + wb[d, k * hid + j] + acc[k * hid + j]

    @T.prim_func(private=True)
    def lstm(xw: T.Buffer((seq, batch, dirs * gh), "float32"), r: T.Buffer((dirs, hid, gh), "float32"),
             wb: T.Buffer((dirs, gh), "float32"), rb: T.Buffer((dirs, gh), "float32"),
             h0: T.Buffer((dirs, batch, hid), "float32"), c0: T.Buffer((dirs, batch, hid), "float32"),
             y: T.Buffer((seq + 2, dirs, batch, hid), "float32")):
        T.func_attr({"tirx.noalias": True})
        for row in rows_loop(rows):
            h = T.decl_buffer((hid,), "float32", scope="local")
            hq = T.decl_buffer((hid,), "float32", scope="local")
            c = T.decl_buffer((hid,), "float32", scope="local")
            acc = T.decl_buffer((gh,), "float32", scope="local")
            q = T.decl_buffer((4,), "float32", scope="local")  # max(0, max h), -min(0, min h), scale, zero point
            d = row // batch
            b = row % batch
            for j in T.serial(hid):
                h[j] = h0[d, b, j]
                c[j] = c0[d, b, j]
            for s in T.serial(seq):
                t = T.Select(T.Or(d == rev0, d == rev1), seq - 1 - s, s)
                if quantized:
                    # DynamicQuantizeLinear of h: s = (hi + lo) / 255 (1 where h is all zero),
                    # zp = saturate(round(lo / s)), hq = saturate(round(h / s) + zp) - zp
                    q[0] = T.float32(0)
                    q[1] = T.float32(0)
                    for j in T.serial(hid):
                        q[0] = T.max(q[0], h[j])
                        q[1] = T.max(q[1], T.float32(0) - h[j])
                    q[2] = (q[0] + q[1]) / T.float32(255)
                    q[2] = T.Select(q[2] == T.float32(0), T.float32(1), q[2])
                    q[3] = T.max(T.float32(0), T.min(T.float32(255), T.nearbyint(q[1] / q[2])))
                    for jo in T.serial(hid // vt):
                        for j in T.vectorized(jo * vt, jo * vt + vt):
                            hq[j] = T.max(T.float32(0), T.min(T.float32(255), T.nearbyint(h[j] / q[2]) + q[3])) - q[3]
                    for jo in T.serial(gh // jt):  # acc = (hq - zp) (Rq - Rzp) * s * r_scale
                        for ji in T.vectorized(jt):
                            acc[jo * jt + ji] = T.float32(0)
                        for k in T.serial(hid):
                            for ji in T.vectorized(jt):
                                acc[jo * jt + ji] = acc[jo * jt + ji] + hq[k] * r[d, k, jo * jt + ji]
                        for ji in T.vectorized(jt):
                            acc[jo * jt + ji] = acc[jo * jt + ji] * (q[2] * rb[d, jo * jt + ji])
                else:
                    for jo in T.serial(gh // jt):  # acc = R h + Rb
                        for ji in T.vectorized(jt):
                            acc[jo * jt + ji] = rb[d, jo * jt + ji]
                        for k in T.serial(hid):
                            for ji in T.vectorized(jt):
                                acc[jo * jt + ji] = acc[jo * jt + ji] + h[k] * r[d, k, jo * jt + ji]
                for jo in T.serial(hid // vt):  # gates i o f c
                    for j in T.vectorized(jo * vt, jo * vt + vt):
                        c[j] = (sig(gate(xw, wb, acc, t, b, d, 2, j)) * c[j]
                                + sig(gate(xw, wb, acc, t, b, d, 0, j)) * tanh(gate(xw, wb, acc, t, b, d, 3, j)))
                        h[j] = sig(gate(xw, wb, acc, t, b, d, 1, j)) * tanh(c[j])
                        y[t, d, b, j] = h[j]
            for j in T.serial(hid):
                y[seq, d, b, j] = h[j]
                y[seq + 1, d, b, j] = c[j]

    return lstm


def _gru(shape: RecurrentShape) -> tirx.PrimFunc:
    seq, batch, hid, dirs, gh, rev0, rev1, vt = _common(shape)
    rows, rows_loop = dirs * batch, _rows_loop(shape)
    lbr = shape.linear_before_reset
    tanh, sig, mix = fast_tanh, sigmoid, _mix
    # linear_before_reset=0 multiplies r into h before R_h: the z/r gates' mat-vec first,
    # then a second one of (r * h) with R_h
    first = gh if lbr else 2 * hid
    jt, jh = _tile(first), _tile(hid)

    def x_gate(xw, wb, t, b, d, k, j):
        """Gate ``k``'s input part at unit ``j``: X W^T + Wb."""
        return xw[t, b, d * gh + k * hid + j] + wb[d, k * hid + j]

    @T.prim_func(private=True)
    def gru(xw: T.Buffer((seq, batch, dirs * gh), "float32"), r: T.Buffer((dirs, hid, gh), "float32"),
            wb: T.Buffer((dirs, gh), "float32"), rb: T.Buffer((dirs, gh), "float32"),
            h0: T.Buffer((dirs, batch, hid), "float32"), y: T.Buffer((seq + 1, dirs, batch, hid), "float32")):
        T.func_attr({"tirx.noalias": True})
        for row in rows_loop(rows):
            h = T.decl_buffer((hid,), "float32", scope="local")
            rh = T.decl_buffer((hid,), "float32", scope="local")
            acc = T.decl_buffer((gh,), "float32", scope="local")
            d = row // batch
            b = row % batch
            for j in T.serial(hid):
                h[j] = h0[d, b, j]
            for s in T.serial(seq):
                t = T.Select(T.Or(d == rev0, d == rev1), seq - 1 - s, s)
                for jo in T.serial(first // jt):  # acc = R h + Rb (z, r and, lbr=1, h rows)
                    for ji in T.vectorized(jt):
                        acc[jo * jt + ji] = rb[d, jo * jt + ji]
                    for k in T.serial(hid):
                        for ji in T.vectorized(jt):
                            acc[jo * jt + ji] = acc[jo * jt + ji] + h[k] * r[d, k, jo * jt + ji]
                if lbr:  # n = tanh(Xh + Wbh + r * (Rh h + Rbh))
                    for jo in T.serial(hid // vt):
                        for j in T.vectorized(jo * vt, jo * vt + vt):
                            h[j] = mix(sig(x_gate(xw, wb, t, b, d, 0, j) + acc[j]),
                                       tanh(x_gate(xw, wb, t, b, d, 2, j)
                                            + sig(x_gate(xw, wb, t, b, d, 1, j) + acc[hid + j]) * acc[2 * hid + j]),
                                       h[j])
                            y[t, d, b, j] = h[j]
                else:  # n = tanh(Xh + Wbh + (r * h) Rh + Rbh)
                    for jo in T.serial(hid // vt):
                        for j in T.vectorized(jo * vt, jo * vt + vt):
                            rh[j] = sig(x_gate(xw, wb, t, b, d, 1, j) + acc[hid + j]) * h[j]
                    for jo in T.serial(hid // jh):
                        for ji in T.vectorized(jh):
                            acc[2 * hid + jo * jh + ji] = rb[d, 2 * hid + jo * jh + ji]
                        for k in T.serial(hid):
                            for ji in T.vectorized(jh):
                                acc[2 * hid + jo * jh + ji] = (acc[2 * hid + jo * jh + ji]
                                                               + rh[k] * r[d, k, 2 * hid + jo * jh + ji])
                    for jo in T.serial(hid // vt):
                        for j in T.vectorized(jo * vt, jo * vt + vt):
                            h[j] = mix(sig(x_gate(xw, wb, t, b, d, 0, j) + acc[j]),
                                       tanh(x_gate(xw, wb, t, b, d, 2, j) + acc[2 * hid + j]), h[j])
                            y[t, d, b, j] = h[j]
            for j in T.serial(hid):
                y[seq, d, b, j] = h[j]

    return gru
