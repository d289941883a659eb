"""Fix symbolic ONNX input dims and fold run-time shape computations before import.

Exporters emit ``Shape -> Gather/Slice -> Concat -> Reshape`` chains for models with
symbolic batch/height/width.  Once input shapes are fixed these chains are constants;
folding them (ONNX shape inference + ``onnx.reference`` on the small shape tensors)
gives the Relax frontend static Reshape targets.  An ``If`` whose condition folds the same
way is replaced by its taken branch.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from qcompile.errors import ConfigError, ModelImportError
from qcompile.model import resolve_input_names

# Ops that are folded when all their inputs are known constants (shape arithmetic).
_FOLDABLE = {
    "Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub",
    "Mul", "Div", "Floor", "Ceil", "Neg", "Abs", "Min", "Max", "Equal", "Less", "Greater",
    "Where", "Not", "And", "Or", "Range", "ConstantOfShape", "Identity", "ReduceProd",
    "Reshape", "Expand", "Constant", "Mod", "Sqrt", "GatherElements",
}
# Do not materialise big tensors while folding (weights stay as the exporter wrote them).
_MAX_FOLDED_ELEMENTS = 1 << 16


def graph_inputs(proto) -> list[Any]:
    """Graph inputs that are real inputs (not initializers)."""
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def fix_input_shapes(proto, overrides: dict[str, tuple[int, ...]], where: str):
    """Write static dims into the graph inputs; returns (model, shapes, dtypes)."""
    from onnx import helper

    inputs = graph_inputs(proto)
    names = [i.name for i in inputs]
    resolved = resolve_input_names(overrides, names, where)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for inp in inputs:
        ttype = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in ttype.shape.dim]
        if inp.name in resolved:
            new = resolved[inp.name]
            if len(new) != len(dims):
                raise ConfigError(
                    f"{where}: --input-shape {inp.name}:{'x'.join(map(str, new))} has rank {len(new)}, "
                    f"but the model's input has rank {len(dims)} ({dims})"
                )
            for want, have in zip(new, dims):
                if isinstance(have, int) and have > 0 and have != want:
                    raise ConfigError(
                        f"{where}: --input-shape {inp.name}:{'x'.join(map(str, new))} conflicts with the "
                        f"model's static shape {dims}"
                    )
            dims = list(new)
        unknown = [str(d) for d in dims if not (isinstance(d, int) and d > 0)]
        if unknown:
            raise ModelImportError(
                f"{where}: input {inp.name!r} has symbolic dims {dims}; "
                f"fix them with --input-shape {inp.name}:{'x'.join(map(str, dims))} (sizes in place of {', '.join(unknown)})"
            )
        shapes[inp.name] = tuple(int(d) for d in dims)
        dtypes[inp.name] = helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
        del ttype.shape.dim[:]
        for d in shapes[inp.name]:
            ttype.shape.dim.add().dim_value = d
    return proto, shapes, dtypes


def fold_shape_computations(proto, max_rounds: int = 16):
    """Replace shape-arithmetic nodes whose inputs are known by initializers, and an ``If``
    whose condition is known by its taken branch."""
    import onnx

    for _ in range(max_rounds):
        _drop_partial_value_info(proto.graph)
        # Inference is best effort: folding still helps without it.
        with contextlib.suppress(Exception):
            proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        if not _fold_once(proto):
            break
    return proto


def _drop_partial_value_info(graph) -> None:
    """Forget the value_info shapes that still hold a symbolic or unknown dim.

    ONNX shape inference keeps an existing dim_param rather than the dim_value it infers,
    so an exporter's symbolic ``batch`` / ``seq`` dims, or an earlier round's ``unk__``
    dims (inferred before a folded node became a constant), would stay and hide the
    static shape that a Shape node downstream needs to fold."""
    def partial(vi) -> bool:
        ttype = vi.type.tensor_type
        return not ttype.HasField("shape") or any(not d.HasField("dim_value") for d in ttype.shape.dim)

    keep = [vi for vi in graph.value_info if not partial(vi)]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _fold_once(proto) -> bool:
    from onnx import numpy_helper

    graph = proto.graph
    known: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = static_shapes(graph)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)
    kept, folded = [], False
    for node in graph.node:
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in known:
            kept.extend(_inline_if(node, known[node.input[0]], graph))
            folded = True
            continue
        value = _try_fold(node, known, shapes, opset)
        if value is None:
            kept.append(node)
            continue
        known[node.output[0]] = value
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded = True
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        drop_unused_initializers(graph)
    return folded


def _try_fold(node, known, shapes, opset) -> np.ndarray | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE or len(node.output) != 1:
        return None
    if node.op_type == "Shape":
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        start = _attr(node, "start", 0)
        end = _attr(node, "end", None)
        return np.array(shape[start:end], dtype=np.int64)
    if node.op_type == "Size":
        shape = shapes.get(node.input[0])
        return None if shape is None else np.array(int(np.prod(shape)), dtype=np.int64)
    inputs = [i for i in node.input if i]
    if node.op_type != "Constant" and not all(i in known for i in inputs):
        return None
    if any(known[i].size > _MAX_FOLDED_ELEMENTS for i in inputs):
        return None
    value = _evaluate(node, [known[i] for i in inputs], opset)
    if value is None or value.size > _MAX_FOLDED_ELEMENTS:
        return None
    return value


def _gather_elements(node, data: np.ndarray, indices: np.ndarray) -> np.ndarray:
    axis = _attr(node, "axis", 0) % data.ndim
    return np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis], indices), axis)


# onnx.reference's GatherElements goes through np.choose, which takes at most 64 choices
# (a position-id table gathered along its 128 positions fails there).
_NUMPY_EVALUATORS = {"GatherElements": _gather_elements}


def _evaluate(node, values: list[np.ndarray], opset: int) -> np.ndarray | None:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    if node.op_type in _NUMPY_EVALUATORS:
        try:
            return np.asarray(_NUMPY_EVALUATORS[node.op_type](node, *values))
        except (ValueError, IndexError, TypeError):
            return None  # leave the node for the frontend
    feeds = {}
    graph_inputs = []
    for name, value in zip([i for i in node.input if i], values):
        feeds[name] = value
        graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
    out = helper.make_tensor_value_info(node.output[0], 0, None)
    graph = helper.make_graph([node], "fold", graph_inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        result = ReferenceEvaluator(model).run(None, feeds)[0]
    except Exception:  # noqa: BLE001 (whatever the evaluator cannot run, the frontend still may)
        return None  # leave the node for the frontend
    return np.asarray(result)


def static_shapes(graph) -> dict[str, tuple[int, ...]]:
    """Value name -> static shape, from the graph's inputs, value_info, outputs and initializers."""
    shapes = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        ttype = vi.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if all(d is not None for d in dims):
            shapes[vi.name] = tuple(dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _inline_if(node, cond: np.ndarray, graph) -> list:
    """The taken branch's nodes, its values renamed apart, with Identity nodes to the If's outputs.

    A model's control flow on a value that is constant once the inputs are fixed (a sample
    rate, a shape) becomes straight-line code, which the frontend imports as one dataflow
    block and the passes can optimise across."""
    from onnx import NodeProto, helper

    branch = _attr(node, "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch", None)
    prefix = f"{node.output[0]}__if"  # If outputs are unique names, so is the prefix
    local = [i.name for i in branch.initializer] + [o for n in branch.node for o in n.output if o]
    renamed = {name: f"{prefix}/{name}" for name in local}
    for init in branch.initializer:
        clone = graph.initializer.add()
        clone.CopyFrom(init)
        clone.name = renamed[init.name]
    nodes = []
    for inner in branch.node:
        clone = NodeProto()
        clone.CopyFrom(inner)
        _rename_inputs(clone, renamed)
        clone.output[:] = [renamed.get(o, o) for o in clone.output]
        nodes.append(clone)
    for out, res in zip(node.output, branch.output):
        if out:
            nodes.append(helper.make_node("Identity", [renamed.get(res.name, res.name)], [out]))
    return nodes


def _rename_inputs(node, renamed: dict[str, str]) -> None:
    """Rename ``node``'s inputs, and those of the subgraphs it holds (which see outer names)."""
    node.input[:] = [renamed.get(i, i) for i in node.input]
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for inner in sub.node:
                _rename_inputs(inner, renamed)
            for out in sub.output:  # a subgraph may return an outer value directly
                out.name = renamed.get(out.name, out.name)


def _used_names(graph) -> set[str]:
    """Names that ``graph``'s nodes, outputs and nested subgraphs read."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used |= _used_names(sub)
    return used


def drop_unused_initializers(graph) -> None:
    """Remove initializers (and their graph-input entries) that nothing reads."""
    used = _used_names(graph)
    dropped = {i.name for i in graph.initializer if i.name not in used}
    keep = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # Old exporters also list initializers as graph inputs: drop those entries too.
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def check_reshapes_static(proto, where: str) -> None:
    """Name the first Reshape whose target shape is still computed at run time."""
    known = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] not in known:
            producer = next((n for n in proto.graph.node if node.input[1] in n.output), None)
            what = f"{producer.op_type} node {producer.name!r}" if producer is not None else "a graph input"
            raise ModelImportError(
                f"{where}: Reshape node {node.name!r} takes its target shape from {what}, which "
                "could not be folded to a constant with the given input shapes; "
                "re-export the model with static shapes or simplify it (onnxsim)"
            )

