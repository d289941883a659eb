"""ONNX import: fix symbolic shapes, fold shape computations and constant ``If`` conditions,
unroll recurrent operators, turn QOperator graphs into QDQ, then TVM's Relax ONNX frontend."""
from __future__ import annotations

from pathlib import Path

from qcompile.errors import MissingDependencyError, ModelImportError, first_line
from qcompile.frontend.signature import finish
from qcompile.manifest import sha256_file
from qcompile.model import ImportedModel, ModelSource


def import_onnx(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> ImportedModel:
    """Import an ONNX file; symbolic input dims must be fixed by the model or ``input_shapes``."""
    onnx = _import_onnx()
    from qcompile.frontend import onnx_qoperator, onnx_rnn, onnx_shapes

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelImportError(f"model file {path}: not a valid ONNX model: {first_line(exc)}") from exc
    proto, shapes, dtypes = onnx_shapes.fix_input_shapes(proto, input_shapes, str(path))
    # Folding first: it inlines constant If branches (which may hold the recurrent nodes) and
    # gives the unrolling static sequence lengths.
    proto = onnx_shapes.fold_shape_computations(proto)
    # Before the QDQ rewrite, which refuses com.microsoft operators it does not know.
    proto = onnx_rnn.unroll_recurrent(proto, f"model file {path}")
    if onnx_qoperator.is_qoperator(proto):  # one QDQ representation for every source
        proto = onnx_qoperator.to_qdq(proto, str(path))
    onnx_shapes.check_reshapes_static(proto, str(path))
    check_supported(proto, f"model file {path}")
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


def _frontend_ops() -> set[str] | None:
    """Operator types TVM's Relax ONNX frontend converts (None where its table is not found)."""
    try:
        from tvm.relax.frontend.onnx import onnx_frontend

        # The frontend matches op_type only, whatever the domain; If and Constant it handles itself.
        return set(onnx_frontend._get_convert_map()) | {"If", "Constant"}
    except Exception:  # another TVM layout: its own OpNotImplemented is reported instead
        return None


def _nodes(graph, within: str = ""):
    """(node, where) for every node, the nested subgraphs' too ('in the else_branch of If node ...')."""
    for node in graph.node:
        yield node, within
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _nodes(sub, f" in the {a.name} of {node.op_type} node {node.name!r}")


def check_supported(proto, where: str) -> None:
    """Raise ModelImportError naming the first operator that TVM's frontend cannot import."""
    known = _frontend_ops()
    if known is None:
        return
    missing = [(n, w) for n, w in _nodes(proto.graph) if n.op_type not in known]
    if not missing:
        return
    node, within = missing[0]
    op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    others = sorted({n.op_type for n, _ in missing} - {node.op_type})
    if within:
        hint = ("that subgraph stays control flow because its condition depends on input data "
                "(one derived from shapes folds once --input-shape fixes them); otherwise re-export "
                "the model for one configuration")
    else:
        hint = ("if it only computes on shapes or constants, fix every input with --input-shape "
                "and simplify the model (onnxsim) so that it folds away; otherwise re-export the model "
                "without it (another opset or exporter)")
    also = f" (also unsupported: {', '.join(others)})" if others else ""
    raise ModelImportError(
        f"{where}: operator {op} (node {node.name!r}{within}) has no converter in TVM's Relax "
        f"ONNX frontend{also}; {hint}"
    )
