"""Runtime: load a built ``.so`` + manifest and run or benchmark it, here or over TVM RPC.

Needs TVM's runtime and numpy only (never torch or the compiler's Python stack).
"""
from __future__ import annotations

from qcompile.runtime.local import (
    BenchResult,
    CompiledModel,
    check_inputs,
    default_inputs,
)

__all__ = ["BenchResult", "CompiledModel", "check_inputs", "default_inputs", "load"]


def load(library, rpc=None) -> CompiledModel:
    """Load ``library`` (its manifest beside it) to run here, or on ``rpc``'s device."""
    return CompiledModel.load(library, rpc=rpc)
