"""Per-kernel time profile of a loaded library: where a model's time goes.

TVM 0.27's Relax VM has no profiler in its Python API; its instrument hook (called before
and after every call the VM makes) times each kernel call here.  The hook itself costs about
a microsecond per call, so kernels of a few microseconds read high; the shares of the large
kernels -- the ones worth acting on -- are what it is for.  VM bookkeeping (allocations,
shape checks) is one row, ``vm.builtin (allocation, checks)``.  Local libraries only: the
hook is a Python function.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

VM_BUILTIN = "vm.builtin (allocation, checks)"


@dataclass(frozen=True)
class KernelTime:
    """One kernel's time per model run (``ms``), its calls per run and share of the total."""

    name: str
    calls: float
    ms: float
    share: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "calls": self.calls, "ms": round(self.ms, 5), "share": round(self.share, 5)}


def profile_vm(vm, invoke, runs: int, warmup: int = 2) -> list[KernelTime]:
    """Time each call ``vm`` makes over ``runs`` calls of ``invoke()`` (after ``warmup``
    untimed ones, the first instrumented among them): per kernel the median over runs of its
    time in a run, slowest first."""
    run_totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: dict[str, list[float]] = {}

    def instrument(func, symbol, before_run, ret_value, *args) -> int:
        name = VM_BUILTIN if str(symbol).startswith("vm.builtin.") else str(symbol)
        if before_run:
            started.setdefault(name, []).append(time.perf_counter())
        else:
            run_totals[name] = run_totals.get(name, 0.0) + time.perf_counter() - started[name].pop()
            calls[name] = calls.get(name, 0) + 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    for _ in range(warmup):
        invoke()
    per_run: dict[str, list[float]] = {}
    vm.set_instrument(instrument)
    try:
        invoke()  # the hook's own first call is slow: not counted
        run_totals.clear()
        calls.clear()
        for _ in range(runs):
            invoke()
            for name, t in run_totals.items():
                per_run.setdefault(name, []).append(t)
            run_totals.clear()
    finally:
        vm.set_instrument(None)
    medians = {name: sorted(ts)[len(ts) // 2] for name, ts in per_run.items()}
    whole = sum(medians.values()) or 1.0
    rows = [KernelTime(name, calls[name] / runs, 1000.0 * t, t / whole) for name, t in medians.items()]
    return sorted(rows, key=lambda r: -r.ms)
