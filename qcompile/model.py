"""Typed hand-offs between stages: tensor descriptions and the imported model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompile.errors import ConfigError

if TYPE_CHECKING:
    from qcompile.quantize.config import QuantizationInfo


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TensorInfo":
        return cls(str(obj["name"]), tuple(int(d) for d in obj["shape"]), str(obj["dtype"]))


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, enough to rebuild its framework reference."""

    kind: str  # "torchvision" | "pt2" | "onnx"
    name: str  # model name (torchvision) or file stem
    path: str | None  # model file, if any
    weights: str | None  # --weights file for torchvision models
    sha256: str  # hash of the model file or of the weights

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ImportedModel:
    """A Relax IRModule with its inputs/outputs, ready for quantize/build.

    ``quantization`` is None for a float model; quantizing (or importing a pre-quantized
    model and realizing it) returns a new ImportedModel that carries what was done, which
    the build writes into the manifest."""

    mod: Any  # tvm.IRModule
    source: ModelSource
    inputs: list[TensorInfo]
    outputs: list[TensorInfo] = field(default_factory=list)
    quantization: "QuantizationInfo | None" = None

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape name:1x3x224x224`` (or ``name:[1,3,224,224]``) options.

    A spec without ``name:`` applies to the model's only input (key ``""``).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep:
            name, dims = "", spec
        text = dims.strip().strip("[]()").replace(",", "x")
        try:
            shape = tuple(int(d) for d in text.split("x") if d.strip())
        except ValueError:
            raise ConfigError(
                f"--input-shape {spec!r}: expected NAME:DxDxD (e.g. input:1x3x224x224)"
            ) from None
        if not shape or any(d <= 0 for d in shape):
            raise ConfigError(f"--input-shape {spec!r}: dimensions must be positive integers")
        if name in shapes:
            raise ConfigError(f"--input-shape given twice for {name or 'the input'!r}")
        shapes[name] = shape
    return shapes


def read_arrays(path: Path, names: list[str]) -> dict:
    """Arrays from an ``.npz`` (keyed by input name) or an ``.npy``; a single-input model
    takes its one array under any key.  np.load's errors propagate for unreadable files."""
    import numpy as np

    if path.suffix == ".npy":
        arrays = {"": np.load(path, allow_pickle=False)}
    else:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    if len(arrays) == 1 and len(names) == 1:
        return {names[0]: next(iter(arrays.values()))}
    return arrays


def resolve_input_names(shapes: dict[str, tuple[int, ...]], names: list[str], where: str) -> dict[str, tuple[int, ...]]:
    """Map ``--input-shape`` keys to model input names ('' means the only input)."""
    out = {}
    for key, shape in shapes.items():
        if key == "":
            if len(names) != 1:
                raise ConfigError(f"{where}: --input-shape without a name is ambiguous; inputs are {', '.join(names)}")
            key = names[0]
        if key not in names:
            raise ConfigError(f"{where}: --input-shape names {key!r}, but the inputs are {', '.join(names)}")
        out[key] = shape
    return out
