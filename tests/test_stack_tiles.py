"""qcompile.passes.stack_tiles: small "local" tiles go on the stack, same results."""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from qcompile.build.pipeline import tir_pipeline
from qcompile.passes.stack_tiles import StackTiles


def _tile_kernel(tile: int):
    """Each of 6 parallel rows goes through a ``tile``-element "local" buffer."""
    @T.prim_func(s_tir=True)
    def main(a: T.Buffer((6, tile), "float32"), b: T.Buffer((6, tile), "float32")):
        for i in T.parallel(6):
            acc = T.alloc_buffer((tile,), "float32", scope="local")
            for j in range(tile):
                acc[j] = a[i, j] * T.float32(3)
            for j in range(tile):
                b[i, j] = acc[j] + T.float32(1)

    return main


def _finalized(func, stack: bool = True) -> str:
    """The host code after TVM's lowering, our pass (if ``stack``) and LowerTVMBuiltin."""
    lower, finalize_host, _ = tvm.tirx.get_tir_pipeline("default")
    target = tvm.target.Target("llvm").with_host("llvm")
    mod = tvm.tirx.transform.BindTarget(target)(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    lowered = lower(mod)
    return finalize_host()(StackTiles(lowered) if stack else lowered).script()


def test_small_tile_leaves_the_workspace_pool():
    func = _tile_kernel(8)
    assert "TVMBackendAllocWorkspace" in _finalized(func, stack=False)  # what the pass is for
    assert "TVMBackendAllocWorkspace" not in _finalized(func)

    lib = tvm.compile(tvm.IRModule({"main": func}), "llvm", tir_pipeline=tir_pipeline())
    a = np.random.default_rng(0).standard_normal((6, 8)).astype("float32")
    b = tvm.runtime.tensor(np.zeros((6, 8), "float32"))
    lib["main"](tvm.runtime.tensor(a), b)
    np.testing.assert_allclose(b.numpy(), a * 3 + 1, rtol=1e-6)


def test_large_tile_stays_in_the_workspace_pool():
    """1024 bytes and more would overflow TVM's stack limit: left to the workspace pool."""
    func = _tile_kernel(256)  # 1 KiB of float32
    assert "TVMBackendAllocWorkspace" in _finalized(func)
    lib = tvm.compile(tvm.IRModule({"main": func}), "llvm", tir_pipeline=tir_pipeline())
    a = np.random.default_rng(1).standard_normal((6, 256)).astype("float32")
    b = tvm.runtime.tensor(np.zeros((6, 256), "float32"))
    lib["main"](tvm.runtime.tensor(a), b)
    np.testing.assert_allclose(b.numpy(), a * 3 + 1, rtol=1e-6)
