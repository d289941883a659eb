"""Weight-only int8 embedding tables: a gather from a constant float32 table reads int8 rows.

A transformer's token embedding is a ``take(table, ids, axis=0)`` of a constant
``[vocab, dim]`` table; the integer layers do not read the table, so after PTQ it stays
float32 and is often the largest constant of a small model (hf_distilbert: 1 MB of its
1.9 M parameters).  As ONNX Runtime's ``quantize_static`` does for Gather, the table is
stored as int8 with one scale per row (symmetric, ``scale = max|row| / 127``) and only the
gathered rows are dequantized::

    take(table, ids, axis=0)
      ->  astype(take(table_q, ids, axis=0), "float32") * take(row_scale, ids, axis=0)

``row_scale`` is ``[vocab, 1]``, so it broadcasts over the row; the three ops fuse into one
kernel.  The table shrinks 4x (plus 4 bytes per row); each value moves by at most half a
step of its row, ``max|row| / 254``.  A table the model also reads in another way (tied
input/output embeddings used as a float matmul weight) keeps its float copy, and is left
as it is rather than stored twice.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import Graph, const_value, op_name, rebuild_module

# Smaller tables (a few position or type rows) save little and are often read directly.
MIN_ELEMENTS = 4096


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 table, float32 [rows, 1] scales)``: symmetric per-row int8 in [-127, 127]
    (an all-zero row gets scale 1)."""
    amax = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


def _table(value) -> np.ndarray | None:
    """The constant float32 2-D table ``value`` gathers rows of, or None."""
    if op_name(value) != "relax.take":
        return None
    table = const_value(value.args[0])
    if table is None or table.dtype != np.float32 or table.ndim != 2 or table.size < MIN_ELEMENTS:
        return None
    return table if int(value.attrs.axis) % 2 == 0 else None


def _constant_uses(func) -> dict:
    """How often each constant object occurs in ``func``."""
    uses: dict = {}

    def visit(expr) -> None:
        if const_value(expr) is not None:
            uses[expr] = uses.get(expr, 0) + 1

    relax.analysis.post_order_visit(func, visit)
    return uses


def quantize_embeddings(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[dict]]:
    """``mod`` with each row gather from a constant float32 table of at least
    :data:`MIN_ELEMENTS` values read from an int8 table with per-row scales (see the module
    docstring), and one record per table: name, shape, bytes before and after."""
    graph = Graph.from_main(mod["main"])
    uses = _constant_uses(mod["main"])
    tables: list[dict] = []

    def rewrite(em, var, value):
        table = _table(value)
        if table is None or uses.get(value.args[0], 0) != 1:
            return None
        q, scale = quantize_rows(table)
        ids, mode = em.subst(value.args[1]), str(value.attrs.mode)
        rows = em.emit(relax.op.take(relax.const(q), ids, axis=0, mode=mode), var.name + "_q")
        scales = em.emit(relax.op.take(relax.const(scale), ids, axis=0, mode=mode), var.name + "_scale")
        tables.append({"name": var.name, "op": "take", "table": list(table.shape), "dtype": "int8 -> float32",
                       "scale": "per row", "bytes": int(table.nbytes), "quantized_bytes": int(q.nbytes + scale.nbytes)})
        return relax.op.multiply(relax.op.astype(rows, "float32"), scales)

    if not any(_table(value) is not None for _, value in graph.bindings):
        return mod, []
    new = rebuild_module(mod, rewrite)
    return relax.transform.DeadCodeElimination(["main"])(new), tables
