"""Quantization configuration: frozen, validated, serialisable.

``Int8Config`` (calibrated static int8), ``DynamicInt8Config`` (activations quantized at
run time) and ``Int4WeightConfig`` (int4 weight-only dense layers) are what a user writes;
:class:`Calibration` and the granularities (:class:`PerChannel`, :class:`PerTensor`,
:class:`PerRow`) are small typed values, not strings.  Invalid values raise
:class:`~qcompile.errors.ConfigError` naming the parameter (the CLI adds its flag name).
``to_json``/``from_json`` round-trip the config through the manifest.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Union

from qcompile.errors import ConfigError

VERSION = 2


class Calibration(str, enum.Enum):
    """How calibration turns observed activations into a range (see :mod:`.observers`)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


CALIBRATION_METHODS = tuple(m.value for m in Calibration)


@dataclass(frozen=True)
class PerChannel:
    """One weight scale per output channel (ONNX Runtime's per_channel=True)."""

    def to_json(self) -> str:
        return "per_channel"


@dataclass(frozen=True)
class PerTensor:
    """One weight scale per layer."""

    def to_json(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerRow:
    """One run-time activation scale per row (the last axis reduced: per token)."""

    def to_json(self) -> str:
        return "per_row"


Granularity = Union[PerChannel, PerTensor]
ActivationGranularity = Union[PerTensor, PerRow]
_GRANULARITIES = {"per_channel": PerChannel(), "per_tensor": PerTensor()}
_ACTIVATION_GRANULARITIES = {"per_tensor": PerTensor(), "per_row": PerRow()}


def config_error(parameter: str, expected: str, got: Any, owner: str = "Int8Config") -> ConfigError:
    """``ConfigError("<owner>.<parameter>: expected ..., but got ...")`` carrying the parameter."""
    exc = ConfigError(f"{owner}.{parameter}: expected {expected}, but got {got!r}")
    exc.parameter = parameter  # the CLI names its flag for it
    return exc


def _check_shared_fields(config) -> None:
    """Normalise and validate the fields both configs have: ``weights``, ``keep_float``,
    ``activation_symmetric`` and ``reduce_range`` (errors name the config class)."""
    owner = type(config).__name__
    if isinstance(config.weights, str) and config.weights in _GRANULARITIES:
        object.__setattr__(config, "weights", _GRANULARITIES[config.weights])
    if not isinstance(config.weights, (PerChannel, PerTensor)):
        raise config_error("weights", "PerChannel() or PerTensor()", config.weights, owner)
    keep = (config.keep_float,) if isinstance(config.keep_float, str) else tuple(config.keep_float)
    object.__setattr__(config, "keep_float", keep)
    if not all(isinstance(k, str) and k for k in keep):
        raise config_error("keep_float", "layer names such as conv2d_0, first, last or matmul", keep, owner)
    if not isinstance(config.activation_symmetric, bool):
        raise config_error("activation_symmetric", "True or False", config.activation_symmetric, owner)
    if config.reduce_range is not None and not isinstance(config.reduce_range, bool):
        raise config_error("reduce_range", "True, False or None", config.reduce_range, owner)


@dataclass(frozen=True)
class Int8Config:
    """Post-training int8 quantization (names follow ONNX Runtime where they exist).

    calibration: range estimate for activations (a :class:`Calibration` or its name).
    percentile: for ``Calibration.PERCENTILE``, in (50, 100].
    weights: :class:`PerChannel` (default) or :class:`PerTensor`; weights are always int8,
      symmetric, in [-127, 127] ([-63, 63] with ``reduce_range``).
    activation_symmetric: False gives uint8 activations with a zero point (ORT's U8S8
      default, what x86 VNNI multiplies); True gives int8 activations with zero point 0.
    num_samples: calibration samples to read at most.
    keep_float: layers left in float: ``conv2d_N``/``matmul_N`` (``qcompile info --layers``),
      ``first``, ``last``, or an op kind (``conv2d``, ``matmul``).
    reduce_range: 7-bit weights (ONNX Runtime's reduce_range), which x86 CPUs without VNNI
      need for their fast u8 x s8 instruction; None: decided by the target (``for_target``).
    equalize: cross-layer equalization and high-bias absorption of conv pairs before
      calibration (:mod:`qcompile.quantize.equalize`); None: on for ``PerTensor`` weights,
      where one scale must cover every channel, off for ``PerChannel`` (they change little).
    bias_correction: subtract the mean output shift the weights' quantization causes from each
      layer's bias (:mod:`qcompile.quantize.bias_correction`); None: as ``equalize``.
    """

    calibration: Calibration = Calibration.MINMAX
    percentile: float = 99.99
    weights: Granularity = field(default_factory=PerChannel)
    activation_symmetric: bool = False
    num_samples: int = 64
    keep_float: tuple[str, ...] = field(default_factory=tuple)
    reduce_range: bool | None = None
    equalize: bool | None = None
    bias_correction: bool | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "calibration", Calibration(self.calibration))
        except ValueError:
            raise config_error("calibration", f"one of {', '.join(CALIBRATION_METHODS)}", self.calibration) from None
        _check_shared_fields(self)
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < self.percentile <= 100.0:
            raise config_error("percentile", "a value in (50, 100]", self.percentile)
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise config_error("num_samples", "an integer of at least 1", self.num_samples)
        for name in ("equalize", "bias_correction"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise config_error(name, "True, False or None", getattr(self, name))

    @property
    def equalizes(self) -> bool:
        """Whether PTQ equalizes conv pairs: ``equalize``, or where None, per-tensor weights."""
        return self.equalize if self.equalize is not None else not self.per_channel

    @property
    def corrects_bias(self) -> bool:
        """Whether PTQ corrects biases: ``bias_correction``, or where None, per-tensor weights."""
        return self.bias_correction if self.bias_correction is not None else not self.per_channel

    @property
    def calibration_method(self) -> str:
        return self.calibration.value

    @property
    def per_channel(self) -> bool:
        return isinstance(self.weights, PerChannel)

    @property
    def weight_qmax(self) -> int:
        return 63 if self.reduce_range else 127

    @property
    def activation_dtype(self) -> str:
        return "int8" if self.activation_symmetric else "uint8"

    def for_target(self, target) -> "Int8Config":
        """This config with ``reduce_range`` decided where it is None: True exactly where
        the target's int8 kernels would otherwise lose their fast instruction."""
        if self.reduce_range is not None:
            return self
        from qcompile.kernels.int8_dot import int8_dot_for

        dot = int8_dot_for(target)
        needs = dot is not None and dot.pair_saturates and dot.activation_dtype == self.activation_dtype
        return replace(self, reduce_range=needs)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "calibration": self.calibration.value,
            "percentile": self.percentile,
            "weights": self.weights.to_json(),
            "activation_symmetric": self.activation_symmetric,
            "num_samples": self.num_samples,
            "keep_float": list(self.keep_float),
            "reduce_range": self.reduce_range,
            "equalize": self.equalize,
            "bias_correction": self.bias_correction,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Int8Config":
        data = dict(data)
        version = data.pop("version", VERSION)
        if version != VERSION:
            raise ConfigError(f"quantization config version {version} is not {VERSION}: rebuild the artifact")
        return cls(**data)


@dataclass(frozen=True)
class DynamicInt8Config:
    """Dynamic int8 quantization (ONNX Runtime's ``quantize_dynamic``): no calibration data.

    Weights of matmul/dense and conv2d layers become int8 constants, symmetric, per output
    channel (or per layer); activations are quantized while the model runs, from each
    tensor's own min/max, and the int32 accumulator is scaled back to float32.
    weights: :class:`PerChannel` (default) or :class:`PerTensor`.
    activations: :class:`PerTensor` (default, as ONNX Runtime) or :class:`PerRow` (one scale
      per row of a matmul's input, e.g. per token; convs stay per tensor).
    activation_symmetric: False gives uint8 activations with a zero point (ONNX Runtime's
      DynamicQuantizeLinear); True gives int8 activations from the absolute maximum.
    keep_float: layers left in float, as in :class:`Int8Config`.
    reduce_range: 7-bit weights; None: decided by the target (``for_target``).
    """

    weights: Granularity = field(default_factory=PerChannel)
    activations: ActivationGranularity = field(default_factory=PerTensor)
    activation_symmetric: bool = False
    keep_float: tuple[str, ...] = field(default_factory=tuple)
    reduce_range: bool | None = None

    scheme = "int8-dynamic"

    def __post_init__(self) -> None:
        _check_shared_fields(self)
        if isinstance(self.activations, str) and self.activations in _ACTIVATION_GRANULARITIES:
            object.__setattr__(self, "activations", _ACTIVATION_GRANULARITIES[self.activations])
        if not isinstance(self.activations, (PerTensor, PerRow)):
            raise config_error("activations", "PerTensor() or PerRow()", self.activations, type(self).__name__)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.weights, PerChannel)

    @property
    def per_row(self) -> bool:
        return isinstance(self.activations, PerRow)

    @property
    def weight_qmax(self) -> int:
        return 63 if self.reduce_range else 127

    @property
    def activation_dtype(self) -> str:
        return "int8" if self.activation_symmetric else "uint8"

    def for_target(self, target) -> "DynamicInt8Config":
        """This config with ``reduce_range`` decided as :meth:`Int8Config.for_target` does."""
        if self.reduce_range is not None:
            return self
        decided = Int8Config(activation_symmetric=self.activation_symmetric).for_target(target)
        return replace(self, reduce_range=decided.reduce_range)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "weights": self.weights.to_json(),
            "activations": self.activations.to_json(),
            "activation_symmetric": self.activation_symmetric,
            "keep_float": list(self.keep_float),
            "reduce_range": self.reduce_range,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DynamicInt8Config":
        data = dict(data)
        version = data.pop("version", VERSION)
        if version != VERSION:
            raise ConfigError(f"quantization config version {version} is not {VERSION}: rebuild the artifact")
        return cls(**data)


@dataclass(frozen=True)
class Int4WeightConfig:
    """int4 weight-only quantization of matmul/dense layers (GPTQ/AWQ's storage, ONNX
    Runtime's MatMulNBits): no calibration data, activations stay float32.

    Each matmul/dense (Gemm) layer with a constant 2-D weight ``W[K, N]`` stores it as
    4-bit signed integers, symmetric (``q = clip(round(w / s), -8, 7)``, ``s = max|w| / 7``),
    with one float16 scale per group of ``group_size`` consecutive input channels (the
    reduction axis) of each output channel, two values per byte; the kernel dequantizes the
    weight as it multiplies.  A layer whose K is not a multiple of ``group_size`` stays float.
    group_size: a power of two of at least 8 (32: 4.5 bits a weight; 128: 4.125).
    keep_float: layers left in float, as in :class:`Int8Config` (``matmul_N``, ``first``, ...).
    """

    group_size: int = 32
    keep_float: tuple[str, ...] = field(default_factory=tuple)

    scheme = "int4-weight"

    def __post_init__(self) -> None:
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size & (size - 1):
            raise config_error("group_size", "a power of two of at least 8 (32, 64, 128)", size,
                               type(self).__name__)
        keep = (self.keep_float,) if isinstance(self.keep_float, str) else tuple(self.keep_float)
        object.__setattr__(self, "keep_float", keep)
        if not all(isinstance(k, str) and k for k in keep):
            raise config_error("keep_float", "layer names such as matmul_0, first, last or matmul", keep,
                               type(self).__name__)

    def for_target(self, target) -> "Int4WeightConfig":
        return self  # nothing the target decides

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "group_size": self.group_size, "keep_float": list(self.keep_float)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Int4WeightConfig":
        data = dict(data)
        version = data.pop("version", VERSION)
        if version != VERSION:
            raise ConfigError(f"quantization config version {version} is not {VERSION}: rebuild the artifact")
        return cls(**data)


QuantConfig = Union[Int8Config, DynamicInt8Config, Int4WeightConfig]


@dataclass(frozen=True)
class QuantizationInfo:
    """What quantization made of a model; carried by the ImportedModel and written to the manifest.

    source: ``qcompile-ptq`` (calibrated here), ``qcompile-dynamic`` (dynamic quantization
      here), ``qcompile-int4`` (int4 weight-only here) or ``<kind>-qdq`` (a pre-quantized import).
    scheme: ``int8`` (static scales), ``int8-dynamic`` (activations quantized at run time) or
      ``int4-weight`` (int4 weights of dense layers, float activations).
    weight_dtype: ``int8``, or ``int4`` for ``int4-weight``.
    left_float: for ``int4-weight``, the dense layers that stayed float, each with why.
    layers: one entry per integer layer (op, dtypes, scales) as realize reports them.
    float_layers: layers kept in float on request; float_ops: op -> count left in float;
    float_nodes: conv2d/matmul a pre-quantized model left float (an unsupported QDQ pattern).
    embeddings: the embedding tables stored as int8 rows with per-row scales
      (:mod:`qcompile.quantize.embedding`): name, table shape, bytes before and after.
    corrections: what PTQ changed in the float model before calibrating: ``equalized`` and
      ``high_bias_absorbed`` (conv pairs), ``equalize_skipped`` (pairs, with why),
      ``bias_corrected`` (layers); empty where none was asked for.
    """

    source: str
    activation_dtype: str | None
    layers: tuple[dict, ...]
    config: QuantConfig | None = None
    weight_range: tuple[int, int] | None = None
    float_layers: tuple[str, ...] = ()
    float_ops: dict[str, int] = field(default_factory=dict)
    float_nodes: tuple[str, ...] = ()
    scheme: str = "int8"
    embeddings: tuple[dict, ...] = ()
    corrections: dict[str, list[str]] = field(default_factory=dict)
    weight_dtype: str = "int8"
    left_float: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"scheme": self.scheme, "source": self.source}
        if self.config is not None:
            data["config"] = self.config.to_json()
        data.update({
            "activation_dtype": self.activation_dtype,
            "weight_dtype": self.weight_dtype,
            "layers": list(self.layers),
            "float_layers": list(self.float_layers),
            "float_ops": dict(self.float_ops),
        })
        if self.weight_range is not None:
            data["weight_range"] = list(self.weight_range)
        if self.float_nodes:
            data["float_nodes"] = list(self.float_nodes)
        if self.embeddings:
            data["embeddings"] = list(self.embeddings)
        if self.corrections:
            data["corrections"] = {k: list(v) for k, v in self.corrections.items()}
        if self.left_float:
            data["left_float"] = list(self.left_float)
        return data
