# commit x86-avx512 records from the VNNI machine's measurements (tune.choose_seed: the seeding's rule)
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
from prune_tuning_logs import compact_workloads, unique_tasks
from tvm.s_tir import meta_schedule as ms

from qcompile.targets import resolve_target
from qcompile.tune import choose_seed, database_dir, open_database, seed_candidates

measured = json.load(open(sys.argv[1]))
meta = json.load(open(ROOT / ".devcarry/cand/meta.json"))
target = resolve_target("x86-avx512"); t = target.to_tvm()
tasks = unique_tasks(["resnet18", "mobilenet_v2"], target)
assert len(tasks) == len(meta), (len(tasks), len(meta))
path = database_dir(target); path.mkdir(parents=True, exist_ok=True)
db = open_database(path)
committed = 0
for ti, task in enumerate(tasks):
    assert str(task.task_name) == meta[ti]["name"]
    secs = measured.get(str(ti))
    if not secs: continue
    mod = task.dispatched[0]
    scheds = seed_candidates(mod, t)
    timed = sorted((int(si), v) for si, v in secs.items() if v)
    if not timed: continue
    si, run = timed[choose_seed([v for _, v in timed], default_first=timed[0][0] == 0)]
    sec = float(np.median(run))
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    wl = db.commit_workload(mod)
    db.commit_tuning_record(ms.database.TuningRecord(scheds[si].trace, wl, run, t, args_info))
    committed += 1
    print(f"{meta[ti]['name'][:50]}: sched {si} of {len(timed)}: {sec*1e3:.3f} ms")
compact_workloads(path / "database_workload.json")
print("committed", committed, "records to", path)
