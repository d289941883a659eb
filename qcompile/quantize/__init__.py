"""int8 quantization: PTQ (annotate -> calibrate -> QDQ) and the realize pass.

``quantize_model`` is the stage's entry point: float ImportedModel + calibration batches in,
an ImportedModel whose ``main`` runs integer conv/dense kernels out, carrying its
:class:`QuantizationInfo`.  Calling the package, ``qcompile.quantize(model, data, config)``,
runs :func:`qcompile.api.quantize` (paths and arrays as calibration data, targets by name).
The configs load without TVM; the steps (:mod:`.pipeline`) are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from qcompile.quantize.config import (
    Calibration,
    DynamicInt8Config,
    Int4WeightConfig,
    Int8Config,
    PerChannel,
    PerTensor,
    QuantizationInfo,
)
from qcompile.stage import make_callable

if TYPE_CHECKING:
    from qcompile.quantize.canonicalize import has_qdq
    from qcompile.quantize.pipeline import quantize_model, realize_prequantized, to_qdq
    from qcompile.quantize.realize import realize

_LAZY = {"quantize_model": "pipeline", "realize_prequantized": "pipeline", "to_qdq": "pipeline",
         "realize": "realize", "has_qdq": "canonicalize"}
__all__ = ["Calibration", "DynamicInt8Config", "Int4WeightConfig", "Int8Config", "PerChannel", "PerTensor", "QuantizationInfo", "has_qdq", "quantize_model",
           "realize", "realize_prequantized", "to_qdq"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"qcompile.quantize.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qcompile.quantize' has no attribute {name!r}")


make_callable(__name__)
