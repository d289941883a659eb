"""An emulated Cortex-A72 board: TVM's RPC server in an arm64 Python under qemu-user.

``deploy/arm-emulator/setup.sh`` prepares the sysroot and wheels; this module finds it
and starts the server.  Emulated timings measure qemu on this machine, not a Cortex-A72:
use the board for correctness (does the aarch64 build compute the same numbers?), never
to rank schedules.
"""
from __future__ import annotations

import os
from pathlib import Path

from qcompile.errors import ConfigError, MissingDependencyError
from qcompile.runtime.rpc import ServiceProcess, start_server

REPO = Path(__file__).resolve().parents[2]  # the source checkout (deploy/ is not package data)
SETUP = REPO / "deploy" / "arm-emulator" / "setup.sh"
CPUS = ("cortex-a72", "cortex-a76")  # Raspberry Pi 4 and 5 (the a76 has sdot/udot)


def emulator_dir() -> Path:
    """``QCOMPILE_ARM_EMULATOR`` or the repository's ``.cache/arm-emulator``."""
    return Path(os.environ.get("QCOMPILE_ARM_EMULATOR", REPO / ".cache" / "arm-emulator"))


def emulated_python(directory: Path | None = None) -> list[str]:
    """The command that runs the emulated board's Python, or a clear error if not set up."""
    wrapper = (directory or emulator_dir()) / "python3"
    if not wrapper.is_file():
        raise MissingDependencyError(
            f"no emulated ARM board in {wrapper.parent}: run {SETUP.relative_to(REPO)} first "
            "(needs qemu-user and network access to the package registries)")
    return [str(wrapper)]


def start_emulated_board(host: str = "127.0.0.1", port: int = 9090, cpu: str = "cortex-a72",
                         tracker: tuple[str, int] | None = None, key: str | None = None,
                         log: Path | None = None, directory: Path | None = None) -> ServiceProcess:
    """TVM's RPC server on an emulated ``cpu``; start-up takes ~10-30 s (Python under qemu)."""
    if cpu not in CPUS:
        raise ConfigError(f"--emulate {cpu}: only {', '.join(CPUS)} is prepared")
    env = dict(os.environ, QEMU_CPU=cpu)
    return start_server(host, port, tracker, key, python=emulated_python(directory), ready_timeout=180.0,
                        log=log, env=env)
