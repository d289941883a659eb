#!/usr/bin/env bash
# Prepare an emulated Cortex-A72 "board": qemu-user + an arm64 Python 3.11 sysroot with
# aarch64 wheels of TVM's runtime, so TVM's RPC server runs under emulation on this x86
# machine.  Touches nothing of the host's dpkg state: arm64 .debs come through a private
# apt root and are unpacked with `dpkg -x`.  Idempotent; ~80 MB of .debs + ~120 MB wheels.
#
#   deploy/arm-emulator/setup.sh [DIR]     (default: $QCOMPILE_ARM_EMULATOR or .cache/arm-emulator)
#   then: qcompile rpc-server --emulate cortex-a72 --port 9090
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=$(realpath -m "${1:-${QCOMPILE_ARM_EMULATOR:-.cache/arm-emulator}}")
PY=${PYTHON:-.venv/bin/python}
TVM_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm'))")
FFI_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
stamp="$DIR/.ready-$TVM_VERSION-$FFI_VERSION"
[ -f "$stamp" ] && { echo "arm-emulator: ready in $DIR"; exit 0; }

# 1. qemu-user (host package; everything else stays inside $DIR).
if ! command -v qemu-aarch64 >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo -n apt-get); fi
  echo "arm-emulator: installing qemu-user"
  DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -q --no-install-recommends qemu-user >/dev/null
fi

# 2. arm64 sysroot: python3.11 + libgomp1 + libstdc++6 and their dependencies.
ROOT="$DIR/apt"
SYSROOT="$DIR/sysroot"
mkdir -p "$ROOT"/etc/apt/{sources.list.d,preferences.d,apt.conf.d} "$ROOT"/var/lib/apt/lists/partial \
         "$ROOT"/var/cache/apt/archives/partial "$ROOT"/var/lib/dpkg "$SYSROOT"
: > "$ROOT/var/lib/dpkg/status"
cp /etc/apt/sources.list.d/*.sources "$ROOT/etc/apt/sources.list.d/" 2>/dev/null || true
[ -f /etc/apt/sources.list ] && grep -v "^#" /etc/apt/sources.list | grep -i "debian\|ubuntu" > "$ROOT/etc/apt/sources.list" || true
cat > "$ROOT/apt.conf" <<CONF
Dir::State "$ROOT/var/lib/apt";
Dir::State::status "$ROOT/var/lib/dpkg/status";
Dir::Cache "$ROOT/var/cache/apt";
Dir::Etc::SourceList "$ROOT/etc/apt/sources.list";
Dir::Etc::SourceParts "$ROOT/etc/apt/sources.list.d";
Dir::Etc::Preferences "$ROOT/etc/apt/preferences";
Dir::Etc::PreferencesParts "$ROOT/etc/apt/preferences.d";
Dir::Etc::Parts "$ROOT/etc/apt/apt.conf.d";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Install-Recommends "false";
CONF
export APT_CONFIG="$ROOT/apt.conf"
echo "arm-emulator: downloading arm64 python3.11 into a private apt root"
apt-get update -q >/dev/null
apt-get install -y -q --download-only python3.11 libgomp1 libstdc++6 >/dev/null
for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
apt-get clean
unset APT_CONFIG

# 3. aarch64 wheels: TVM's runtime and what its RPC server imports.
SITE="$DIR/site"
mkdir -p "$SITE" "$DIR/wheels"
echo "arm-emulator: downloading aarch64 wheels (apache-tvm $TVM_VERSION)"
"$PY" -m pip download -q --dest "$DIR/wheels" --only-binary=:all: --no-deps \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  --python-version 3.11 --implementation cp \
  "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" numpy ml_dtypes typing_extensions \
  tornado psutil cloudpickle 2>&1 | grep -v "is ignored: it is neither" || true
for whl in "$DIR"/wheels/*.whl; do "$PY" -m zipfile -e "$whl" "$SITE"; done
rm -rf "$DIR/wheels"

# 4. The server re-executes sys.executable for its workers; without binfmt the host can't
#    run an arm64 binary, so sys.executable points at a wrapper that goes through qemu.
cat > "$DIR/python3" <<WRAP
#!/bin/sh
# arm64 Python under qemu-user, emulating a Cortex-A72.
export PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 TVM_USE_RUNTIME_LIB=1 QEMU_LD_PREFIX="$SYSROOT"
exec qemu-aarch64 -cpu "\${QEMU_CPU:-cortex-a72}" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "\$@"
WRAP
chmod +x "$DIR/python3"
cat > "$SITE/sitecustomize.py" <<SITE
import sys
sys.executable = "$DIR/python3"
SITE
"$DIR/python3" -c "import platform, tvm; print('arm-emulator:', platform.machine(), 'python', platform.python_version(), 'tvm', tvm.__version__)"
touch "$stamp"
echo "arm-emulator: ready in $DIR"
