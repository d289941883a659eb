"""Import: torchvision names, ``torch.export`` programs (.pt2) and ONNX files into Relax.

Each importer returns an :class:`~qcompile.model.ImportedModel` whose ``mod["main"]``
takes the model inputs and returns its outputs, with weights bound as constants.
Frameworks are imported lazily so that ``qcompile.runtime`` never pulls in torch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, MissingDependencyError, ModelImportError, first_line
from .manifest import sha256_file
from .model import ImportedModel, ModelSource, TensorInfo, resolve_input_names

# Default input sizes for torchvision models (batch 1, NCHW).
_DEFAULT_IMAGE_SIZE = {"inception_v3": 299}


def import_model(
    model: str,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    weights: str | None = None,
) -> ImportedModel:
    """Import ``model`` (torchvision name, ``.pt2`` or ``.onnx`` path) into Relax."""
    shapes = dict(input_shapes or {})
    path = Path(model)
    suffix = path.suffix.lower()
    if suffix in _FILE_IMPORTERS:
        if not path.is_file():
            raise ModelImportError(f"model file {model} does not exist")
        if weights:
            raise ConfigError("--weights applies to torchvision model names only, not to model files")
        return _FILE_IMPORTERS[suffix](path, shapes)
    if path.suffix or "/" in model:
        raise ModelImportError(
            f"model {model!r}: unsupported file type {path.suffix or '(none)'}; "
            "give a torchvision model name, a .pt2 (torch.export) or an .onnx file"
        )
    return import_torchvision(model, shapes, weights)


# --------------------------------------------------------------------------- torch


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


def import_pt2(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> ImportedModel:
    """Import a saved ``torch.export`` program; re-export with static shapes if needed."""
    torch, _ = _import_torch()
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

    from .pt2e import CONVERT_MAP

    try:
        mod = from_exported_program(program, custom_convert_map=CONVERT_MAP)
    except Exception as exc:
        raise ModelImportError(f"{source.kind} model {source.name}: Relax import failed: {first_line(exc)}") from exc
    return _finish(mod, source, output_names=None)


# --------------------------------------------------------------------------- ONNX


def import_onnx(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> ImportedModel:
    """Import an ONNX file; symbolic input dims must be fixed by the model or ``input_shapes``."""
    onnx = _import_onnx()
    from . import onnx_shapes

    from . import onnx_qoperator

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelImportError(f"model file {path}: not a valid ONNX model: {first_line(exc)}") from exc
    if onnx_qoperator.is_qoperator(proto):  # one QDQ representation for every source
        proto = onnx_qoperator.to_qdq(proto, str(path))
    proto, shapes, dtypes = onnx_shapes.fix_input_shapes(proto, input_shapes, str(path))
    proto = onnx_shapes.fold_shape_computations(proto)
    onnx_shapes.check_reshapes_static(proto, str(path))
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(proto, shape_dict={k: list(v) for k, v in shapes.items()}, dtype_dict=dtypes)
    except Exception as exc:
        raise ModelImportError(f"model file {path}: Relax ONNX import failed: {first_line(exc)}") from exc
    source = ModelSource("onnx", path.stem, str(path.resolve()), None, sha256_file(path))
    return _finish(mod, source, output_names=[o.name for o in proto.graph.output])


# --------------------------------------------------------------------------- shared


def _finish(mod, source: ModelSource, output_names: list[str] | None) -> ImportedModel:
    """Describe inputs/outputs from the Relax signature; reject non-static shapes."""
    main = mod["main"]
    inputs = [_tensor_info(p.name, p.ty, source) for p in main.params]
    rets = _flatten_tensor_types(main.ret_ty)
    if output_names is None or len(output_names) != len(rets):
        output_names = [f"output{i}" for i in range(len(rets))]
    outputs = [_tensor_info(n, t, source) for n, t in zip(output_names, rets)]
    return ImportedModel(mod=mod, source=source, inputs=inputs, outputs=outputs)


def _flatten_tensor_types(ty) -> list:
    fields = getattr(ty, "fields", None)
    if fields is None:
        return [ty]
    out = []
    for f in fields:
        out.extend(_flatten_tensor_types(f))
    return out


def _tensor_info(name: str, ty, source: ModelSource) -> TensorInfo:
    shape = getattr(ty, "shape", None)
    dims = []
    for d in getattr(shape, "values", None) or []:
        value = getattr(d, "value", None)
        if value is None:
            raise ModelImportError(
                f"{source.kind} model {source.name}: {name!r} has a dynamic dimension ({d}); "
                f"fix it with --input-shape NAME:DxDxD"
            )
        dims.append(int(value))
    return TensorInfo(name=name, shape=tuple(dims), dtype=str(ty.dtype))


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
            "importing PyTorch models needs torch and torchvision: pip install torch==2.14.1 torchvision==0.29.1"
        ) from exc
    return torch, torchvision


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("importing ONNX models needs the onnx package: pip install onnx") from exc
    return onnx



_FILE_IMPORTERS: dict[str, Callable[[Path, dict], ImportedModel]] = {
    ".onnx": import_onnx,
    ".pt2": import_pt2,
}
