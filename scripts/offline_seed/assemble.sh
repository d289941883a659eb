# On the other machine (call 2, `source .devc2/assemble.sh`): TVM with its compiler in /tmp/qsite on
# PYTHONPATH; MEAS and BUILD: CPUs to measure on (cores 0-3) and to build on (the other cores).
# Packed by pack_compiler.sh.
set -e
PY=${PY:-python3}
S=/tmp/qsite; rm -rf $S; mkdir -p $S
A=$(ls /tmp/cc/comp.xz.aa .devc1/comp.xz.aa 2>/dev/null | head -1)
t0=$(date +%s)
tar -xJf .devc2/tvm.tar.xz -C $S
cat $A .devc2/comp.xz.ab | xz -dc -T0 > $S/tvm/lib/libtvm_compiler.so
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S .devc2/whl/*.whl 2>&1 | grep -v WARN || true
$PY -c "import scipy" 2>/dev/null || cp -r .devc2/scipystub/scipy $S/
export PYTHONPATH=$S:$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}
$PY -c "import tvm, xgboost, numpy; print('tvm', tvm.__version__, 'xgboost', xgboost.__version__, 'numpy', numpy.__version__)"
echo "assembled in $(( $(date +%s) - t0 )) s"
# measure on the hardware threads of cores 0-3, build on the other cores (not on their HT siblings)
read MEAS BUILD < <($PY - <<'E'
import subprocess
rows = [l.split(",") for l in subprocess.run(["lscpu", "-p=CPU,CORE"], capture_output=True, text=True).stdout.splitlines() if l[:1] != "#"]
cores = sorted({int(c) for _, c in rows})
meas = [r[0] for r in rows if int(r[1]) in cores[:4]]
build = [r[0] for r in rows if int(r[1]) not in cores[:4]]
print(",".join(meas), ",".join(build))
E
)
echo "measure on CPUs $MEAS, build on $BUILD"
