"""The imported model's signature: inputs and outputs read off the Relax ``main``."""
from __future__ import annotations

from qcompile.errors import ModelImportError
from qcompile.model import ImportedModel, ModelSource, TensorInfo


def finish(mod, source: ModelSource, output_names: list[str] | None) -> ImportedModel:
    """Describe inputs/outputs from the Relax signature; reject non-static shapes."""
    main = mod["main"]
    inputs = [tensor_info(p.name, p.ty, source) for p in main.params]
    rets = _flatten_tensor_types(main.ret_ty)
    if output_names is None or len(output_names) != len(rets):
        output_names = [f"output{i}" for i in range(len(rets))]
    outputs = [tensor_info(n, t, source) for n, t in zip(output_names, rets)]
    return ImportedModel(mod=mod, source=source, inputs=inputs, outputs=outputs)


def _flatten_tensor_types(ty) -> list:
    fields = getattr(ty, "fields", None)
    if fields is None:
        return [ty]
    out = []
    for f in fields:
        out.extend(_flatten_tensor_types(f))
    return out


def tensor_info(name: str, ty, source: ModelSource) -> TensorInfo:
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
