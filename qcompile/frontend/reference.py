"""Framework references for a built artifact: PyTorch for torchvision/.pt2, ONNX Runtime for .onnx.

Used by ``qcompile compare`` and the tests to check a build against the model it came
from, on the same inputs.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from qcompile.errors import ArtifactError, MissingDependencyError
from qcompile.manifest import Manifest

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def reference_runner(manifest: Manifest, threads: int | None = None) -> tuple[str, RunFn]:
    """``(framework name, run(inputs) -> outputs)`` for the model behind ``manifest``."""
    model = manifest.model
    kind = model["kind"]
    out_names = [o.name for o in manifest.outputs]
    in_names = [i.name for i in manifest.inputs]
    if kind in ("torchvision", "pt2"):
        from qcompile.frontend.from_torch import _import_torch

        torch, _ = _import_torch()  # without torch: a one-line error naming the extra (exit 7)

        if threads:
            torch.set_num_threads(threads)
        if kind == "torchvision":
            from qcompile.frontend.from_torch import torchvision_module

            module = torchvision_module(model["name"], model.get("weights"))
        else:
            module = torch.export.load(_existing(model)).module()

        def run_torch(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                result = module(*[torch.from_numpy(inputs[n]) for n in in_names])
            flat = _flatten_torch(result)
            return {n: t.detach().cpu().numpy() for n, t in zip(out_names, flat)}

        return f"PyTorch {torch.__version__}", run_torch
    if kind == "onnx":
        session = onnx_session(_existing(model), threads)

        def run_ort(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(out_names, session.run(out_names, {n: inputs[n] for n in in_names})))

        import onnxruntime as ort

        return f"ONNX Runtime {ort.__version__}", run_ort
    raise ArtifactError(f"no reference framework for model kind {kind!r}")


def onnx_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path`` (a one-line error without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("comparing ONNX models needs onnxruntime: pip install onnxruntime") from exc
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_runner(run: RunFn, inputs: dict[str, np.ndarray], repeat: int, warmup: int = 2) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        run(inputs)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(inputs)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _existing(model: dict) -> str:
    from pathlib import Path

    path = model.get("path")
    if not path or not Path(path).is_file():
        raise ArtifactError(f"the source model {path} is no longer there; the reference needs it")
    return path


def _flatten_torch(value) -> list:
    if hasattr(value, "detach"):
        return [value]
    out = []
    for item in value:
        out.extend(_flatten_torch(item))
    return out
