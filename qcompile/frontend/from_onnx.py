"""ONNX import: fix symbolic shapes, fold shape computations, turn QOperator graphs into QDQ,
then TVM's Relax ONNX frontend."""
from __future__ import annotations

from pathlib import Path

from qcompile.errors import MissingDependencyError, ModelImportError, first_line
from qcompile.frontend.signature import finish
from qcompile.manifest import sha256_file
from qcompile.model import ImportedModel, ModelSource


def import_onnx(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> ImportedModel:
    """Import an ONNX file; symbolic input dims must be fixed by the model or ``input_shapes``."""
    onnx = _import_onnx()
    from qcompile.frontend import onnx_qoperator, onnx_shapes

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
    return finish(mod, source, output_names=[o.name for o in proto.graph.output])


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("importing ONNX models needs the onnx package: pip install onnx") from exc
    return onnx
