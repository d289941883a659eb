"""ONNX import: fix symbolic shapes, fold shape computations and constant ``If`` conditions,
fuse or unroll recurrent operators, turn QOperator graphs into QDQ, then TVM's Relax ONNX
frontend.

The frontend runs as :class:`_Importer`, TVM's ``ONNXGraphImporter`` with one operator of
its own: ``qcompile::RecurrentSequence``, the fused LSTM/GRU recurrence that
:mod:`qcompile.frontend.onnx_rnn` writes, imported as a call of the hand-scheduled kernel
(:mod:`qcompile.kernels.recurrent`), and its own ``Clip`` and ``Pad``
(:mod:`qcompile.frontend.onnx_converters`: Relax operators the later passes see through,
where TVM's are TE kernels).  Every other
operator goes to TVM's converters.
"""
from __future__ import annotations

import functools
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
    proto = onnx_rnn.lower_recurrent(proto, f"model file {path}")
    if onnx_qoperator.is_qoperator(proto):  # one QDQ representation for every source
        proto = onnx_qoperator.to_qdq(proto, str(path))
    onnx_shapes.check_reshapes_static(proto, str(path))
    check_supported(proto, f"model file {path}")
    try:
        mod = _relax_import(proto, {k: list(v) for k, v in shapes.items()}, dtypes)
    except Exception as exc:
        raise ModelImportError(f"model file {path}: Relax ONNX import failed: {first_line(exc)}") from exc
    source = ModelSource("onnx", path.stem, str(path.resolve()), None, sha256_file(path))
    return finish(mod, source, output_names=[o.name for o in proto.graph.output])


def _relax_import(proto, shape_dict: dict[str, list], dtype_dict: dict):
    """TVM's ``from_onnx`` (the model already checked) through :class:`_Importer`."""
    if proto.ir_version < 3:
        raise ValueError(f"ONNX IR version {proto.ir_version} is older than 3 (ONNX 1.1)")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    return _importer_class()(shape_dict, dtype_dict).from_onnx(proto.graph, opset)


@functools.cache
def _importer_class():
    """TVM's ONNX graph importer with the fused recurrent node added (built on first use:
    the TVM frontend is imported lazily)."""
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    from qcompile.frontend.onnx_converters import convert_clip, convert_pad
    from qcompile.frontend.onnx_rnn import FUSED_OP, convert_fused

    class _Importer(ONNXGraphImporter):
        def _check_for_unsupported_ops(self, graph) -> None:
            known = _frontend_ops()
            missing = sorted({n.op_type for n in graph.node} - known) if known is not None else []
            if missing:  # check_supported names them first, with a hint
                raise ModelImportError(f"operators without a converter: {', '.join(missing)}")

        def _convert_operator(self, op_name, inputs, attrs, opset):
            if op_name == FUSED_OP:
                return convert_fused(self.bb, list(inputs), attrs)
            if op_name == "Clip":
                return convert_clip(self.bb, list(inputs), attrs, opset)
            if op_name == "Pad":
                # TVM's converter indexes the optional inputs (value, axes) it may not have
                inputs = list(inputs) + [None] * (4 - len(inputs))
                padded = convert_pad(self.bb, inputs, attrs, opset, [self._nodes, self._params])
                if padded is not None:
                    return padded
            return super()._convert_operator(op_name, inputs, attrs, opset)

    return _Importer


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
        from qcompile.frontend.onnx_rnn import FUSED_OP

        return set(onnx_frontend._get_convert_map()) | {"If", "Constant", FUSED_OP}
    except Exception:  # noqa: BLE001 -- another TVM layout: its own OpNotImplemented is reported instead
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
