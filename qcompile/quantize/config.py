"""Quantization configuration: a frozen, validated, serialisable dataclass."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qcompile.errors import ConfigError
from qcompile.quantize.observers import OBSERVERS

CALIBRATION_METHODS = tuple(OBSERVERS)
VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    """Post-training int8 quantization options (names follow ONNX Runtime where they exist).

    activation_symmetric: False gives uint8 activations with a zero point (ORT's U8S8
    default, what x86 VNNI multiplies); True gives int8 activations with zero point 0.
    Weights are always int8, symmetric, in [-127, 127]; per channel unless per_channel=False.
    reduce_range: weights in [-63, 63] (7 bits, ONNX Runtime's reduce_range), which x86
    CPUs without VNNI need for their fast u8 x s8 instruction (vpmaddubsw saturates int16
    pair sums of 8-bit weights); None: decided by the target (see ``for_target``).
    """

    calibration_method: str = "minmax"
    percentile: float = 99.99
    activation_symmetric: bool = False
    per_channel: bool = True
    num_samples: int = 64
    keep_float: tuple[str, ...] = field(default_factory=tuple)
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"--calib-method: expected one of {', '.join(CALIBRATION_METHODS)}, but got {self.calibration_method!r}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"--percentile: expected a value in (50, 100], but got {self.percentile}")
        if self.num_samples < 1:
            raise ConfigError(f"--calib-samples: expected at least 1, but got {self.num_samples}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))

    @property
    def weight_qmax(self) -> int:
        return 63 if self.reduce_range else 127

    def for_target(self, target) -> "QuantConfig":
        """This config with ``reduce_range`` decided where it is None: True exactly where
        the target's int8 kernels would otherwise lose their fast instruction."""
        if self.reduce_range is not None:
            return self
        from qcompile.kernels.int8_dot import int8_dot_for

        dot = int8_dot_for(target)
        needs = dot is not None and dot.pair_saturates and dot.activation_dtype == self.activation_dtype
        return replace(self, reduce_range=needs)

    @property
    def activation_dtype(self) -> str:
        return "int8" if self.activation_symmetric else "uint8"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["keep_float"] = list(self.keep_float)
        data["version"] = VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        version = data.pop("version", VERSION)
        if version != VERSION:
            raise ConfigError(f"quantization config version {version} is not {VERSION}")
        data.setdefault("reduce_range", False)  # configs written before the option existed
        return cls(**data)
