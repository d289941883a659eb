"""Quantization configuration: frozen, validated, serialisable.

``Int8Config`` is what a user writes; :class:`Calibration` and the weight granularities
(:class:`PerChannel`, :class:`PerTensor`) are small typed values, not strings.  Invalid
values raise :class:`~qcompile.errors.ConfigError` naming the parameter (the CLI adds its
flag name).  ``to_json``/``from_json`` round-trip the config through the manifest.
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


Granularity = Union[PerChannel, PerTensor]
_GRANULARITIES = {"per_channel": PerChannel(), "per_tensor": PerTensor()}


def config_error(parameter: str, expected: str, got: Any) -> ConfigError:
    """``ConfigError("Int8Config.<parameter>: expected ..., but got ...")`` carrying the parameter."""
    exc = ConfigError(f"Int8Config.{parameter}: expected {expected}, but got {got!r}")
    exc.parameter = parameter  # the CLI names its flag for it
    return exc


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
    """

    calibration: Calibration = Calibration.MINMAX
    percentile: float = 99.99
    weights: Granularity = field(default_factory=PerChannel)
    activation_symmetric: bool = False
    num_samples: int = 64
    keep_float: tuple[str, ...] = field(default_factory=tuple)
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "calibration", Calibration(self.calibration))
        except ValueError:
            raise config_error("calibration", f"one of {', '.join(CALIBRATION_METHODS)}", self.calibration) from None
        if isinstance(self.weights, str) and self.weights in _GRANULARITIES:
            object.__setattr__(self, "weights", _GRANULARITIES[self.weights])
        if not isinstance(self.weights, (PerChannel, PerTensor)):
            raise config_error("weights", "PerChannel() or PerTensor()", self.weights)
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < self.percentile <= 100.0:
            raise config_error("percentile", "a value in (50, 100]", self.percentile)
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise config_error("num_samples", "an integer of at least 1", self.num_samples)
        if isinstance(self.keep_float, str):
            object.__setattr__(self, "keep_float", (self.keep_float,))
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if not all(isinstance(k, str) and k for k in self.keep_float):
            raise config_error("keep_float", "layer names such as conv2d_0, first, last or matmul", self.keep_float)
        for name in ("activation_symmetric",):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, "True or False", getattr(self, name))
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise config_error("reduce_range", "True, False or None", self.reduce_range)

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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Int8Config":
        data = dict(data)
        version = data.pop("version", VERSION)
        if version != VERSION:
            raise ConfigError(f"quantization config version {version} is not {VERSION}: rebuild the artifact")
        return cls(**data)


@dataclass(frozen=True)
class QuantizationInfo:
    """What quantization made of a model; carried by the ImportedModel and written to the manifest.

    source: ``qcompile-ptq`` (calibrated here) or ``<kind>-qdq`` (a pre-quantized import).
    layers: one entry per integer layer (op, dtypes, scales) as realize reports them.
    float_layers: layers kept in float on request; float_ops: op -> count left in float;
    float_nodes: conv2d/matmul a pre-quantized model left float (an unsupported QDQ pattern).
    """

    source: str
    activation_dtype: str | None
    layers: tuple[dict, ...]
    config: Int8Config | None = None
    weight_range: tuple[int, int] | None = None
    float_layers: tuple[str, ...] = ()
    float_ops: dict[str, int] = field(default_factory=dict)
    float_nodes: tuple[str, ...] = ()

    scheme = "int8"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"scheme": self.scheme, "source": self.source}
        if self.config is not None:
            data["config"] = self.config.to_json()
        data.update({
            "activation_dtype": self.activation_dtype,
            "weight_dtype": "int8",
            "layers": list(self.layers),
            "float_layers": list(self.float_layers),
            "float_ops": dict(self.float_ops),
        })
        if self.weight_range is not None:
            data["weight_range"] = list(self.weight_range)
        if self.float_nodes:
            data["float_nodes"] = list(self.float_nodes)
        return data
