"""``qcompile run``: run a built artifact on inputs from a file (or seeded random)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from qcompile.cli.common import (
    add_input_option,
    add_rpc_options,
    load_inputs,
    rpc_endpoint,
)
from qcompile.runtime import CompiledModel


def register(sub) -> None:
    p = sub.add_parser("run", help="run a built .so on inputs, save/print outputs")
    p.add_argument("library", help="built .so (its manifest must lie beside it)")
    add_input_option(p)
    add_rpc_options(p)
    p.add_argument("--outputs", metavar="FILE", help="save outputs to this .npz, keyed by output name")
    p.add_argument("--print-top", type=int, default=0, metavar="N", help="print the top-N classes of each output")
    p.set_defaults(handler=run)


def run(args) -> int:
    model = CompiledModel.load(args.library, rpc=rpc_endpoint(args))
    outputs = model.run(load_inputs(args.inputs, model.inputs))
    if args.outputs:
        save_npz(Path(args.outputs), outputs)
        print(f"outputs written to {args.outputs}")
    for name, value in outputs.items():
        print(f"{name}: shape={list(value.shape)} dtype={value.dtype} "
              f"min={value.min():.6g} max={value.max():.6g} mean={value.mean():.6g}")
        if args.print_top > 0:
            for row, (idx, score) in enumerate(top_k(value, args.print_top)):
                print(f"  batch {row}: " + ", ".join(f"{i}:{s:.5g}" for i, s in zip(idx, score)))
    return 0


def top_k(value: np.ndarray, k: int) -> list[tuple[list[int], list[float]]]:
    """Top-k class indices and scores for each batch row of a (batch, classes) output."""
    rows = value.reshape(value.shape[0], -1) if value.ndim > 1 else value.reshape(1, -1)
    result = []
    for row in rows:
        idx = np.argsort(-row, kind="stable")[:k]
        result.append(([int(i) for i in idx], [float(row[i]) for i in idx]))
    return result


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically so an interrupted run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
