"""On the VNNI machine, with TVM's compiler: `qcompile.tune.tune_tasks` over the tasks that
export_tasks.py saved (the kernels MetaSchedule searches), into a fresh database in
$OUT/db: each task seeded with the default schedule's measurement, then searched, all on
that machine.  merge_there.py puts the result into tuning_logs/.

    taskset -c 0-7 python3 scripts/offline_seed/tune_there.py --trials 544 --per-task 32 \
        --build-cpus 8-15

--build-cpus keeps the builder's compiles off the cores where candidates are measured.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TVM_NUM_THREADS", "2")  # the preset's num-cores: measure as builds run
import tvm  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

import qcompile.tune  # noqa: E402
from qcompile.targets import resolve_target  # noqa: E402
from qcompile.tune import build_candidate, tune_tasks  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--trials", type=int, required=True)
parser.add_argument("--per-task", type=int)
parser.add_argument("--target", default="x86-avx512")
parser.add_argument("--tasks-file", type=Path, default=ROOT / ".devcarry" / "tasks.json")
parser.add_argument("--tasks", type=int, help="only the first N tasks (a dry run)")
parser.add_argument("--seeded", type=Path, help="start from this database (an earlier run's)")
parser.add_argument("--task-scheduler", default="round-robin")
parser.add_argument("--build-cpus", help="CPUs for the builder's workers, as taskset lists them: 8-15 or 4,5,12,13")
args = parser.parse_args()

if args.build_cpus:
    cpus = set()
    for part in args.build_cpus.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))

    def build_on_other_cpus(mod, target, params=None):
        os.sched_setaffinity(0, cpus)
        return build_candidate(mod, target, params)

    qcompile.tune.build_candidate = build_on_other_cpus

target = resolve_target(args.target)
tvm_target = target.to_tvm()
db = Path(os.environ.get("OUT", "/tmp")) / "db"
if args.seeded:  # a database returned by an earlier run: its seeds are not measured again
    shutil.copytree(args.seeded, db, dirs_exist_ok=True)
tasks = []
for entry in json.loads(args.tasks_file.read_text())[:args.tasks]:
    mod = tvm.ir.load_json(entry["mod"])
    tasks.append(ms.ExtractedTask(entry["name"], mod, tvm_target, [mod], entry["weight"]))
t0 = time.time()
result = tune_tasks(tasks, target, args.trials, args.per_task, database_path=db, task_scheduler=args.task_scheduler,
                    progress=lambda m: print(f"{time.time() - t0:6.0f}s {m}", flush=True))
print("done", result, f"{time.time() - t0:.0f} s", flush=True)
