"""Import: torchvision names, ``torch.export`` programs (.pt2) and ONNX files into Relax.

Each importer returns an :class:`~qcompile.model.ImportedModel` whose ``mod["main"]``
takes the model inputs and returns its outputs, with weights bound as constants.
Frameworks are imported lazily so that ONNX users and ``qcompile.runtime`` never need torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from qcompile.errors import ConfigError, ModelImportError
from qcompile.model import ImportedModel

__all__ = ["import_model"]


def _import_onnx_file(path: Path, shapes: dict, trust: bool = False) -> ImportedModel:
    from qcompile.frontend.from_onnx import import_onnx

    return import_onnx(path, shapes)


def _import_pt2_file(path: Path, shapes: dict, trust: bool = False) -> ImportedModel:
    from qcompile.frontend.from_torch import import_pt2

    return import_pt2(path, shapes, trust=trust)


def import_model(
    model: str,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    weights: str | None = None,
    trust_pt2: bool = False,
) -> ImportedModel:
    """Import ``model`` (torchvision name, ``.pt2`` or ``.onnx`` path) into Relax.

    ``input_shapes`` fixes input shapes by name ('' for a model's only input); ``weights`` is a
    state_dict for a torchvision name.  A ``.pt2`` whose archive holds pickled objects beyond
    tensors (which unpickling could run code from) is refused unless ``trust_pt2``."""
    shapes = dict(input_shapes or {})
    path = Path(model)
    suffix = path.suffix.lower()
    if suffix in _FILE_IMPORTERS:
        if not path.is_file():
            raise ModelImportError(f"model file {model} does not exist")
        if weights:
            raise ConfigError("--weights applies to torchvision model names only, not to model files")
        return _FILE_IMPORTERS[suffix](path, shapes, trust=trust_pt2)
    if path.suffix or "/" in model:
        raise ModelImportError(
            f"model {model!r}: unsupported file type {path.suffix or '(none)'}; "
            "give a torchvision model name, a .pt2 (torch.export) or an .onnx file"
        )
    from qcompile.frontend.from_torch import import_torchvision

    return import_torchvision(model, shapes, weights)


_FILE_IMPORTERS: dict[str, Callable[..., ImportedModel]] = {
    ".onnx": _import_onnx_file,
    ".pt2": _import_pt2_file,
}
