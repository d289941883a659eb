"""qcompile: quantize, tune and compile models with Apache TVM into shared libraries.

The one call::

    import qcompile
    artifact = qcompile.compile("model.onnx", target="x86-avx512",
                                quantization=qcompile.Int8Config(), calibration_data="calib.npz")
    outputs = qcompile.load(artifact.library).run(inputs)

and the stages it runs: :func:`import_model` -> :func:`quantize` -> :func:`tune` ->
:func:`build` -> :func:`load`.  Names are imported on first use, so ``import qcompile``
loads neither TVM's compiler nor torch.
"""
from __future__ import annotations

import importlib
import os as _os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# TVM's runtime thread pool starts with 1 thread on small VMs unless TVM_NUM_THREADS is set;
# default it to every CPU this process may use, before any TVM code runs (a value the user
# set wins).  This and TVM's own registries are the only process-wide state qcompile touches.
if hasattr(_os, "sched_getaffinity"):
    _os.environ.setdefault("TVM_NUM_THREADS", str(len(_os.sched_getaffinity(0))))

# public name -> module that defines it
_EXPORTS = {
    "compile": "qcompile.api", "import_model": "qcompile.api", "load": "qcompile.api", "prepare": "qcompile.api",
    "Artifact": "qcompile.build",
    "CompiledModel": "qcompile.runtime", "BenchResult": "qcompile.runtime",
    "ImportedModel": "qcompile.model", "TensorInfo": "qcompile.model",
    "Manifest": "qcompile.manifest",
    "TargetSpec": "qcompile.target", "resolve_target": "qcompile.target", "list_presets": "qcompile.target",
    "Int8Config": "qcompile.quantize.config", "Calibration": "qcompile.quantize.config",
    "PerChannel": "qcompile.quantize.config", "PerTensor": "qcompile.quantize.config",
    "DynamicInt8Config": "qcompile.quantize.config", "PerRow": "qcompile.quantize.config",
    "Int4WeightConfig": "qcompile.quantize.config",
    "QuantizationInfo": "qcompile.quantize.config", "ImagePreprocess": "qcompile.quantize.data",
    "TuneResult": "qcompile.tune.search",
    "evaluate": "qcompile.accuracy", "EvalResult": "qcompile.accuracy",
    "fit_budget": "qcompile.accuracy.budget", "AccuracyBudget": "qcompile.accuracy.budget",
    "BudgetResult": "qcompile.accuracy.budget",
    **{name: "qcompile.errors" for name in (
        "QcompileError", "ConfigError", "ModelImportError", "BuildError", "RuntimeInputError", "ArtifactError",
        "MissingDependencyError", "MismatchError", "CalibrationError", "TuningError", "RpcError",
        "AccuracyBudgetError")},
}
# Stage packages that are also called as functions (qcompile.stage): qcompile.build(...), qcompile.quantize(...), qcompile.tune(...).
_CALLABLE_PACKAGES = ("build", "quantize", "tune")
# Modules reached as qcompile.<name> without importing them first: qcompile.qat.prepare(...).
_SUBMODULES = ("qat",)
__all__ = sorted([*_EXPORTS, *_CALLABLE_PACKAGES, *_SUBMODULES]) + ["__version__"]

if TYPE_CHECKING:
    from qcompile import build, qat, quantize, tune
    from qcompile.accuracy import EvalResult, evaluate
    from qcompile.api import compile, import_model, load, prepare  # noqa: A004
    from qcompile.build import Artifact
    from qcompile.errors import (
        ArtifactError,
        BuildError,
        CalibrationError,
        ConfigError,
        MismatchError,
        MissingDependencyError,
        ModelImportError,
        QcompileError,
        RpcError,
        RuntimeInputError,
        TuningError,
    )
    from qcompile.manifest import Manifest
    from qcompile.model import ImportedModel, TensorInfo
    from qcompile.quantize.config import (
        Calibration,
        DynamicInt8Config,
        Int4WeightConfig,
        Int8Config,
        PerChannel,
        PerRow,
        PerTensor,
        QuantizationInfo,
    )
    from qcompile.quantize.data import ImagePreprocess
    from qcompile.runtime import BenchResult, CompiledModel
    from qcompile.target import TargetSpec, list_presets, resolve_target
    from qcompile.tune.search import TuneResult


def __getattr__(name: str):
    if name in _CALLABLE_PACKAGES or name in _SUBMODULES:
        return importlib.import_module(f"qcompile.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
