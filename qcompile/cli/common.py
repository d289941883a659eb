"""Helpers shared by subcommands: progress messages and reading input files."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..errors import RuntimeInputError
from ..model import TensorInfo


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
        if file.suffix == ".npy":
            arrays = {"": np.load(file, allow_pickle=False)}
        else:
            with np.load(file, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise RuntimeInputError(f"inputs file {path}: cannot read ({exc}); give an .npz keyed by input name or an .npy") from exc
    names = [i.name for i in infos]
    if len(arrays) == 1 and len(names) == 1 and names[0] not in arrays:
        return {names[0]: next(iter(arrays.values()))}
    return arrays


def add_input_option(parser) -> None:
    parser.add_argument(
        "--inputs",
        metavar="FILE",
        help="input arrays: .npz keyed by input name (or .npy for one input); default: seeded random",
    )
