"""``qcompile rpc-server`` / ``qcompile rpc-tracker``: TVM's own RPC server and tracker,
run in the foreground in their own process group and stopped as a group on Ctrl-C or
SIGTERM (TVM's forked session workers would otherwise outlive them)."""
from __future__ import annotations

import signal

from qcompile.runtime.rpc import (
    DEFAULT_PORT,
    DEFAULT_TRACKER_PORT,
    parse_address,
    start_server,
    start_tracker,
)


def register(sub) -> None:
    p = sub.add_parser("rpc-server", help="run TVM's RPC server here (on the device), optionally behind a tracker")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker ...")
    p.add_argument("--key", metavar="KEY", help="... under this device key (e.g. rpi4)")
    p.add_argument("--emulate", metavar="CPU", choices=["cortex-a72"],
                   help="run the server on an emulated board (qemu-user; deploy/arm-emulator/setup.sh "
                        "prepares it): for correctness checks, its timings measure qemu")
    p.set_defaults(handler=run_server)

    t = sub.add_parser("rpc-tracker", help="run TVM's RPC tracker: hands a pool of devices out by key")
    t.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for the network)")
    t.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT, help=f"port (default: {DEFAULT_TRACKER_PORT})")
    t.set_defaults(handler=run_tracker)


def _serve(start, banner: str) -> int:
    """Start the service, wait for it, and stop its group on Ctrl-C/SIGTERM; the handler is
    installed first so a signal during start-up cannot orphan the child."""
    def stop(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    service = None
    try:
        service = start()
        print(banner, flush=True)
        return service.process.wait() or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if service is not None:
            service.stop()
        signal.signal(signal.SIGTERM, previous)


def run_server(args) -> int:
    tracker = parse_address(args.tracker, "--tracker", DEFAULT_TRACKER_PORT) if args.tracker else None
    where = f", registered as {args.key!r} with the tracker at {args.tracker}" if tracker else ""
    if args.emulate:
        from qcompile.runtime.emulator import start_emulated_board

        return _serve(lambda: start_emulated_board(args.host, args.port, args.emulate, tracker, args.key),
                      f"RPC server on an emulated {args.emulate} (qemu-user) listening on {args.host}:{args.port}"
                      f"{where} (Ctrl-C stops it; timings measure qemu, not the board)")
    return _serve(lambda: start_server(args.host, args.port, tracker, args.key),
                  f"RPC server listening on {args.host}:{args.port}{where} (Ctrl-C stops it)")


def run_tracker(args) -> int:
    return _serve(lambda: start_tracker(args.host, args.port),
                  f"RPC tracker listening on {args.host}:{args.port} (Ctrl-C stops it)")
