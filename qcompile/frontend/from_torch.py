"""PyTorch import: torchvision model names and saved ``torch.export`` programs (``.pt2``).

torch is an optional extra (``pip install qcompile[torch]``): it is imported on first use,
and its absence is a one-line error naming the extra.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from qcompile.errors import (
    ConfigError,
    MissingDependencyError,
    ModelImportError,
    first_line,
)
from qcompile.frontend.signature import finish
from qcompile.manifest import sha256_file
from qcompile.model import ImportedModel, ModelSource, resolve_input_names

# Default input sizes for torchvision models (batch 1, NCHW).
_DEFAULT_IMAGE_SIZE = {"inception_v3": 299}


def import_torchvision(
    name: str, input_shapes: dict[str, tuple[int, ...]], weights: str | None = None
) -> ImportedModel:
    """Build a torchvision model (``weights=None``; seeded init, or ``weights`` file) and import it."""
    torch, torchvision = _import_torch()
    available = set(torchvision.models.list_models())
    if name not in available:
        close = sorted(m for m in available if name.lower()[:3] in m)[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelImportError(
            f"unknown model name {name!r}: not a torchvision model nor an existing .onnx/.pt2 file{hint}"
        )
    net = torchvision_module(name, weights)
    shape = _single_input_shape(input_shapes, default=_default_image_shape(name))
    example = torch.zeros(shape, dtype=torch.float32)
    try:
        program = torch.export.export(net, (example,))
    except Exception as exc:  # torch raises many types here
        raise ModelImportError(f"torch.export failed for {name}: {first_line(exc)}") from exc
    sha = _sha256_state_dict(net)
    source = ModelSource("torchvision", name, None, str(Path(weights).resolve()) if weights else None, sha)
    return _from_exported_program(program, source)


def torchvision_module(name: str, weights: str | None = None):
    """The eval-mode torchvision module qcompile builds for ``name`` (also the reference)."""
    torch, torchvision = _import_torch()
    # Seeded so that a weight-less build and its PyTorch reference have the same weights.
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None)
    if weights:
        wpath = Path(weights)
        if not wpath.is_file():
            raise ModelImportError(f"weights file {weights} does not exist")
        try:
            state = torch.load(wpath, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            net.load_state_dict(state)
        except Exception as exc:
            raise ModelImportError(f"weights file {weights}: cannot load into {name}: {first_line(exc)}") from exc
    return net.eval()


def import_pt2(path: Path, input_shapes: dict[str, tuple[int, ...]], trust: bool = False) -> ImportedModel:
    """Import a saved ``torch.export`` program; re-export with static shapes if needed.

    Unless ``trust``, the archive is checked first (:mod:`qcompile.frontend.pt2_safety`) and
    refused if loading it would unpickle anything beyond tensors."""
    torch, _ = _import_torch()
    if not trust:
        from qcompile.frontend.pt2_safety import unsafe_members

        unsafe = unsafe_members(path)
        if unsafe:
            raise ModelImportError(
                f"model file {path}: holds pickled objects that loading would execute ({', '.join(unsafe[:3])}); "
                "load it only if you trust its source: --trust-pt2 (Python: trust_pt2=True)")
    _register_pt2e_ops()
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelImportError(f"model file {path}: not a loadable torch.export program (.pt2): {first_line(exc)}") from exc
    specs = _pt2_input_specs(program)
    needs_static = any(not all(isinstance(d, int) for d in shape) for _, shape, _ in specs)
    overridden = {n: s for n, s in resolve_input_names(input_shapes, [n for n, _, _ in specs], str(path)).items()}
    if needs_static or any(tuple(s) != tuple(shape) for n, shape, _ in specs if (s := overridden.get(n))):
        examples = []
        for name, shape, dtype in specs:
            static = overridden.get(name)
            if static is None:
                if not all(isinstance(d, int) for d in shape):
                    raise ModelImportError(
                        f"model file {path}: input {name!r} has dynamic shape {list(map(str, shape))}; "
                        f"give --input-shape {name}:1x3x224x224 (your sizes)"
                    )
                static = tuple(shape)
            examples.append(torch.zeros(static, dtype=dtype))
        try:
            # Guards pin the shapes the program was exported with; the new shapes replace them.
            program = torch.export.export(program.module(check_guards=False), tuple(examples))
        except Exception as exc:
            raise ModelImportError(
                f"model file {path}: re-exporting at input shapes {[tuple(e.shape) for e in examples]} failed "
                f"({first_line(exc)}); export the program with these shapes or with dynamic_shapes"
            ) from exc
    source = ModelSource("pt2", path.stem, str(path.resolve()), None, sha256_file(path))
    return _from_exported_program(program, source)


def _register_pt2e_ops() -> None:
    """Register ``quantized_decomposed`` ops so PT2E-quantized programs deserialize."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:
        try:
            import torchao.quantization.pt2e  # noqa: F401
        except ImportError:
            pass


def _pt2_input_specs(program) -> list[tuple[str, tuple, Any]]:
    from torch.export.graph_signature import InputKind

    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in user:
        val = nodes[name].meta.get("val")
        shape = tuple(int(d) if str(d).lstrip("-").isdigit() else d for d in val.shape)
        specs.append((name, shape, val.dtype))
    return specs


def _from_exported_program(program, source: ModelSource) -> ImportedModel:
    from tvm.relax.frontend.torch import from_exported_program

    from qcompile.frontend.pt2e import CONVERT_MAP

    try:
        mod = from_exported_program(program, custom_convert_map=CONVERT_MAP)
    except Exception as exc:
        raise ModelImportError(f"{source.kind} model {source.name}: Relax import failed: {first_line(exc)}") from exc
    return finish(mod, source, output_names=None)


def _single_input_shape(shapes: dict[str, tuple[int, ...]], default: tuple[int, ...]) -> tuple[int, ...]:
    if len(shapes) > 1:
        raise ConfigError("torchvision models have one input; give one --input-shape")
    return next(iter(shapes.values()), default)


def _default_image_shape(name: str) -> tuple[int, ...]:
    size = _DEFAULT_IMAGE_SIZE.get(name, 224)
    return (1, 3, size, size)


def _sha256_state_dict(net) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _import_torch():
    try:
        import torch
        import torchvision
    except ImportError as exc:
        raise MissingDependencyError(
            "importing PyTorch models (torchvision names, .pt2) needs torch and torchvision: "
            "pip install 'qcompile[torch]'"
        ) from exc
    return torch, torchvision
