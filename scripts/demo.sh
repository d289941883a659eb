#!/usr/bin/env bash
# The main job: build a model, benchmark it, compare it with the framework it came from.
# Usage: scripts/demo.sh [MODEL] [TARGET]   (default: resnet18 native)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
model=${1:-resnet18}
target=${2:-native}
qc=.venv/bin/qcompile
out=out/demo
name=$(basename "${model%.*}")
set -x
$qc build "$model" --target "$target" -o "$out"
$qc info "$out/$name.so"
$qc bench "$out/$name.so" --repeat 5 --warmup 1
$qc compare "$out/$name.so" --repeat 3 --atol 1e-4
