"""The one-call API: what ``qcompile build`` / ``tune`` do, as Python functions.

Each function takes paths or the previous stage's typed result, and a target as a
:class:`~qcompile.target.TargetSpec` or any string ``qcompile --target`` accepts.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompile.errors import ConfigError
from qcompile.model import ImportedModel

if TYPE_CHECKING:
    from qcompile.build import Artifact
    from qcompile.quantize.config import DynamicInt8Config, Int4WeightConfig, Int8Config
    from qcompile.quantize.data import ImagePreprocess
    from qcompile.runtime import CompiledModel
    from qcompile.target import TargetSpec
    from qcompile.tune.search import TuneResult

Progress = Callable[[str], None]


def import_model(model: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 weights: str | Path | None = None, trust_pt2: bool = False) -> ImportedModel:
    """Import a torchvision name, a ``.pt2`` or an ``.onnx`` file (see :func:`qcompile.frontend.import_model`)."""
    from qcompile.frontend import import_model as _import

    return _import(str(model), input_shapes, weights=str(weights) if weights else None, trust_pt2=trust_pt2)


def quantize(model: ImportedModel, calibration_data: Any,
             config: Int8Config | DynamicInt8Config | Int4WeightConfig | None = None,
             target: TargetSpec | str = "native", preprocess: ImagePreprocess | None = None,
             progress: Progress | None = None) -> ImportedModel:
    """Calibrate ``model`` on ``calibration_data`` and realize integer kernels for ``target``.

    ``calibration_data``: a path (.npz keyed by input name, .npy, a folder of images), an
    array (one input, samples first), a mapping of input name to arrays, or an iterable of
    ``{input name: batch}`` dicts.  The result carries ``.quantization`` for the manifest.
    With a :class:`DynamicInt8Config` or an :class:`Int4WeightConfig` there is no
    calibration: ``calibration_data`` is None."""
    from qcompile.quantize import quantize_model
    from qcompile.quantize.config import DynamicInt8Config, Int4WeightConfig, Int8Config
    from qcompile.quantize.data import ImagePreprocess, as_batches
    from qcompile.target import as_target

    config = config or Int8Config()
    if isinstance(config, DynamicInt8Config):
        if calibration_data is not None:
            raise ConfigError(_DYNAMIC_NO_DATA)
        from qcompile.quantize.pipeline import quantize_dynamic_model

        return quantize_dynamic_model(model, config, as_target(target).to_tvm(), progress)
    if isinstance(config, Int4WeightConfig):
        if calibration_data is not None:
            raise ConfigError(_INT4_NO_DATA)
        from qcompile.quantize.pipeline import quantize_int4_weights

        return quantize_int4_weights(model, config, as_target(target).to_tvm(), progress)
    if not isinstance(config, Int8Config):
        raise ConfigError(f"quantization: expected an Int8Config, a DynamicInt8Config or an Int4WeightConfig, "
                          f"but got {type(config).__name__}")
    batches = as_batches(calibration_data, model.inputs, preprocess or ImagePreprocess())
    return quantize_model(model, batches, config, as_target(target).to_tvm(), progress)


_DYNAMIC_NO_DATA = ("DynamicInt8Config quantizes activations at run time and takes no calibration_data "
                    "(CLI: --quantize int8-dynamic without --calib-data)")
_INT4_NO_DATA = ("Int4WeightConfig quantizes weights only and takes no calibration_data "
                 "(CLI: --quantize int4 without --calib-data)")


def prepare(model: str | Path | ImportedModel, target: TargetSpec | str = "native", *,
            quantization: Int8Config | DynamicInt8Config | Int4WeightConfig | None = None,
            calibration_data: Any = None,
            input_shapes: dict[str, tuple[int, ...]] | None = None, weights: str | Path | None = None,
            trust_pt2: bool = False, preprocess: ImagePreprocess | None = None,
            progress: Progress | None = None) -> ImportedModel:
    """Import (unless already imported) and quantize as asked: the model a build or tune takes.

    A model imported in QDQ form (ONNX QDQ/QOperator, PT2E) gets its integer kernels without
    calibration; ``quantization`` then is an error (it is quantized already).  A
    :class:`DynamicInt8Config` or :class:`Int4WeightConfig` needs no ``calibration_data``
    (giving it is an error)."""
    from qcompile.quantize.config import DynamicInt8Config, Int4WeightConfig

    say = progress or (lambda _m: None)
    dynamic = isinstance(quantization, (DynamicInt8Config, Int4WeightConfig))  # no calibration
    if quantization is None and calibration_data is not None:
        raise ConfigError("calibration_data applies with quantization=Int8Config(...) (CLI: --quantize int8)")
    if dynamic and calibration_data is not None:
        raise ConfigError(_INT4_NO_DATA if isinstance(quantization, Int4WeightConfig) else _DYNAMIC_NO_DATA)
    if quantization is not None and not dynamic and calibration_data is None:
        raise ConfigError("quantization needs calibration_data (CLI: --calib-data PATH: .npz, .npy or a folder "
                          "of images)")
    if not isinstance(model, ImportedModel):
        say(f"importing {model} ...")
        model = import_model(model, input_shapes, weights=weights, trust_pt2=trust_pt2)
    elif input_shapes or weights:
        raise ConfigError("input_shapes/weights apply when importing; this model is imported already")
    if model.is_quantized:
        if quantization is not None:
            raise ConfigError(f"model {model.source.name} is quantized already; give the float model to quantize")
        return model
    from qcompile.quantize import has_qdq, realize_prequantized

    if has_qdq(model.mod):
        if quantization is not None:
            raise ConfigError(f"model {model.source.name} is pre-quantized (QDQ); build it without quantization "
                              "(CLI: without --quantize int8), or give the float model")
        say("model is pre-quantized (QDQ): realizing integer kernels ...")
        model = realize_prequantized(model, source=f"{model.source.kind}-qdq")
        from qcompile.quantize.dynamic import realize_dynamic_prequantized

        # ONNX Runtime's quantize_dynamic: activations quantized at run time (DynamicQuantizeLinear)
        model = realize_dynamic_prequantized(model)
        nodes = model.quantization.float_nodes
        if nodes:  # a QDQ pattern realize does not know: name it
            say(f"warning: {len(nodes)} conv2d/matmul stayed float (unsupported QDQ pattern): {', '.join(nodes[:5])}")
        return model
    if quantization is None:
        return model
    if isinstance(quantization, Int4WeightConfig):
        say(f"quantizing dense-layer weights to int4 (group {quantization.group_size}, float activations) ...")
        return quantize(model, None, quantization, target, progress=progress)
    if dynamic:
        say("quantizing dynamically (int8 weights, activations quantized at run time) ...")
        return quantize(model, None, quantization, target, progress=progress)
    where = calibration_data if isinstance(calibration_data, (str, Path)) else "the calibration data"
    say(f"calibrating on {where} ({quantization.calibration_method}, up to {quantization.num_samples} samples) ...")
    return quantize(model, calibration_data, quantization, target, preprocess=preprocess, progress=progress)


def compile(model: str | Path | ImportedModel, target: TargetSpec | str = "native", *,  # noqa: A001 -- the API's name
            quantization: Int8Config | DynamicInt8Config | Int4WeightConfig | None = None,
            calibration_data: Any = None,
            out_dir: str | Path = "out", name: str | None = None,
            input_shapes: dict[str, tuple[int, ...]] | None = None, weights: str | Path | None = None,
            trust_pt2: bool = False, preprocess: ImagePreprocess | None = None,
            tuning_logs: str | Path | None | bool = None, dump_ir: str | Path | None = None,
            progress: Progress | None = None) -> Artifact:
    """Import, quantize (with ``quantization``), and build ``model`` for ``target`` into
    ``out_dir/NAME.so`` + ``NAME.manifest.json`` -- what ``qcompile build`` does.

    NAME defaults to the model's name, with ``-int8`` (``-int8-dynamic``, ``-int4``) when qcompile quantized it.  Tuning
    records for the target are applied (``tuning_logs``: a records folder, or False for none)."""
    from qcompile.build import build

    prepared = prepare(model, target, quantization=quantization, calibration_data=calibration_data,
                       input_shapes=input_shapes, weights=weights, trust_pt2=trust_pt2,
                       preprocess=preprocess, progress=progress)
    if name is None:
        name = prepared.source.name
        if prepared.quantization is not None and prepared.quantization.source == "qcompile-ptq":
            name = f"{name}-int8"
        elif prepared.quantization is not None and prepared.quantization.source == "qcompile-dynamic":
            name = f"{name}-int8-dynamic"
        elif prepared.quantization is not None and prepared.quantization.source == "qcompile-int4":
            name = f"{name}-int4"
    return build(prepared, target, Path(out_dir), name=name, dump_ir=Path(dump_ir) if dump_ir else None,
                 progress=progress, tuning_logs=tuning_logs)


def build(model: ImportedModel, target: TargetSpec | str = "native", out_dir: str | Path = "out",
          **options) -> Artifact:
    """Build an imported (optionally quantized) model: :func:`qcompile.build.build`."""
    from qcompile.build import build as _build

    return _build(model, target, Path(out_dir), **options)


def tune(model: str | Path | ImportedModel, target: TargetSpec | str = "native", trials: int | None = None, *,
         max_trials_per_task: int | None = None, log_dir: str | Path | None = None, rpc=None,
         quantization: Int8Config | DynamicInt8Config | Int4WeightConfig | None = None,
         calibration_data: Any = None,
         input_shapes: dict[str, tuple[int, ...]] | None = None, weights: str | Path | None = None,
         trust_pt2: bool = False, progress: Progress | None = None) -> TuneResult:
    """MetaSchedule-tune ``model``'s kernels for ``target`` -- what ``qcompile tune`` does.

    ``trials`` defaults to the target preset's (else 2000).  Records go to ``log_dir``, else
    ``QCOMPILE_TUNING_LOGS``, else ``~/.cache/qcompile/tuning_logs``; builds read them there.
    ``rpc`` (a :class:`qcompile.runtime.rpc.RpcEndpoint`) measures on a remote board."""
    from qcompile.target import as_target
    from qcompile.tune.search import tune as _tune

    spec = as_target(target)
    prepared = prepare(model, spec, quantization=quantization, calibration_data=calibration_data,
                       input_shapes=input_shapes, weights=weights, trust_pt2=trust_pt2, progress=progress)
    trials = trials if trials is not None else int(spec.tuning.get("trials", 2000))
    per_task = max_trials_per_task or spec.tuning.get("max_trials_per_task")
    return _tune(prepared, spec, trials, per_task, Path(log_dir) if log_dir else None, rpc=rpc, progress=progress)


def load(library: str | Path, rpc=None) -> CompiledModel:
    """Load a built ``.so`` (its manifest beside it) to run here, or on ``rpc``'s device."""
    from qcompile.runtime import CompiledModel

    return CompiledModel.load(library, rpc=rpc)
