"""On the VNNI machine: time every seeding candidate (x86-avx512) in 3 rotated interleaved rounds."""
import json
import os
import time

os.environ["TVM_USE_RUNTIME_LIB"] = "1"; os.environ.setdefault("TVM_NUM_THREADS", "2")
import numpy as np
import tvm

C = ".devcarry/cand/"
meta = json.load(open(C + "meta.json"))
dev = tvm.cpu(); rng = np.random.default_rng(0)
def arr(dtype, shape):
    if dtype.startswith("float"): a = rng.standard_normal(shape).astype(dtype)
    elif dtype in ("uint8", "int8"): a = rng.integers(-60 if dtype == "int8" else 0, 60, shape).astype(dtype)
    else: a = rng.integers(0, 4, shape).astype(dtype)
    return tvm.runtime.tensor(a, dev)
res = {}
t0 = time.time()
for m in meta:
    if not m["candidates"]: continue
    args = [arr(d, s) for d, s in m["args"]]
    fns = {}
    for si in m["candidates"]:
        try:
            lib = tvm.runtime.load_module(f"{C}{m['task']}_{si}.so")
            fns[si] = lib.time_evaluator("main", dev, number=3, repeat=1, min_repeat_ms=40)
        except Exception as exc:
            print("load failed", m["task"], si, str(exc)[:120])
    order = list(fns)
    secs = {si: [] for si in order}
    rounds = 3 if len(order) > 1 else 1
    for r in range(rounds):
        for k in range(len(order)):
            si = order[(r + k) % len(order)]
            try:
                secs[si].append(float(np.mean(fns[si](*args).results)))
            except Exception as exc:
                print("run failed", m["task"], si, str(exc)[:120])
    res[m["task"]] = secs
print(f"measured {len(res)} tasks in {time.time() - t0:.0f} s")
out = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out, "measured.json"), "w"))
