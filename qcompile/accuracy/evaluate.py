"""Evaluate a built library on data: top-1/top-5 against labels, agreement with a reference.

The reference is what a user compares a quantized build with: the float32 build (another
``.so``), the model it was built from run by its framework (``"source"``: PyTorch for
torchvision names and ``.pt2``, ONNX Runtime for ``.onnx``), or any ONNX file run by ONNX
Runtime.  With labels, the reference's own top-1/top-5 come out beside the library's: the
before/after of quantization on the same samples.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.accuracy.dataset import DEFAULT_PREPROCESS, EvalData, load_eval_data
from qcompile.accuracy.metrics import Agreement, TopK
from qcompile.errors import ArtifactError, ConfigError, RuntimeInputError
from qcompile.quantize.data import ImagePreprocess

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalResult:
    """What ``qcompile eval`` prints: ``top1``/``top5`` in percent (None without labels), the
    reference's (``reference_top1``/``reference_top5``), and per output the agreement with
    the reference (``sqnr_db``, ``cosine_min``, ``cosine_mean``, ``max_abs_diff``,
    ``top1_agreement`` in percent)."""

    library: str
    data: str
    n: int
    output: str
    top1: float | None = None
    top5: float | None = None
    reference: str | None = None
    reference_top1: float | None = None
    reference_top5: float | None = None
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"library": self.library, "data": self.data, "n": self.n, "output": self.output}
        if self.top1 is not None:
            out.update(top1=round(self.top1, 3), top5=round(self.top5, 3))
        if self.reference is not None:
            out["reference"] = self.reference
            if self.reference_top1 is not None:
                out.update(reference_top1=round(self.reference_top1, 3), reference_top5=round(self.reference_top5, 3))
            out["agreement"] = self.agreement
        out["seconds"] = round(self.seconds, 2)
        return out


def evaluate(library: str | Path, data: str | Path | EvalData, *, labels: str | Path | None = None,
             reference: str | Path | None = None, output: str | None = None, limit: int | None = None,
             preprocess: ImagePreprocess = DEFAULT_PREPROCESS, rpc=None,
             progress: Progress | None = None) -> EvalResult:
    """Run ``library`` over ``data`` (an ``.npz``, an image folder, or :class:`EvalData`).

    labels: overrides the data's labels (``.npy`` or one integer per line).
    reference: another ``.so``, ``"source"`` (the model the library was built from, run by
      its framework) or an ``.onnx`` file (ONNX Runtime).
    output: the output whose scores top-k reads (default: the first).
    rpc: a :class:`qcompile.runtime.rpc.RpcEndpoint` to run the library on a device."""
    from qcompile.runtime import CompiledModel

    started = time.perf_counter()
    model = CompiledModel.load(library, rpc=rpc)
    names = [o.name for o in model.outputs]
    output = output or names[0]
    if output not in names:
        raise ConfigError(f"--output {output!r}: {Path(library).name} has outputs {', '.join(names)}")
    if not isinstance(data, EvalData):
        data = load_eval_data(data, model.inputs, labels, preprocess, limit)
    ref_name, ref_run = _reference(reference, model) if reference is not None else (None, None)
    ours, theirs = TopK(), TopK()
    agreements = {name: Agreement() for name in names}
    batch = model.inputs[0].shape[0] if model.inputs and model.inputs[0].shape else 1
    for k, feeds in enumerate(data.iter_batches()):
        result = model.run(feeds)
        labels_k = None if data.labels is None else data.labels[k * batch:(k + 1) * batch]
        if labels_k is not None:
            ours.update(result[output], labels_k)
        if ref_run is not None:
            expected = ref_run(feeds)
            for name in names:
                try:
                    agreements[name].update(result[name], expected[name])
                except (KeyError, ValueError) as exc:
                    raise RuntimeInputError(f"reference {ref_name}: output {name!r} ({exc})") from exc
            if labels_k is not None:
                theirs.update(expected[output], labels_k)
        if progress is not None:
            progress(k + 1, data.count)
    top = ours.result() if data.labels is not None else (None, None)
    ref_top = theirs.result() if data.labels is not None and ref_run is not None else (None, None)
    return EvalResult(str(library), data.source, data.count * batch, output, top[0], top[1], ref_name,
                      ref_top[0], ref_top[1],
                      {n: a.to_json() for n, a in agreements.items()} if ref_run is not None else {},
                      time.perf_counter() - started)


def _reference(reference: str | Path, model) -> tuple[str, RunFn]:
    """(label, run) for ``reference``; its outputs keyed by ``model``'s output names."""
    names = [o.name for o in model.outputs]
    if str(reference) == "source":
        from qcompile.frontend.reference import reference_runner

        framework, run = reference_runner(model.manifest)
        return f"{framework} ({model.manifest.model.get('path') or model.manifest.model.get('name')})", run
    path = Path(reference)
    if not path.is_file():
        raise ArtifactError(f"reference {path} does not exist; give a .so, an .onnx or 'source'")
    if path.suffix == ".so":
        from qcompile.runtime import CompiledModel

        other = CompiledModel.load(path)
        if [o.name for o in other.outputs] != names:
            raise ArtifactError(f"reference {path} has outputs {[o.name for o in other.outputs]}, "
                                f"{Path(model.library).name} has {names}: not the same model")
        return str(path), other.run
    if path.suffix == ".onnx":
        from qcompile.frontend.reference import onnx_session

        session = onnx_session(path)
        in_names = [i.name for i in session.get_inputs()]

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            values = list(feeds.values()) if not set(in_names) <= set(feeds) else [feeds[n] for n in in_names]
            return dict(zip(names, session.run(None, dict(zip(in_names, values)))))

        return f"ONNX Runtime ({path})", run
    raise ConfigError(f"reference {path}: expected a .so, an .onnx or 'source'")
