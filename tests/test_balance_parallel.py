"""qcompile.passes.balance_parallel: parallel loops become work-stealing tasks, same results."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from qcompile.build.pipeline import tir_pipeline
from qcompile.passes.balance_parallel import BALANCED, balance_function, parallel_loops


def _rows_kernel(rows: int, cols: int):
    @T.prim_func(s_tir=True)
    def main(a: T.Buffer((rows, cols), "float32"), b: T.Buffer((rows, cols), "float32")):
        for i in T.parallel(rows):
            for j in range(cols):
                with T.sblock("b"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    b[vi, vj] = a[vi, vj] * T.float32(2) + T.Cast("float32", vi)

    return main


def _lower(func):
    lowered, *_ = tvm.tirx.get_tir_pipeline("default")
    target = tvm.target.Target("llvm").with_host("llvm")
    return lowered(tvm.tirx.transform.BindTarget(target)(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})))["main"]


@pytest.mark.parametrize("rows", [7, 64, 3, 1, 50])
def test_balanced_kernel_computes_every_row_once(rows):
    func = _rows_kernel(rows, 5)
    balanced = balance_function(_lower(func))
    parallel = parallel_loops(balanced.body)
    if rows > 1:  # one-iteration loops are left alone
        assert [int(p.extent) for p in parallel] == [rows] and BALANCED in parallel[0].annotations
        assert "qc_taken" in balanced.script()
    lib = tvm.compile(tvm.IRModule({"main": func}), "llvm", tir_pipeline=tir_pipeline())
    a = np.random.default_rng(0).standard_normal((rows, 5)).astype("float32")
    b = tvm.runtime.tensor(np.full((rows, 5), np.nan, "float32"))
    for _ in range(3):  # the counters are reset on every call
        lib["main"](tvm.runtime.tensor(a), b)
        np.testing.assert_array_equal(b.numpy(), a * 2 + np.arange(rows, dtype="float32")[:, None])


def test_loop_that_reads_back_its_output_stays_static():
    """Two tasks running one iteration at once would both add into b[i]: not rewritten."""
    @T.prim_func(s_tir=True)
    def row_sums(a: T.Buffer((9, 6), "float32"), b: T.Buffer((9,), "float32")):
        for i in T.parallel(9):
            b[i] = T.float32(0)
            for j in range(6):
                b[i] = b[i] + a[i, j]

    balanced = balance_function(_lower(row_sums))
    assert [int(p.extent) for p in parallel_loops(balanced.body)] == [9] and "qc_taken" not in balanced.script()
    lib = tvm.compile(tvm.IRModule({"main": row_sums}), "llvm", tir_pipeline=tir_pipeline())
    a = np.random.default_rng(1).standard_normal((9, 6)).astype("float32")
    b = tvm.runtime.tensor(np.zeros(9, "float32"))
    lib["main"](tvm.runtime.tensor(a), b)
    np.testing.assert_allclose(b.numpy(), a.sum(axis=1), rtol=1e-6)
