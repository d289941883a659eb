#!/usr/bin/env bash
# The main job: build a model in float32 and int8, benchmark both, compare both with
# PyTorch, then measure int8 accuracy on real data against ONNX Runtime and PyTorch PT2E.
# Usage: scripts/demo.sh [MODEL] [TARGET]   (default: resnet18 native)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
model=${1:-resnet18}
target=${2:-native}
qc=.venv/bin/qcompile
out=out/demo
name=$(basename "${model%.*}")
mkdir -p "$out"
# No image data ships offline: calibrate the torchvision model on seeded random inputs
# (real-data accuracy is measured by the digits benchmark below).
.venv/bin/python -c "import numpy as np; np.savez('$out/calib.npz', np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype('float32'))"
set -x
$qc build "$model" --target "$target" -o "$out"
$qc build "$model" --target "$target" --quantize int8 --calib-data "$out/calib.npz" --calib-samples 16 -o "$out"
$qc info "$out/$name-int8.so" --layers
ls -l "$out/$name.so" "$out/$name-int8.so"
$qc bench "$out/$name.so" --repeat 5 --warmup 1
$qc bench "$out/$name-int8.so" --repeat 10 --warmup 2
$qc compare "$out/$name.so" --repeat 3 --atol 1e-4
$qc compare "$out/$name-int8.so" --repeat 3
.venv/bin/python benchmarks/digits_accuracy.py
