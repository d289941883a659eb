# build every seeding candidate for x86-avx512 here (no AVX-512 to run them); measured on a VNNI machine.
# --missing: only the workloads without a successful record in the committed logs (the others are
# listed with no candidates, so that phase_c.py's task indices still match)
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
from prune_tuning_logs import unique_tasks
from tvm.s_tir import meta_schedule as ms

from qcompile.targets import resolve_target
from qcompile.tune import build_candidate, database_dir, has_valid_record, open_database, seed_candidates

out = ROOT / ".devcarry/cand"; out.mkdir(parents=True, exist_ok=True)
target = resolve_target("x86-avx512"); t = target.to_tvm()
tasks = unique_tasks(["resnet18", "mobilenet_v2"], target)
committed = open_database(database_dir(target)) if "--missing" in sys.argv else None
print(len(tasks), "tasks", flush=True)
meta = []
t0 = time.time()
for ti, task in enumerate(tasks):
    mod = task.dispatched[0]
    if committed is not None and has_valid_record(committed, mod):
        meta.append({"task": ti, "name": str(task.task_name), "candidates": [], "args": []})
        continue
    scheds = seed_candidates(mod, t)
    args = [[str(a.as_json()[1]), [int(d) for d in a.as_json()[2]]] for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
    built = []
    for si, s in enumerate(scheds):
        try:
            lib = build_candidate(s.mod, t)
            lib.export_library(str(out / f"{ti}_{si}.so"))
            built.append(si)
        except Exception as exc:
            print("build failed", ti, si, str(exc)[:100])
    meta.append({"task": ti, "name": str(task.task_name), "candidates": built, "args": args})
    if ti % 10 == 0: print(ti, f"{time.time()-t0:.0f}s", flush=True)
(out / "meta.json").write_text(json.dumps(meta))
print("done", time.time() - t0)
