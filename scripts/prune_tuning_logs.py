"""Rewrite a tuning database keeping only what the given models use.

For each model (fp32 and int8) the script extracts the tuning tasks a build looks up
(``qcompile.tune.records.extract_tasks``, as ``qcompile tune`` extracts them) and keeps the
best ``--top`` records of each of those workloads; records of workloads no model produces
are dropped (``qcompile.tune.records.prune``).  The database is the target's folder under
``--log-dir``, by default the records shipped in the checkout (``qcompile/tuning_logs``).

``--seed`` first measures what an untuned build runs for every workload (``qcompile tune``'s
seeding, ``qcompile.tune.seeding.seed_default_schedules``), so that no kept record is slower
than that; the records of qcompile's own conv kernels are replaced by that measurement of their
register tiles (a changed schedule function makes their old traces stale).
``--seed --kernel depthwise_conv2d`` (or another hand kernel) measures only the workloads built
on that kernel and keeps every other record; ``--seed --task matmul`` only the workloads whose
task name contains ``matmul`` (after a change to a default schedule: the new measurement joins
their records, the best ``--top`` stay).
``--fill`` only measures, in place, the workloads without a successful record.
``--visible-traces`` gives records with an empty trace the no-op lookup of
``qcompile.tune.seeding.default_lowering`` (same schedule, same measurement), which TVM 0.27's
JSONDatabase needs to return them.  ``--compact-only`` only unindents the workload file.

    .venv/bin/python scripts/prune_tuning_logs.py --target x86-avx2 resnet18 mobilenet_v2
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def model_tasks(name: str, target, quantize: bool) -> list:
    """The tuning tasks of torchvision model ``name`` (int8 when ``quantize``) for ``target``."""
    from qcompile.api import import_model
    from qcompile.api import quantize as quantize_model
    from qcompile.quantize import Int8Config
    from qcompile.tune.records import extract_tasks

    model = import_model(name)
    if quantize:  # int8 kernels do not depend on the calibration data (see qcompile/tuning_logs/README.md)
        shape = model.inputs[0].shape
        samples = np.random.default_rng(0).standard_normal((2 * shape[0], *shape[1:])).astype("float32")
        model = quantize_model(model, samples, Int8Config(num_samples=2), target)
    return extract_tasks(model, target)


def unique_tasks(models: list[str], target) -> list:
    """The tuning tasks of each model, fp32 then int8, each workload once (first seen)."""
    import tvm_ffi

    tasks, seen = [], set()
    for name in models:
        for quantize in (False, True):
            for task in model_tasks(name, target, quantize):
                key = tvm_ffi.structural_hash(task.dispatched[0])
                if key not in seen:
                    seen.add(key)
                    tasks.append(task)
    return tasks


def make_traces_visible(path: Path) -> int:
    """Give every record in the database at ``path`` whose trace is empty the trace of
    ``default_lowering`` (same schedule, same measurement); returns how many."""
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune.records import open_database, rewrite_database
    from qcompile.tune.seeding import default_lowering

    records = open_database(path).get_all_tuning_records()
    empty = [r for r in records if not r.trace.insts]
    rewrite_database(path, (ms.database.TuningRecord(
        default_lowering(r.workload.mod["main"]).trace, r.workload, r.run_secs, r.target, r.args_info)
        if not r.trace.insts else r for r in records))
    return len(empty)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qcompile.kernels.registry import hand_kernels
    from qcompile.tune.records import PACKAGED_ROOT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="torchvision model names whose workloads are kept")
    parser.add_argument("--target", default="x86-avx2", help="target whose records are rewritten (default: x86-avx2)")
    parser.add_argument("--top", type=int, default=3, help="records kept per workload (default: 3)")
    parser.add_argument("--log-dir", type=Path, default=PACKAGED_ROOT,
                        help=f"tuning records root (default: the shipped records, {PACKAGED_ROOT})")
    parser.add_argument("--seed", action="store_true", help="also measure and keep each workload's default schedule")
    parser.add_argument("--kernel", choices=sorted(k.name for k in hand_kernels()),
                        help="with --seed: measure only the workloads built on this qcompile kernel (after a "
                             "change to its schedule); every other record is kept")
    parser.add_argument("--compact-only", action="store_true", help="only unindent the workload file in place")
    parser.add_argument("--visible-traces", action="store_true",
                        help="rewrite records with an empty trace so builds can find them (keeps every record)")
    parser.add_argument("--task", metavar="SUBSTRING",
                        help="with --seed: measure only the workloads whose task name contains SUBSTRING "
                             "(after a change to a default schedule, e.g. 'matmul'); the others keep their records")
    parser.add_argument("--fill", action="store_true",
                        help="only measure, in place, the workloads without a successful record (keeps every record)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from qcompile.kernels.registry import hand_kernel_of
    from qcompile.target import resolve_target
    from qcompile.tune.records import (
        DATABASE_FILES,
        compact_workloads,
        database_dir,
        open_database,
        prune,
    )
    from qcompile.tune.seeding import seed_default_schedules

    target = resolve_target(args.target)
    path = database_dir(target, args.log_dir)
    if args.compact_only:
        compact_workloads(path / DATABASE_FILES[0])
        return
    if args.visible_traces:
        print(f"{path}: {make_traces_visible(path)} records with an empty trace rewritten")
        return
    tasks = unique_tasks(args.models, target)
    if args.fill:
        filled = seed_default_schedules(tasks, target.to_tvm(), open_database(path), say=print)
        compact_workloads(path / DATABASE_FILES[0])
        print(f"{path}: measured {filled} workloads that had no successful record")
        return
    seeds: list = []
    keep = [task.dispatched[0] for task in tasks]
    if args.seed:  # measured into a scratch database first, then written with the kept records
        kernels = [hand_kernel_of(mod) for mod in keep]
        reseeded = [(args.kernel is None or (kernel is not None and kernel.name == args.kernel))
                    and (args.task is None or args.task in str(task.task_name)) for kernel, task in zip(kernels, tasks)]
        with tempfile.TemporaryDirectory() as scratch:
            seeded = open_database(Path(scratch))
            seed_default_schedules([t for t, again in zip(tasks, reseeded) if again], target.to_tvm(), seeded,
                                   say=print)
            seeds = list(seeded.get_all_tuning_records())
        # qcompile's own kernels: the seeding just measured every tile of their schedule.
        keep = [mod for mod, kernel, again in zip(keep, kernels, reseeded) if not (again and kernel is not None)]
    kept, before = prune(path, keep, args.top, extra_records=seeds)
    print(f"{path}: kept {kept} of {before} records (best {args.top} per workload the models use) "
          f"for {len(tasks)} workloads" + (f", plus {len(seeds)} new measurements" if args.seed else ""))


if __name__ == "__main__":
    main()
