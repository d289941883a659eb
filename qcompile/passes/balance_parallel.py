"""Balance each kernel's parallel loop over the cores at run time.

TVM lowers ``for i in parallel(N)`` to one contiguous chunk of ``i`` per thread, fixed at
launch, so a kernel lasts as long as its slowest thread.  Cores do not run at one speed:
on shared 2-vCPU VMs each vCPU's single-thread speed can move by 10-15% from one 0.4-s
window to the next, independently of the other; a thread pool that hands out work
dynamically (ONNX Runtime's) loses less in those phases than a static split.

This TIR pass (run after TVM's lowering, on CPU targets) keeps TVM's split -- each thread
still runs its chunk in order, so each core reads the rows or weights the schedule meant it
to -- and adds stealing: a thread that has run the last iteration of its chunk goes to the
end of the loop and, walking back, skips what is done and runs iterations that nobody has
taken, until it meets one that is taken (the owner's progress).  TVM 0.27's CPU backend has
no atomic add, so an iteration is claimed with a plain flag (``qc_taken[i]``, checked then
set): a thief and the owner can both take the iteration where they meet, and both compute
it.  That is harmless only when an iteration is idempotent -- it writes memory that no
iteration reads (the tile of a conv's output, a row of a padded copy) -- so a loop is
rewritten only then; a loop that reads back what it writes (an accumulator kept in the
output, as TVM's default matmul does) or calls out is left as it is.  This is idempotent
work stealing (Michael, Vechev, Saraswat, PPoPP 2009).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from qcompile.passes.cpu_functions import map_cpu_functions

BALANCED = "qcompile.balanced"  # marks a rewritten loop
_OPAQUE_CALLS = ("call_packed", "call_cpacked", "call_extern", "call_pure_extern", "atomic")
_OWN, _SKIP, _TAKE, _DONE = 0, 1, 2, 3  # a task's stealing state


def _int32(value) -> tirx.IntImm:
    return tirx.IntImm("int32", value)


def balanced_loop(loop: tirx.For) -> tirx.Stmt:
    """``loop`` (parallel, constant extent, idempotent iterations) with stealing added."""
    extent = int(loop.extent)
    taken = tirx.decl_buffer((extent,), "int8", name="qc_taken")
    # next, mode, scan position; "global" scope: TVM puts small global buffers on the stack
    # but allocates "local" ones from the workspace pool, a call per task
    state = tirx.decl_buffer((3,), "int32", name="qc_state")
    task, k = tirx.Var("qc_task", "int32"), tirx.Var("qc_k", "int32")
    nxt, mode, pos = (tirx.BufferLoad(state, [_int32(i)]) for i in range(3))

    def put(slot: int, value) -> tirx.Stmt:
        return tirx.BufferStore(state, value if not isinstance(value, int) else _int32(value), [_int32(slot)])

    def is_free(index):
        return tirx.BufferLoad(taken, [index]) == tirx.IntImm("int8", 0)

    # after its own iteration: steal if that was the last of this thread's chunk (the next one
    # is taken: another thread started there, or a thief got there)
    chunk_ended = tirx.IfThenElse(
        tirx.Or(task + 1 >= _int32(extent), tirx.Not(is_free(tirx.min(task + 1, _int32(extent - 1))))),
        tirx.SeqStmt([put(1, _SKIP), put(2, _int32(extent - 1))]), None)
    scan = tirx.While(
        tirx.And(tirx.And(mode >= _int32(_SKIP), mode <= _int32(_TAKE)), tirx.And(pos >= _int32(0), nxt < _int32(0))),
        tirx.SeqStmt([
            tirx.IfThenElse(is_free(pos), tirx.SeqStmt([put(0, pos), put(1, _TAKE)]),
                            tirx.IfThenElse(mode == _int32(_TAKE), put(1, _DONE), None)),
            put(2, pos - 1),
        ]))
    current = tirx.Var("qc_current", "int32")
    iteration = tirx.SeqStmt([  # claim this one, find the next one, run this one
        tirx.Bind(current, nxt),
        tirx.BufferStore(taken, tirx.IntImm("int8", 1), [current]),
        put(0, -1),
        tirx.IfThenElse(mode == _int32(_OWN), chunk_ended, None),
        scan,
        tirx.Bind(loop.loop_var, loop.min + tirx.Cast(str(loop.loop_var.ty.dtype), current)),
        loop.body,
    ])
    task_body = tirx.SeqStmt([
        tirx.AllocBuffer(state),
        put(0, tirx.Select(is_free(task), task, _int32(-1))),  # a stolen own iteration: nothing to do
        put(1, _OWN),
        put(2, -1),
        # (a one-trip loop around the body: TVM frees a kernel's scratch buffers at the end
        # of the enclosing loop body, and a While body does not count as one)
        tirx.While(nxt >= _int32(0), tirx.For(tirx.Var("qc_once", "int32"), _int32(0), _int32(1),
                                              tirx.ForKind.SERIAL, iteration)),
    ])
    return tirx.SeqStmt([
        tirx.AllocBuffer(taken),
        tirx.For(k, _int32(0), _int32(extent), tirx.ForKind.SERIAL,
                 tirx.BufferStore(taken, tirx.IntImm("int8", 0), [k])),
        tirx.For(task, _int32(0), _int32(extent), tirx.ForKind.PARALLEL, task_body,
                 annotations={BALANCED: _int32(1)}),
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


def parallel_loops(stmt) -> list[tirx.For]:
    """The parallel loops in ``stmt``, at any depth."""
    found = []
    tvm_ffi.structural_walk(stmt, lambda node: found.append(node)
                            if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL else None)
    return found


def balance_function(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with each outermost, constant-extent, idempotent parallel loop balanced
    (nested parallel loops, which TVM runs serially inside the outer one, are left as
    they are)."""
    aliases = _aliases(func)

    def rewrite(node):
        if (isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL
                and isinstance(node.extent, tirx.IntImm) and int(node.extent) > 1
                and BALANCED not in (node.annotations or {}) and not parallel_loops(node.body)
                and idempotent(node, aliases)):
            return balanced_loop(node)
        return node

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, rewrite)))


@tvm.transform.module_pass(opt_level=0, name="qcompile.BalanceParallel")
def BalanceParallel(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a TVM pass)
    """:func:`balance_function` over every CPU (llvm) PrimFunc of ``mod``."""
    return map_cpu_functions(mod, balance_function)
