"""Helpers shared by subcommands: progress messages and reading input files."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from qcompile.errors import RuntimeInputError
from qcompile.model import TensorInfo, read_arrays


class Progress:
    """Prints ``[  12.3s] message`` lines to stderr (quiet with ``--quiet``)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def load_inputs(path: str | None, infos: list[TensorInfo]) -> dict[str, np.ndarray] | None:
    """Read ``--inputs``: an .npz keyed by input name (any key for one input) or an .npy."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise RuntimeInputError(f"inputs file {path} does not exist")
    try:
        return read_arrays(file, [i.name for i in infos])
    except Exception as exc:  # np.load raises OSError, ValueError, BadZipFile ...
        raise RuntimeInputError(f"inputs file {path}: cannot read ({exc}); give an .npz keyed by input name or an .npy") from exc


def add_input_option(parser) -> None:
    parser.add_argument(
        "--inputs",
        metavar="FILE",
        help="input arrays: .npz keyed by input name (or .npy for one input); default: seeded random",
    )


def add_rpc_options(parser) -> None:
    """--rpc / --rpc-tracker / --rpc-key / --rpc-timeout: run on a device over TVM RPC."""
    g = parser.add_argument_group("remote device (TVM RPC)")
    g.add_argument("--rpc", metavar="HOST:PORT", help="run on the device whose RPC server listens here")
    g.add_argument("--rpc-tracker", metavar="HOST:PORT", help="ask this RPC tracker for a device ...")
    g.add_argument("--rpc-key", metavar="KEY", help="... registered under this key")
    g.add_argument("--rpc-timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait to connect or for a free device (default: 60)")


def rpc_endpoint(args):
    from qcompile.runtime.rpc import RpcEndpoint

    return RpcEndpoint.from_args(args.rpc, args.rpc_tracker, args.rpc_key, args.rpc_timeout)
