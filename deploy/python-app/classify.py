"""Minimal Python app: load a qcompile-built model and print the top-5 classes.

Needs only numpy and TVM's runtime (``qcompile.runtime``); it never imports torch.

    python deploy/python-app/classify.py out/resnet18-int8.so input.npy [--top 5]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from qcompile.errors import QcompileError
from qcompile.runtime import CompiledModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", help="the .so (its .manifest.json beside it)")
    parser.add_argument("input", help=".npy with the model's input (shape and dtype as the manifest says)")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        model = CompiledModel.load(args.library)
        outputs = model.run(np.load(args.input))
    except QcompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    scores = next(iter(outputs.values()))
    for row, values in enumerate(scores.reshape(scores.shape[0], -1)):
        best = np.argsort(-values, kind="stable")[: args.top]
        print(f"  batch {row}: " + ", ".join(f"{i}:{values[i]:.5g}" for i in best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
