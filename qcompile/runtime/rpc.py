"""TVM RPC: connect to a device (directly or through a tracker) and run TVM's own server
and tracker as child processes that can be stopped cleanly.

TVM's RPC server forks a worker per session, and those workers outlive a SIGTERM to the
parent; every process started here is therefore the leader of its own process group and
is stopped by signalling the whole group.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qcompile.errors import ConfigError, RpcError, first_line

DEFAULT_PORT = 9090
DEFAULT_TRACKER_PORT = 9190


def parse_address(text: str, option: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST`` with a default port) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port) if default_port else ""
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{default_port or DEFAULT_PORT}")
    return host, int(port)


@dataclass(frozen=True)
class RpcEndpoint:
    """Where to run: a server at ``address``, or a tracker at ``address`` handing out a
    server registered under ``key``."""

    address: tuple[str, int]
    key: str | None = None  # set: ``address`` is a tracker
    timeout: float = 60.0  # connect / wait-for-a-free-device limit, seconds

    @property
    def label(self) -> str:
        host, port = self.address
        return f"RPC tracker {host}:{port} (key {self.key!r})" if self.key else f"RPC server {host}:{port}"

    @classmethod
    def from_args(cls, rpc: str | None, tracker: str | None, key: str | None, timeout: float = 60.0):
        """From ``--rpc HOST:PORT`` or ``--rpc-tracker HOST:PORT --rpc-key KEY``; None if neither."""
        if rpc and tracker:
            raise ConfigError("give either --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY, not both")
        if tracker:
            if not key:
                raise ConfigError("--rpc-tracker needs --rpc-key KEY (the key the device's server registered)")
            return cls(parse_address(tracker, "--rpc-tracker", DEFAULT_TRACKER_PORT), key, timeout)
        if key:
            raise ConfigError("--rpc-key applies with --rpc-tracker HOST:PORT")
        if rpc:
            return cls(parse_address(rpc, "--rpc", DEFAULT_PORT), None, timeout)
        return None


def _probe(address: tuple[str, int], what: str, timeout: float) -> None:
    """Fail fast with a clear message where nothing listens (TVM would retry for 60 s)."""
    host, port = address
    try:
        with socket.create_connection(address, timeout=min(timeout, 10.0)):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RpcError(
            f"cannot reach {what} at {host}:{port} ({reason}): is it running (`qcompile "
            f"{'rpc-tracker' if 'tracker' in what else 'rpc-server'} --host {host} --port {port}` on the device)? "
            "Check the address, port and firewall"
        ) from exc


def connect(endpoint: RpcEndpoint):
    """An ``tvm.rpc.RPCSession`` on the device, with errors that name the address."""
    from tvm import rpc

    host, port = endpoint.address
    if endpoint.key is None:
        _probe(endpoint.address, "RPC server", endpoint.timeout)
        try:
            return rpc.connect(host, port)
        except Exception as exc:
            raise RpcError(f"RPC server {host}:{port} refused the session: {first_line(exc)}; "
                           "is it a TVM RPC server of the same TVM version?") from exc
    _probe(endpoint.address, "RPC tracker", endpoint.timeout)
    try:
        tracker = rpc.connect_tracker(host, port)
        summary = tracker.summary()
    except Exception as exc:
        raise RpcError(f"{host}:{port} is not a TVM RPC tracker: {first_line(exc)}") from exc
    keys = sorted(summary.get("queue_info", {}))
    if endpoint.key not in keys:
        # The tracker would queue the request until such a device appears: never, here.
        raise RpcError(f"RPC tracker {host}:{port} has no device registered with key {endpoint.key!r} "
                       f"(registered: {', '.join(keys) or 'none'}); start one with `qcompile rpc-server "
                       f"--tracker {host}:{port} --key {endpoint.key}`")
    sock = tracker._sock  # bound the wait for a free device; TVM's request blocks forever
    if sock is not None:
        sock.settimeout(endpoint.timeout)
    try:
        return tracker.request(endpoint.key, priority=1, max_retry=1)
    except Exception as exc:
        raise RpcError(f"RPC tracker {host}:{port}: no device with key {endpoint.key!r} became free within "
                       f"{endpoint.timeout:.0f} s ({first_line(exc)})") from exc


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (for tests and the emulator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """A TVM RPC server/tracker running as the leader of its own process group."""

    what: str
    address: tuple[str, int]
    process: subprocess.Popen
    log: Path | None = None
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the whole group (forked workers included), SIGKILL what is left."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers: forked session workers
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def _start(what: str, argv: list[str], address: tuple[str, int], ready_timeout: float,
           log: Path | None, env: dict | None) -> ServiceProcess:
    host, port = address
    if not _free(host, port):
        raise RpcError(f"cannot start the {what} on {host}:{port}: the port is in use; pick another with --port")
    out = open(log, "ab") if log else None  # no log: the child shares our stderr
    try:
        process = subprocess.Popen(argv, stdout=out or sys.stderr, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    finally:
        if out:
            out.close()
    service = ServiceProcess(what, address, process, log)
    try:
        _wait_listening(service, ready_timeout)
    except BaseException:  # an error or Ctrl-C while starting: leave no process behind
        service.stop()
        raise
    return service


def _wait_listening(service: ServiceProcess, timeout: float) -> None:
    host, port = service.address
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            log = service.log
            tail = log.read_text(errors="replace")[-800:] if log and log.exists() else ""
            raise RpcError(f"the {service.what} on {host}:{port} exited at start "
                           f"(code {service.process.returncode}) {tail}".strip())
        try:
            with socket.create_connection(service.address, timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RpcError(f"the {service.what} on {host}:{port} did not start listening within {timeout:.0f} s")


def server_argv(host: str, port: int, tracker: tuple[str, int] | None = None, key: str | None = None,
                python: list[str] | None = None) -> list[str]:
    """TVM's ``tvm.exec.rpc_server`` command line (``python`` may be an emulator's)."""
    argv = (python or [sys.executable]) + ["-m", "tvm.exec.rpc_server", "--host", host,
                                           "--port", str(port), "--port-end", str(port + 1)]
    if tracker:
        argv += ["--tracker", f"{tracker[0]}:{tracker[1]}", "--key", key or "qcompile"]
    return argv


def start_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, tracker: tuple[str, int] | None = None,
                 key: str | None = None, python: list[str] | None = None, ready_timeout: float = 60.0,
                 log: Path | None = None, env: dict | None = None) -> ServiceProcess:
    """Start TVM's RPC server (optionally registering with a tracker under ``key``)."""
    if tracker and not key:
        raise ConfigError("--tracker needs --key KEY: the name clients ask the tracker for")
    service = _start("RPC server", server_argv(host, port, tracker, key, python), (host, port),
                     ready_timeout, log, env)
    if tracker:  # listening is not enough: wait until the tracker lists the key
        try:
            _wait_registered(tracker, key, service, ready_timeout)
        except BaseException:
            service.stop()
            raise
    return service


def _wait_registered(tracker: tuple[str, int], key: str, service: ServiceProcess, timeout: float) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if key in rpc.connect_tracker(*tracker).summary().get("queue_info", {}):
                return
        except (OSError, RuntimeError):  # tracker not up yet: keep waiting until the deadline
            time.sleep(0.3)
        if not service.alive():
            break
        time.sleep(0.3)
    raise RpcError(f"the RPC server did not register key {key!r} with the tracker at {tracker[0]}:{tracker[1]} "
                   f"within {timeout:.0f} s: is the tracker running (`qcompile rpc-tracker`)?")


def start_tracker(host: str = "127.0.0.1", port: int = DEFAULT_TRACKER_PORT, ready_timeout: float = 30.0,
                  log: Path | None = None) -> ServiceProcess:
    """Start TVM's RPC tracker."""
    argv = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
            "--port-end", str(port + 1)]
    return _start("RPC tracker", argv, (host, port), ready_timeout, log, None)
