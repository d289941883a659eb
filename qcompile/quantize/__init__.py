"""int8 quantization: PTQ (annotate -> calibrate -> QDQ) and the realize pass.

``quantize_model`` is the one call: float ImportedModel + calibration batches in,
ImportedModel whose ``main`` runs integer conv/dense kernels out, with a report for
the manifest.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import tvm

from ..model import ImportedModel
from ..pipeline import PHASES, run_phases
from .config import QuantConfig
from .ptq import annotate, calibrate, emit_qdq
from .realize import realize

__all__ = ["QuantConfig", "quantize_model", "to_qdq", "realize"]


def to_qdq(
    model: ImportedModel,
    batches: Iterable[dict[str, np.ndarray]],
    config: QuantConfig,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
):
    """The float model in QDQ form after calibration: (module, plan, qparams)."""
    mod = run_phases(model.mod, target, phases=PHASES[:1])  # fold batch-norm before calibrating
    plan = annotate(mod["main"], config)
    ranges = calibrate(mod, plan, batches, config, target, progress)
    main, qparams, _ = emit_qdq(mod["main"], plan, ranges, config)
    from ..passes.bindings import with_main

    return with_main(mod, main), plan, qparams


def quantize_model(
    model: ImportedModel,
    batches: Iterable[dict[str, np.ndarray]],
    config: QuantConfig,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
) -> tuple[ImportedModel, dict]:
    """Calibrate, emit QDQ and realize; returns the integer model and manifest info."""
    say = progress or (lambda _m: None)
    qdq_mod, plan, _ = to_qdq(model, batches, config, target, progress)
    say(f"realizing {len(plan.regions)} quantized layers ...")
    int_mod, report = realize(qdq_mod)
    info = {
        "scheme": "int8",
        "source": "qcompile-ptq",
        "config": config.to_json(),
        "activation_dtype": config.activation_dtype,
        "weight_dtype": "int8",
        "layers": report.layers,
        "float_layers": plan.kept_float,
        "float_ops": plan.skipped,
    }
    quantized = ImportedModel(mod=int_mod, source=model.source, inputs=model.inputs, outputs=model.outputs)
    return quantized, info
