#!/usr/bin/env bash
# Create .venv and install qcompile with everything its tests and demo need (the `test` and
# `torch` extras: a plain `pip install qcompile` has no torch and imports ONNX models only).
# Idempotent: re-running after a pyproject.toml change reinstalls; otherwise it is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch 2.14.1 / torchvision 0.29.1 wheels lie on this machine class's disk for Python 3.11.
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.qcompile-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing qcompile and its dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,torch]"
  echo "$want" > "$stamp"
fi

# System tools: cross-compiler for aarch64 builds (Raspberry Pi / Cortex-A targets) and `file` for the tests.
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v file >/dev/null || need+=(file)
# CMake + a C++ compiler for deploy/cpp-app; qemu-user for the emulated ARM board.
command -v cmake >/dev/null || need+=(cmake make)
command -v c++ >/dev/null || need+=(g++)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_get=(apt-get)
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    apt_get=(sudo apt-get)
  else
    apt_get=()
  fi
  if [ ${#apt_get[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]} with apt-get"
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -q --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: note: ${need[*]} missing and apt-get unavailable; aarch64 builds will fail and their tests skip." >&2
    echo "       install with: sudo apt-get install ${need[*]}" >&2
  fi
fi
# Emulated Cortex-A72 board for the RPC tests (qemu-user + an arm64 Python sysroot under
# .cache/arm-emulator; nothing of the host's dpkg state changes except qemu-user itself).
if ! deploy/arm-emulator/setup.sh; then
  echo "setup: note: the emulated ARM board could not be prepared; its tests will skip." >&2
fi
echo "setup: ready (.venv/bin/qcompile)"
