"""Save the x86-avx512 tuning tasks of resnet18 and mobilenet_v2 (fp32, int8) for a machine
that has TVM's compiler but not the models' frontends: `.devcarry/tasks.json` (name,
weight in the model where it first appears, workload as TVM's IR JSON), read by tune_there.py.
Only the kernels MetaSchedule searches: qcompile's own conv kernels keep the register tile
the seeding measured (phase_a.py .. phase_c.py).  --missing: only the workloads without a
successful record in the committed logs (tune_there.py then seeds and searches just those)."""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
import tvm  # noqa: E402
from prune_tuning_logs import unique_tasks  # noqa: E402

from qcompile.kernels import hand_kernel_tiles  # noqa: E402
from qcompile.targets import resolve_target  # noqa: E402
from qcompile.tune import database_dir, has_valid_record, open_database  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--missing", action="store_true", help="only workloads the committed logs have no record of")
args = parser.parse_args()
target = resolve_target("x86-avx512")
committed = open_database(database_dir(target)) if args.missing else None
tasks = [{"name": str(task.task_name), "weight": int(task.weight), "mod": tvm.ir.save_json(task.dispatched[0])}
         for task in unique_tasks(["resnet18", "mobilenet_v2"], target)
         if hand_kernel_tiles(task.dispatched[0].script()) is None
         and (committed is None or not has_valid_record(committed, task.dispatched[0]))]
out = ROOT / ".devcarry" / "tasks.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(tasks))
print(len(tasks), "tasks ->", out, f"{out.stat().st_size / 1e6:.1f} MB")
