"""int4 weight-only quantization of dense layers: ``matmul(x, W)`` reads a packed 4-bit weight.

What GPTQ/AWQ checkpoints, llama.cpp's Q4 and ONNX Runtime's MatMulNBits store, as a Relax
rewrite of the float model, with no calibration data (:class:`Int4WeightConfig`):

* each ``matmul(x, W)`` with a constant float32 ``W[K, N]`` (linear layers, ONNX MatMul and
  Gemm; any rank of ``x``) gets ``W`` as 4-bit signed integers, symmetric:
  ``s = max|w| / 7`` over each group of ``group_size`` consecutive input channels (K) of an
  output channel, rounded to float16, ``q = clip(round(w / s), -8, 7)``;
* the weight is stored as ``uint8 [K/2, N]``, the nibble ``q + 8`` of row ``2k`` in the low
  four bits of byte ``[k, n]`` and row ``2k + 1`` in the high four, and the scales as
  ``float16 [K/group, N]``: 4 + 16/group bits a weight (group 32: 0.14x the float32
  bytes; float32 scales would give 0.16x for no accuracy a 4-bit step can show);
* one kernel (:func:`int4_matmul_func`) computes ``y = x @ ((nibble - 8) * s)``: the weight is
  unpacked (shift, mask, subtract 8) and scaled inside the matmul's reduction, never stored
  as float32 (a separate dequantize of two constants would be folded back into a float32
  constant by the build's FoldConstant).  N is the kernel's vector axis, so the [K/2, N]
  layout makes each unpack a contiguous vector load; on CPUs the kernel comes scheduled
  (:func:`schedule_cpu`: each unpacked weight vector serves a tile of up to 8 rows), GPU
  targets get the form TVM's GPU schedules (dlight) take.
  Activations stay float32, the accumulation float32; a bias stays the float add after it.

It saves size; time only where reading the weights is the bottleneck.  A MiniLM-shaped
encoder (hidden 384, 6 layers; one thread of a Zen 5 core, CPU time per run): at 1 token
0.43 ms vs 2.3 ms float32 (the float weights are 42 MB, the int4 ones 6 MB); at 128 tokens
22 ms vs 16 ms: per multiply-add the kernel also unpacks a weight, and the float32 dense
layers run on the faster packed conv kernel (:mod:`qcompile.passes.pack_conv`).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx

from qcompile.errors import ConfigError
from qcompile.model import ImportedModel
from qcompile.passes.bindings import (
    Graph,
    const_value,
    dtype_of,
    op_name,
    readable,
    rebuild_module,
    shape_of,
)
from qcompile.quantize.config import Int4WeightConfig, QuantizationInfo
from qcompile.quantize.dynamic import _layer_names, _resolve_keep_float
from qcompile.quantize.op_tables import ANCHORS

SCHEME = "int4-weight"
QMIN, QMAX = -8, 7
SCALE_DTYPE = "float16"
ANCHOR = "int4_matmul"  # the kernel's reduction block
OPAQUE = 8  # relax.transform.AnnotateTIROpPattern's kOpaque: FuseOps fuses nothing into the kernel


@dataclass
class Int4Report:
    """The layers made int4, those kept float on request, and dense layers left float (why)."""

    layers: list[dict] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)
    float_ops: Counter = field(default_factory=Counter)


# -- the weight ----------------------------------------------------------------------------------

def quantize_int4(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8 [K, N] in [-8, 7], float16 scales [K/group, N])`` of a float ``W[K, N]``
    (see the module docstring; an all-zero group, or one too small for float16, gets scale 1)."""
    k, n = weight.shape
    groups = weight.astype(np.float32).reshape(k // group_size, group_size, n)
    amax = np.abs(groups).max(axis=1)
    scale = (amax / np.float32(QMAX)).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float16)
    q = np.clip(np.round(groups / scale.astype(np.float32)[:, None, :]), QMIN, QMAX).astype(np.int8)
    return q.reshape(k, n), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """``uint8 [K/2, N]``: ``q[2k] + 8`` in the low nibble of byte ``[k, n]``, ``q[2k+1] + 8`` in the high."""
    nibbles = (q.astype(np.int16) - QMIN).astype(np.uint8)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The int8 ``q [K, N]`` that :func:`pack_int4` packed."""
    q = np.empty((packed.shape[0] * 2, packed.shape[1]), np.int8)
    q[0::2] = (packed & 15).astype(np.int8) + QMIN
    q[1::2] = (packed >> 4).astype(np.int8) + QMIN
    return q


def dequantize_int4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 ``W[K, N]`` the kernel multiplies by: ``(nibble - 8) * float32(scale)``."""
    q = unpack_int4(packed)
    group = q.shape[0] // scale.shape[0]
    return (q.astype(np.float32) * np.repeat(scale.astype(np.float32), group, axis=0)).astype(np.float32)


# -- the kernel ----------------------------------------------------------------------------------

def int4_matmul_func(m: int, k: int, n: int, group_size: int, per_byte: bool = True) -> tirx.PrimFunc:
    """(x float32 [M, K], packed uint8 [K/2, N], scales float16 [K/group, N]) -> float32
    [M, N], the weight dequantized inside the reduction, ``x[m, k] * ((nibble - 8) * s)``.

    ``per_byte``: one reduction step per packed byte, its low nibble times ``x[m, 2k]`` plus
    its high nibble times ``x[m, 2k + 1]`` (each byte loaded once, constant shifts: the CPU
    form); else one step per ``k`` (the form TVM's GPU schedules (dlight) analyse)."""
    def dims(*values: int) -> tuple:
        return tuple(tirx.IntImm("int64", v) for v in values)  # int64 like LegalizeOps' kernels

    x = te.placeholder(dims(m, k), "float32", name="x")
    w = te.placeholder(dims(k // 2, n), "uint8", name="w_packed")
    s = te.placeholder(dims(k // group_size, n), SCALE_DTYPE, name="w_scale")
    offset = tirx.const(-QMIN, "int32")

    def nibble(byte, shift):
        bits = tirx.bitwise_and(tirx.shift_right(byte, tirx.Cast("uint8", shift)), tirx.const(15, "uint8"))
        return tirx.Cast("float32", tirx.Cast("int32", bits) - offset)

    def scale(kk, j):
        return tirx.Cast("float32", s[tirx.floordiv(kk, group_size), j])

    if per_byte:
        r = te.reduce_axis(dims(0, k // 2), "k2")

        def step(row, j):
            # the weights first (q * s is exact in float32), so that rows of a tile share them
            byte, sc = w[r, j], scale(r * 2, j)
            return x[row, r * 2] * (nibble(byte, 0) * sc) + x[row, r * 2 + 1] * (nibble(byte, 4) * sc)
    else:
        r = te.reduce_axis(dims(0, k), "k")

        def step(row, j):
            return x[row, r] * (nibble(w[tirx.floordiv(r, 2), j], tirx.floormod(r, 2) * 4) * scale(r, j))

    out = te.compute(dims(m, n), lambda row, j: te.sum(step(row, j), axis=r), name=ANCHOR)
    return te.create_prim_func([x, w, s, out])


def schedule_cpu(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """:func:`int4_matmul_func` scheduled for a CPU: a tile of up to 8 rows x ``lanes``
    output channels accumulated in registers, each unpacked weight vector used by all rows of
    the tile; tiles over the cores.  Marked scheduled and opaque: the build's default schedule
    (one row per vector, the weight unpacked again for every row) and fusion leave it as is
    (a bias add after it is a kernel of its own)."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock(ANCHOR)
    m, j, r = sch.get_loops(block)
    vec = next((v for v in (lanes, 8, 4, 2) if int(sch.get(j).extent) % v == 0), 1)
    tile = next((t for t in (8, 4, 2) if int(sch.get(m).extent) % t == 0), 1)
    m_o, m_i = sch.split(m, [None, tile])
    j_o, j_i = sch.split(j, [None, vec])
    sch.reorder(j_o, m_o, r, m_i, j_i)  # output-channel blocks outermost: their weights stay in cache
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, m_o)
    sch.parallel(sch.fuse(j_o, m_o))
    sch.unroll(m_i)
    sch.vectorize(j_i)
    init = sch.decompose_reduction(block, r)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)


# -- the float model -----------------------------------------------------------------------------

def quantize_int4_model(model: ImportedModel, config: Int4WeightConfig, target: tvm.target.Target,
                        progress: Callable[[str], None] | None = None) -> ImportedModel:
    """The float model with its dense layers on int4 weights, carrying its
    :class:`QuantizationInfo` (scheme ``int4-weight``)."""
    from qcompile.build.pipeline import phases_through, run_phases

    if model.is_quantized:
        raise ConfigError(f"model {model.source.name} is already quantized ({model.quantization.source}); "
                          "quantize the float model")
    say = progress or (lambda _m: None)
    with readable(model.source.name):
        # constants folded first: weights behind permute_dims (torch's Linear, Gemm) become constants
        mod = run_phases(model.mod, target, phases=phases_through("inference"))
        mod, report = rewrite_int4(mod, config, target)
    before = sum(layer["bytes"] for layer in report.layers)
    after = sum(layer["quantized_bytes"] for layer in report.layers)
    say(f"int4 weights: {len(report.layers)} dense layers, group {config.group_size}, "
        f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB; activations stay float32")
    for note in report.left_float:
        say(f"int4 weights: {note}")
    info = QuantizationInfo(
        source="qcompile-int4",
        scheme=SCHEME,
        config=config,
        activation_dtype="float32",
        weight_dtype="int4",
        weight_range=(QMIN, QMAX),
        layers=tuple(report.layers),
        float_layers=tuple(report.kept_float),
        float_ops=dict(report.float_ops),
        left_float=tuple(report.left_float),
    )
    return replace(model, mod=mod, quantization=info)


def rewrite_int4(mod: tvm.IRModule, config: Int4WeightConfig,
                 target: tvm.target.Target | None = None) -> tuple[tvm.IRModule, Int4Report]:
    """``main`` with every eligible dense layer on int4 weights (see the module docstring);
    for a CPU ``target`` the kernels come scheduled (:func:`schedule_cpu`)."""
    lanes = None
    if target is not None and target.kind.name == "llvm":
        from qcompile.kernels.float_conv2d import vector_lanes

        lanes = vector_lanes(target)
    graph = Graph.from_main(mod["main"])
    names = _layer_names(graph)
    keep = _resolve_keep_float(names, config.keep_float)
    report = Int4Report()
    kernels: dict = {}  # (M, K, N) -> GlobalVar: layers of one shape share one kernel
    group = config.group_size

    def rewrite(em, var, value):
        name = names.get(var)
        if name is None or not name.startswith("matmul_"):
            if op_name(value) in ANCHORS:
                report.float_ops[op_name(value)] += 1  # attention's activation x activation matmul, convs
            return None
        if name in keep or "matmul" in keep:
            report.kept_float.append(name)
            return None
        if not _eligible(value):
            report.float_ops[op_name(value)] += 1
            return None
        weight = const_value(value.args[1])
        k, n = weight.shape
        if k % group:
            report.left_float.append(f"{name} {list(weight.shape)} stays float: K = {k} is not a multiple "
                                     f"of group size {group}")
            report.float_ops[op_name(value)] += 1
            return None
        q, scale = quantize_int4(weight, group)
        if not np.all(np.isfinite(scale)):
            report.left_float.append(f"{name} stays float: its weights exceed float16 scales")
            report.float_ops[op_name(value)] += 1
            return None
        packed = pack_int4(q)
        xshape = shape_of(value.args[0])
        rows = int(np.prod(xshape[:-1]))
        if (rows, k, n) not in kernels:
            func = int4_matmul_func(rows, k, n, group, per_byte=lanes is not None)
            if lanes is not None:
                func = schedule_cpu(func, lanes)
            kernels[rows, k, n] = em.bb.add_func(func.without_attr("global_symbol"), f"qc_{ANCHOR}")
        report.layers.append({
            "name": name, "op": "matmul", "dtype": f"float32 x int4 (group {group}) -> float32",
            "weights": f"per_group {group}, {SCALE_DTYPE} scales", "shape": [int(k), int(n)],
            "group_size": group, "bytes": int(weight.nbytes),
            "quantized_bytes": int(packed.nbytes + scale.nbytes),
        })
        x = em.subst(value.args[0])
        if len(xshape) != 2:  # rows of any rank as one [M, K] product (a reshape is a view)
            x = em.emit(relax.op.reshape(x, (rows, k)))
        out = relax.call_tir(kernels[rows, k, n], [x, relax.const(packed), relax.const(scale)],
                             relax.TensorType((rows, n), "float32"))
        return out if len(xshape) == 2 else relax.op.reshape(em.emit(out), (*xshape[:-1], n))

    new = rebuild_module(mod, rewrite)
    return relax.transform.DeadCodeElimination(["main"])(new), report


def _eligible(value) -> bool:
    """A float32 ``matmul(x[..., K], W[K, N])`` with a static shape and a constant 2-D weight."""
    x, weight = value.args[0], const_value(value.args[1])
    if op_name(value) != "relax.matmul" or weight is None or weight.dtype != np.float32 or weight.ndim != 2:
        return False
    if dtype_of(x) != "float32" or str(value.attrs.out_dtype) not in ("", "void", "None", "float32"):
        return False
    try:
        return len(shape_of(x)) >= 2
    except (AttributeError, TypeError):  # a symbolic shape
        return False

