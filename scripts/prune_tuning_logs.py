"""Rewrite a committed tuning database keeping only what the shipped models use.

For each model (fp32 and int8) the script extracts the tuning tasks exactly as `qcompile tune`
does, and keeps the best ``--top`` records of each of those workloads; records of workloads
no model produces any more (e.g. int8 kernels replaced by the tensorized ones) are dropped.
``--seed`` first measures what an untuned build runs for every workload (``qcompile tune``'s
seeding) so that no kept record is slower than that; the records of qcompile's own int8 conv
kernels are then replaced by the new measurement of their register tiles (a changed schedule
function makes the old traces stale).

``--visible-traces`` rewrites records whose trace is empty (TVM's default lowering, as the
seeding wrote them before ``tune.default_lowering``) with the no-op lookup that lets TVM 0.27's
JSONDatabase return them; the measurement is kept (the schedule is the same).
``--seed --kernel depthwise_conv2d`` (or ``packed_conv2d``, ``float_conv2d``) measures only the
workloads built on that kernel -- after a change to its schedule function, whose old traces a
build would otherwise replay -- and keeps every other record.
``--fill`` only measures, in place, the workloads that have no successful record (a seeding
whose measurement failed leaves the workload with none, and builds miss it).

    .venv/bin/python scripts/prune_tuning_logs.py --target x86-avx2 resnet18 mobilenet_v2
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np


def model_tasks(name: str, target, quantize: bool):
    from tvm.s_tir import meta_schedule as ms

    from qcompile.build.pipeline import phases_through, run_phases
    from qcompile.frontend import import_model
    from qcompile.quantize import Int8Config, quantize_model

    model = import_model(name)
    if quantize:  # int8 kernels do not depend on the calibration data (see tuning_logs/README.md)
        rng = np.random.default_rng(0)
        batches = [{model.inputs[0].name: rng.standard_normal(model.inputs[0].shape).astype("float32")} for _ in range(2)]
        model = quantize_model(model, batches, Int8Config(num_samples=2), target.to_tvm())
    mod = run_phases(model.mod, target.to_tvm(), phases=phases_through("legalize"))
    return ms.relax_integration.extract_tasks(mod, target.to_tvm())


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


def compact_workloads(path: Path) -> None:
    """Rewrite MetaSchedule's workload file with each workload's IR JSON unindented.

    Each line is ``[structural hash, base64(8-byte little-endian length + IR JSON)]``;
    TVM writes that JSON indented (most of a 15 MB file is spaces).  Whitespace does not
    change the IR it loads, nor the hash records are matched by."""
    import base64
    import json
    import struct

    lines = []
    for line in path.read_text().splitlines():
        key, blob = json.loads(line)
        raw = base64.b64decode(blob)
        (size,) = struct.unpack("<Q", raw[:8])
        ir = json.dumps(json.loads(raw[8:8 + size]), separators=(",", ":")).encode()
        lines.append(json.dumps([key, base64.b64encode(struct.pack("<Q", len(ir)) + ir).decode()]))
    path.write_text("\n".join(lines) + "\n")


def rewrite_database(path: Path, records) -> int:
    """Replace the database at ``path`` by ``records`` (an iterable of TuningRecords, read before
    the files are replaced), workload file compacted; returns how many were written."""
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune import open_database

    written = 0
    with tempfile.TemporaryDirectory() as tmp:
        new = open_database(Path(tmp))
        for record in records:
            new.commit_tuning_record(ms.database.TuningRecord(
                record.trace, new.commit_workload(record.workload.mod), record.run_secs, record.target,
                record.args_info))
            written += 1
        compact_workloads(Path(tmp) / "database_workload.json")
        for file in ("database_workload.json", "database_tuning_record.json"):
            shutil.copyfile(Path(tmp) / file, path / file)
    return written


def make_traces_visible(path: Path) -> int:
    """Rewrite the database at ``path``: every record whose trace is empty gets
    ``tune.default_lowering``'s trace (same schedule, same measurement); returns how many."""
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune import default_lowering, open_database

    records = open_database(path).get_all_tuning_records()
    empty = [r for r in records if not r.trace.insts]
    rewrite_database(path, (ms.database.TuningRecord(
        default_lowering(r.workload.mod["main"]).trace, r.workload, r.run_secs, r.target, r.args_info)
        if not r.trace.insts else r for r in records))
    return len(empty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--target", default="x86-avx2")
    parser.add_argument("--top", type=int, default=3, help="records kept per workload (default: 3)")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--seed", action="store_true", help="also measure and keep each workload's default schedule")
    parser.add_argument("--kernel", choices=["packed_conv2d", "depthwise_conv2d", "float_conv2d"],
                        help="with --seed: measure only the workloads built on this qcompile kernel (after a "
                             "change to its schedule); every other record is kept")
    parser.add_argument("--compact-only", action="store_true", help="only unindent the workload file in place")
    parser.add_argument("--visible-traces", action="store_true",
                        help="rewrite records with an empty trace so builds can find them (keeps every record)")
    parser.add_argument("--fill", action="store_true",
                        help="only measure, in place, the workloads without a successful record (keeps every record)")
    args = parser.parse_args()
    if args.compact_only:
        from qcompile.target import resolve_target
        from qcompile.tune import database_dir

        compact_workloads(database_dir(resolve_target(args.target), args.log_dir) / "database_workload.json")
        return


    from qcompile.kernels import hand_kernel_tiles
    from qcompile.target import resolve_target
    from qcompile.tune import (
        database_dir,
        has_valid_record,
        open_database,
        seed_default_schedules,
    )

    target = resolve_target(args.target)
    path = database_dir(target, args.log_dir)
    old = open_database(path)
    if args.visible_traces:
        print(f"{path}: {make_traces_visible(path)} records with an empty trace rewritten")
        return
    if args.fill:
        filled = seed_default_schedules(unique_tasks(args.models, target), target.to_tvm(), old, say=print)
        compact_workloads(path / "database_workload.json")
        print(f"{path}: measured {filled} workloads that had no successful record")
        return
    before = len(old)
    tasks = unique_tasks(args.models, target)
    kept: list = []  # the best --top records of each workload in use
    seeded_db = None
    reseeded = tasks
    if args.kernel:
        import importlib

        anchor = importlib.import_module(f"qcompile.kernels.{args.kernel}").ANCHOR
        reseeded = [task for task in tasks if anchor in task.dispatched[0].script()]
    if args.seed:  # measured into a scratch database first, then written with the kept records
        scratch = tempfile.TemporaryDirectory()
        seeded_db = open_database(Path(scratch.name))
        seed_default_schedules(reseeded, target.to_tvm(), seeded_db, say=print)
    for task in tasks:
        mod = task.dispatched[0]
        if not has_valid_record(old, mod) or (
                args.seed and task in reseeded and hand_kernel_tiles(mod.script()) is not None):
            continue  # qcompile's own kernels: the seeding just measured every tile of their schedule
        kept.extend(old.get_top_k(old.commit_workload(mod), args.top))
    seeds = list(seeded_db.get_all_tuning_records()) if seeded_db is not None else []
    rewrite_database(path, seeds + kept)
    print(f"{path}: kept {len(kept)} of {before} records (best {args.top} per workload the models use) "
          f"for {len(tasks)} workloads" + (", plus each one's default schedule" if args.seed else ""))


if __name__ == "__main__":
    main()
