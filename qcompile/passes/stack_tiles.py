"""Small per-thread tiles on the stack instead of the workspace pool.

The kernels keep their register tiles (a conv's accumulators, the dot intrinsic's
temporaries) in "local"-scope buffers allocated inside the parallel loop.  On CPUs TVM 0.27's
``LowerTVMBuiltin`` puts small constant-size "global" buffers on the stack but lowers every
"local" one to a ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair, run once per
parallel iteration, and LLVM must then treat the tile as heap memory that may alias the
output.  On a CPU the two scopes mean the same memory, so this pass (run after TVM's
lowering, before ``LowerTVMBuiltin``) turns small "local" allocations of CPU functions into
"global" ones, which become stack slots that LLVM keeps in registers.
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx

from qcompile.passes.cpu_functions import map_cpu_functions

# LowerTVMBuiltin's stack limit (runtime::kMaxStackAlloca): larger buffers would go back
# to the workspace pool anyway
MAX_STACK_BYTES = 1024


def _tile_bytes(buffer) -> int | None:
    """Bytes of a constant-shape buffer, None if its shape is symbolic."""
    if not all(isinstance(d, tirx.IntImm) for d in buffer.shape):
        return None
    dtype = tvm.runtime.DataType(str(buffer.dtype))
    return int(np.prod([int(d) for d in buffer.shape])) * dtype.bits * dtype.lanes // 8


def _movable(buffer) -> bool:
    ty = getattr(buffer, "ty", None)
    if not isinstance(ty, tirx.buffer.BufferType) or ty.storage_scope != "local":
        return False
    size = _tile_bytes(buffer)
    return size is not None and 0 < size < MAX_STACK_BYTES


def stack_function(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its small "local" allocations in "global" scope."""
    movable = []
    tvm_ffi.structural_walk(func.body, lambda node: movable.append(node.buffer)
                            if isinstance(node, tirx.AllocBuffer) and _movable(node.buffer) else None)
    if not movable:
        return func
    replaced: list[tuple[object, object]] = []

    def remap(var):
        if not any(var.same_as(b) for b in movable):
            return var
        for old, new in replaced:
            if old.same_as(var):
                return new
        new = tirx.decl_buffer(var.shape, var.dtype, name=var.name, scope="global",
                               elem_offset=var.elem_offset, data_alignment=var.data_alignment,
                               offset_factor=var.offset_factor)
        replaced.append((var, new))
        return new

    return tvm_ffi.structural_map(func, (tvm.ir.expr.Var, remap))


@tvm.transform.module_pass(opt_level=0, name="qcompile.StackTiles")
def StackTiles(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a TVM pass)
    """:func:`stack_function` over every CPU (llvm) PrimFunc of ``mod``."""
    return map_cpu_functions(mod, stack_function)
