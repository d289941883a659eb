"""Apply a PrimFunc rewrite to every CPU (llvm-target) function of a module."""
from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import tirx


def map_cpu_functions(mod: tvm.IRModule, rewrite: Callable[[tirx.PrimFunc], tirx.PrimFunc]) -> tvm.IRModule:
    """``mod`` with ``rewrite`` applied to each PrimFunc whose target is llvm (GPU kernels and
    functions not yet bound to a target are left as they are)."""
    updates = {}
    for gvar, func in mod.functions.items():
        target = func.attrs.get("target") if isinstance(func, tirx.PrimFunc) and func.attrs else None
        if target is not None and target.kind.name == "llvm":
            updates[gvar] = rewrite(func)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
