"""Put the database tune_there.py returned into the committed x86-avx512 logs: each workload
it covers takes its best --top records from there (seed and search, measured on one
machine), replacing the committed ones; every other workload keeps its records.

    .venv/bin/python scripts/offline_seed/merge_there.py PATH/TO/RETURNED/db
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
import tvm_ffi  # noqa: E402
from prune_tuning_logs import rewrite_database  # noqa: E402

from qcompile.targets import resolve_target  # noqa: E402
from qcompile.tune import database_dir, open_database  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("there", type=Path)
parser.add_argument("--target", default="x86-avx512")
parser.add_argument("--top", type=int, default=3)
parser.add_argument("--tasks-file", type=Path, default=ROOT / ".devcarry" / "tasks.json",
                    help="export_tasks.py's file, for the kernels' names")
args = parser.parse_args()

path = database_dir(resolve_target(args.target))
old, there = open_database(path), open_database(args.there)


def mean_ms(record) -> float:
    return 1e3 * sum(float(t) for t in record.run_secs) / len(record.run_secs)


names: dict[int, str] = {}
if args.tasks_file.is_file():
    import json

    import tvm

    for entry in json.loads(args.tasks_file.read_text()):
        names[tvm_ffi.structural_hash(tvm.ir.load_json(entry["mod"]))] = entry["name"]

replaced: dict[int, list] = {}
for record in there.get_all_tuning_records():
    replaced.setdefault(tvm_ffi.structural_hash(record.workload.mod), []).append(record)
kept = [r for r in old.get_all_tuning_records() if tvm_ffi.structural_hash(r.workload.mod) not in replaced]
taken = []
for key, records in replaced.items():
    best = sorted(records, key=mean_ms)
    # the default schedule's measurement (the seeding): its trace samples nothing
    seed = next((r for r in records if not r.trace.decisions), None)
    taken += best[:args.top]
    default = f"{mean_ms(seed):.4f} ms" if seed else "n/a"
    print(f"{names.get(key, '?')[:44]:44s} {len(records):3d} records; "
          f"default {default} -> best {mean_ms(best[0]):.4f} ms")
rewrite_database(path, kept + taken)
print(f"{path}: kept {len(kept)} records, {len(replaced)} workloads from {args.there}")
