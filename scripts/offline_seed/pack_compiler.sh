#!/usr/bin/env bash
# Pack TVM (with its compiler) and tune_there.py's dependencies for a machine reached only through
# calls that carry <= 64 MiB each (the lent GPU machines): .devc1/ (first part of the compiler) and
# .devc2/ (the rest, the tvm Python package, cp312 wheels, the tasks). Both folders are git-ignored
# (.git/info/exclude). On the other machine, call 1: `mkdir -p /tmp/cc && cp .devc1/* /tmp/cc/`;
# call 2: `source .devc2/assemble.sh` then tune_there.py (see README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE=$(.venv/bin/python -c "import os, tvm; print(os.path.dirname(os.path.dirname(tvm.__file__)))")
PYVER=${PYVER:-3.12}
rm -rf .devc1 .devc2 && mkdir -p .devc1 .devc2/whl .devc2/scipystub/scipy/sparse
xz -9e -T2 -c "$SITE/tvm/lib/libtvm_compiler.so" > /tmp/libtvm_compiler.so.xz   # ~59.5 MB, a few minutes
split -b 38000000 /tmp/libtvm_compiler.so.xz /tmp/libtvm_compiler.so.xz.
mv /tmp/libtvm_compiler.so.xz.aa .devc1/comp.xz.aa && mv /tmp/libtvm_compiler.so.xz.ab .devc2/comp.xz.ab
tar -C "$SITE" --exclude='tvm/lib/libtvm_compiler.so' --exclude='__pycache__' --exclude='tvm/3rdparty' \
    -cJf .devc2/tvm.tar.xz tvm
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d .devc2/whl "apache-tvm-ffi==$(.venv/bin/python -c 'import tvm_ffi; print(tvm_ffi.__version__)')" \
    "xgboost-cpu==$(.venv/bin/python -c 'import xgboost; print(xgboost.__version__)')" cloudpickle psutil ml_dtypes typing_extensions
# xgboost imports scipy.sparse; where scipy is missing, this stand-in is used (dense numpy input only)
printf '__version__ = "0"\n' > .devc2/scipystub/scipy/__init__.py
printf 'class spmatrix: pass\nclass sparray: pass\nclass csr_matrix(spmatrix): pass\nclass csc_matrix(spmatrix): pass\nclass coo_matrix(spmatrix): pass\nclass csr_array(sparray): pass\nclass csc_array(sparray): pass\nclass coo_array(sparray): pass\ndef issparse(x): return False\n' > .devc2/scipystub/scipy/sparse/__init__.py
cp scripts/offline_seed/assemble.sh .devc2/assemble.sh
.venv/bin/python scripts/offline_seed/export_tasks.py && cp .devcarry/tasks.json .devc2/
du -sh .devc1 .devc2
