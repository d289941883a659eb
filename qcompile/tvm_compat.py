"""Fixes to TVM 0.27's process-wide registries that qcompile's kernels rely on.

TVM marks ``round``, ``floor``, ``exp`` ... as vectorizable but not ``nearbyint`` (round half
to even: what every requantize epilogue uses), so ``VectorizeLoop`` scalarised each fused
int8 epilogue and LLVM re-vectorised it across pixels with byte-by-byte stores.  LLVM
lowers a vector nearbyint to ``vroundps``/``frintx`` directly.  Call :func:`ensure` in every
process that lowers TIR (the build, MetaSchedule's builder workers); it is idempotent.
"""
from __future__ import annotations


def ensure() -> None:
    import tvm

    if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)
