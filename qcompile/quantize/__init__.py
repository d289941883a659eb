"""int8 quantization: PTQ (annotate -> calibrate -> QDQ) and the realize pass.

``quantize_model`` is the one call: float ImportedModel + calibration batches in,
ImportedModel whose ``main`` runs integer conv/dense kernels out, with a report for
the manifest.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

import numpy as np
import tvm

from qcompile.build.pipeline import phases_through, run_phases
from qcompile.model import ImportedModel
from qcompile.quantize.canonicalize import canonicalize_qdq, has_qdq
from qcompile.quantize.config import QuantConfig
from qcompile.quantize.ptq import annotate, calibrate, emit_qdq
from qcompile.quantize.realize import realize

__all__ = ["QuantConfig", "quantize_model", "to_qdq", "realize", "realize_prequantized", "has_qdq"]


def to_qdq(
    model: ImportedModel,
    batches: Iterable[dict[str, np.ndarray]],
    config: QuantConfig,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
):
    """The float model in QDQ form after calibration: (module, plan, qparams)."""
    mod = run_phases(model.mod, target, phases=phases_through("inference"))  # fold batch-norm before calibrating
    plan = annotate(mod["main"], config)
    ranges = calibrate(mod, plan, batches, config, target, progress)
    main, qparams, _ = emit_qdq(mod["main"], plan, ranges, config)
    from qcompile.passes.bindings import with_main

    return with_main(mod, main), plan, qparams


def quantize_model(
    model: ImportedModel,
    batches: Iterable[dict[str, np.ndarray]],
    config: QuantConfig,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
) -> tuple[ImportedModel, dict]:
    """Calibrate, emit QDQ and realize; returns the integer model and manifest info.

    ``target`` is the build's: it decides ``reduce_range`` where the config leaves it open.
    Calibration runs the float model here, compiled for this machine (a cross-compiled or GPU
    target cannot run here, and an x86 target with features this CPU lacks would fault)."""
    from qcompile.target import resolve_target

    say = progress or (lambda _m: None)
    config = config.for_target(target)
    qdq_mod, plan, _ = to_qdq(model, batches, config, resolve_target("native").to_tvm(), progress)
    say(f"realizing {len(plan.regions)} quantized layers ...")
    int_mod, report = realize(qdq_mod)
    info = {
        "scheme": "int8",
        "source": "qcompile-ptq",
        "config": config.to_json(),
        "activation_dtype": config.activation_dtype,
        "weight_dtype": "int8",
        "weight_range": [-config.weight_qmax, config.weight_qmax],
        "layers": report.layers,
        "float_layers": plan.kept_float,
        "float_ops": plan.skipped,
    }
    quantized = ImportedModel(mod=int_mod, source=model.source, inputs=model.inputs, outputs=model.outputs)
    return quantized, info


def realize_prequantized(model: ImportedModel, source: str) -> tuple[ImportedModel, dict]:
    """Integer kernels for a model imported in QDQ form (ONNX QDQ/QOperator, PT2E)."""
    mod = canonicalize_qdq(model.mod)
    int_mod, report = realize(mod)
    float_anchors = _float_anchors(int_mod)
    activations = sorted({layer["dtype"].split()[0] for layer in report.layers if layer["op"] in ("conv2d", "matmul")})
    info = {
        "scheme": "int8",
        "source": source,
        "activation_dtype": "/".join(activations) or None,
        "weight_dtype": "int8",
        "layers": report.layers,
        "float_layers": [],
        "float_ops": dict(Counter(op for _, op in float_anchors)),
        "float_nodes": [f"{name} = {op}" for name, op in float_anchors],
    }
    return ImportedModel(mod=int_mod, source=model.source, inputs=model.inputs, outputs=model.outputs), info


def _float_anchors(mod) -> list[tuple[str, str]]:
    """(var name, op) of conv2d/matmul still on float inputs: layers realize could not match."""
    from qcompile.passes.bindings import Graph, dtype_of, op_name

    return [(var.name, op_name(value)) for var, value in Graph.from_main(mod["main"]).bindings
            if op_name(value) in ("relax.nn.conv2d", "relax.matmul") and dtype_of(value.args[0]) == "float32"]
