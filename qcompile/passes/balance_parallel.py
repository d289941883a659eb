"""Balance each kernel's parallel loop over the cores at run time.

TVM lowers ``for i in parallel(N)`` to one contiguous chunk of ``i`` per thread, fixed at
launch, so a kernel lasts as long as its slowest thread.  Cores do not run at one speed:
on the 2-vCPU VM this project is built on, each vCPU's single-thread speed moved by 10-15%
from one 0.4-s window to the next, independently of the other, and ONNX Runtime (whose
thread pool hands out work dynamically) slowed down less than qcompile in those phases.

This TIR pass (run after TVM's lowering, on CPU targets) rewrites an outermost parallel
loop into ``tasks`` parallel tasks.  Task ``t`` first runs the contiguous range of ``i`` the
static split would give it (so each core still reads the rows or weights the schedule meant
it to), in order; then it runs what is left of the other tasks' ranges from their ends.
TVM 0.27's CPU backend has no atomic add, so an iteration is claimed with a plain flag
(``qc_taken[i]``, checked then set): two tasks can both take the same iteration when they
meet, and both then compute it.  That is harmless only when an iteration is idempotent --
it writes memory that no iteration reads (the tile of a conv's output, a row of a padded
copy) -- so a loop is rewritten only then; a loop that reads back what it writes (an
accumulator kept in the output, as TVM's default matmul does) or calls out is left static.
This is idempotent work stealing (Michael, Vechev, Saraswat, PPoPP 2009).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

DEFAULT_TASKS = 8  # when the target does not say how many cores it has
BALANCED = "qcompile.balanced"  # marks a rewritten loop
_OPAQUE_CALLS = ("call_packed", "call_cpacked", "call_extern", "call_pure_extern", "atomic")


def _int32(value: int) -> tirx.IntImm:
    return tirx.IntImm("int32", value)


def balanced_loop(loop: tirx.For, tasks: int) -> tirx.Stmt:
    """``loop`` (parallel, constant extent, idempotent iterations) as ``tasks`` parallel
    tasks that run their own range, then steal from the others' ends."""
    extent = int(loop.extent)
    taken = tirx.decl_buffer((extent,), "int8", name="qc_taken")
    k, j = tirx.Var("qc_k", "int32"), tirx.Var("qc_j", "int32")
    task, offset = tirx.Var("qc_task", "int32"), tirx.Var("qc_offset", "int32")

    def start(range_index):  # the first iteration of a task's own range
        return tirx.floordiv(range_index * _int32(extent), _int32(tasks))

    victim = tirx.floormod(task + offset, _int32(tasks))
    first, end = start(victim), start(victim + 1)
    index = tirx.Select(offset == 0, first + j, end - 1 - j)  # own range forwards, others backwards
    iteration = tirx.SeqStmt([
        tirx.BufferStore(taken, tirx.IntImm("int8", 1), [index]),
        tirx.Bind(loop.loop_var, loop.min + tirx.Cast(str(loop.loop_var.ty.dtype), index)),
        loop.body,
    ])
    run = tirx.For(offset, _int32(0), _int32(tasks), tirx.ForKind.SERIAL,
                   tirx.For(j, _int32(0), end - first, tirx.ForKind.SERIAL,
                            tirx.IfThenElse(tirx.BufferLoad(taken, [index]) == tirx.IntImm("int8", 0),
                                            iteration, None)))
    return tirx.SeqStmt([
        tirx.AllocBuffer(taken),
        tirx.For(k, _int32(0), _int32(extent), tirx.ForKind.SERIAL,
                 tirx.BufferStore(taken, tirx.IntImm("int8", 0), [k])),
        tirx.For(task, _int32(0), _int32(tasks), tirx.ForKind.PARALLEL, run, annotations={BALANCED: _int32(1)}),
    ])


def _aliases(func: tirx.PrimFunc) -> list[tuple[object, object]]:
    """(buffer, the buffer whose memory it declares a view of) for each aliasing DeclBuffer."""
    pairs = []

    def visit(node):
        data = getattr(node, "data", None) if isinstance(node, tirx.DeclBuffer) else None
        if isinstance(data, tvm.ir.expr.Call) and data.op.name == "tirx.buffer_data":
            pairs.append((node.buffer, data.args[0]))

    tvm_ffi.structural_walk(func.body, visit)
    return pairs


def _root(buffer, aliases) -> object:
    for view, base in aliases:
        if view.same_as(buffer):
            return _root(base, aliases)
    return buffer


def idempotent(loop: tirx.For, aliases) -> bool:
    """Whether running an iteration of ``loop`` twice, concurrently, is harmless: no
    iteration reads memory that the loop writes (outside its own private allocations), and
    the loop calls nothing opaque."""
    stored, loaded, private, opaque = [], [], [], []

    def visit(node):
        if isinstance(node, tirx.BufferStore):
            stored.append(node.buffer)
        elif isinstance(node, tvm.ir.expr.TensorLoad):  # what tirx.BufferLoad builds
            loaded.append(node.source)
        elif isinstance(node, tirx.AllocBuffer):
            private.append(node.buffer)
        elif isinstance(node, tvm.ir.expr.Call) and hasattr(node.op, "name") and any(
                name in node.op.name for name in _OPAQUE_CALLS):
            opaque.append(node)

    tvm_ffi.structural_walk(loop.body, visit)
    if opaque:
        return False
    shared = [_root(b, aliases) for b in stored if not any(b.same_as(p) for p in private)]
    reads = [_root(b, aliases) for b in loaded]
    return not any(s.same_as(r) for s in shared for r in reads)


def _has_parallel(stmt) -> bool:
    found = []
    tvm_ffi.structural_walk(stmt, lambda node: found.append(1)
                            if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL else None)
    return bool(found)


def balance_function(func: tirx.PrimFunc, tasks: int) -> tirx.PrimFunc:
    """``func`` with each outermost, constant-extent, idempotent parallel loop balanced
    (nested parallel loops, which TVM runs serially inside the outer one, are left as
    they are)."""
    aliases = _aliases(func)

    def rewrite(node):
        if (isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL
                and isinstance(node.extent, tirx.IntImm) and int(node.extent) > 1
                and BALANCED not in (node.annotations or {}) and not _has_parallel(node.body)
                and idempotent(node, aliases)):
            return balanced_loop(node, tasks)
        return node

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, rewrite)))


@tvm.transform.module_pass(opt_level=0, name="qcompile.BalanceParallel")
def BalanceParallel(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a TVM pass)
    """The pass over every CPU PrimFunc of ``mod``; ``tasks`` = the target's ``num-cores``."""
    updates = {}
    for gvar, func in mod.functions.items():
        target = func.attrs.get("target") if isinstance(func, tirx.PrimFunc) and func.attrs else None
        if target is None or target.kind.name != "llvm":
            continue
        cores = int(target.attrs.get("num-cores", 0) or 0)
        updates[gvar] = balance_function(func, cores if cores > 1 else DEFAULT_TASKS)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
