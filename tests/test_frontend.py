"""Import from the three sources, shape handling, and bad model input."""
from __future__ import annotations

import onnx
import pytest
import torch

from qcompile.errors import ConfigError, ModelImportError
from qcompile.frontend import import_model, onnx_shapes
from qcompile.model import TensorInfo, parse_input_shapes


def test_torchvision_name_with_input_shape():
    model = import_model("resnet18", {"": (1, 3, 64, 64)})
    assert model.source.kind == "torchvision" and model.source.name == "resnet18"
    assert model.inputs == [TensorInfo("x", (1, 3, 64, 64), "float32")]
    assert model.outputs == [TensorInfo("output0", (1, 1000), "float32")]
    assert len(model.source.sha256) == 64


def test_torchvision_weights_file(tmp_path):
    torch.manual_seed(5)
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None)
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    with_weights = import_model("resnet18", {"": (1, 3, 32, 32)}, weights=str(weights))
    default = import_model("resnet18", {"": (1, 3, 32, 32)})
    assert with_weights.source.weights == str(weights.resolve())
    assert with_weights.source.sha256 != default.source.sha256


def test_pt2_program(tiny_pt2):
    model = import_model(str(tiny_pt2))
    assert model.source.kind == "pt2"
    assert model.inputs == [TensorInfo("x", (1, 3, 32, 32), "float32")]
    assert model.outputs[0].shape == (1, 10)


def test_pt2_static_program_refuses_other_shapes(tiny_pt2):
    with pytest.raises(ModelImportError, match=r"re-exporting at input shapes \[\(2, 3, 32, 32\)\] failed"):
        import_model(str(tiny_pt2), {"x": (2, 3, 32, 32)})


def test_pt2_dynamic_program_is_specialised(tmp_path, tiny_net):
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(tiny_net, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    path = tmp_path / "dyn.pt2"
    torch.export.save(program, str(path))
    with pytest.raises(ModelImportError, match="input 'x' has dynamic shape.*--input-shape x:"):
        import_model(str(path))
    model = import_model(str(path), {"x": (4, 3, 32, 32)})
    assert model.inputs[0].shape == (4, 3, 32, 32) and model.outputs[0].shape == (4, 10)


def test_onnx_static(tiny_onnx):
    model = import_model(str(tiny_onnx))
    assert model.source.kind == "onnx"
    assert model.inputs == [TensorInfo("input", (1, 3, 32, 32), "float32")]
    assert model.outputs == [TensorInfo("logits", (1, 10), "float32")]


def test_onnx_symbolic_dims_need_input_shape(dynamic_onnx):
    with pytest.raises(ModelImportError, match=r"input 'input' has symbolic dims \['N', 3, 'H', 'W'\].*--input-shape"):
        import_model(str(dynamic_onnx))


def test_onnx_shape_chains_are_folded(dynamic_onnx):
    proto = onnx.load(str(dynamic_onnx))
    assert "Shape" in {n.op_type for n in proto.graph.node}
    proto, shapes, _ = onnx_shapes.fix_input_shapes(proto, {"input": (1, 3, 24, 24)}, "m")
    folded = onnx_shapes.fold_shape_computations(proto)
    ops = [n.op_type for n in folded.graph.node]
    assert "Shape" not in ops and "Concat" not in ops and "Gather" not in ops
    assert ops.count("Reshape") == 2
    onnx_shapes.check_reshapes_static(folded, "m")
    model = import_model(str(dynamic_onnx), {"input": (1, 3, 24, 24)})
    assert model.outputs[0].shape == (1, 5)


def test_unfoldable_reshape_names_the_node():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"], name="head_reshape")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(ModelImportError, match="Reshape node 'head_reshape'"):
        onnx_shapes.check_reshapes_static(helper.make_model(graph), "m.onnx")


def test_input_shape_conflicting_with_static_model(tiny_onnx):
    with pytest.raises(ConfigError, match="conflicts with the model's static shape"):
        import_model(str(tiny_onnx), {"input": (1, 3, 64, 64)})
    with pytest.raises(ConfigError, match="names 'nope'"):
        import_model(str(tiny_onnx), {"nope": (1, 3, 32, 32)})


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelImportError, match="does not exist"):
        import_model(str(tmp_path / "absent.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf \x00\xff")
    with pytest.raises(ModelImportError, match="bad.onnx: not a valid ONNX model"):
        import_model(str(bad))
    bad_pt2 = tmp_path / "bad.pt2"
    bad_pt2.write_bytes(b"garbage")
    with pytest.raises(ModelImportError, match="bad.pt2: not a loadable torch.export program"):
        import_model(str(bad_pt2))
    other = tmp_path / "model.tflite"
    other.write_bytes(b"x")
    with pytest.raises(ModelImportError, match="unsupported file type .tflite"):
        import_model(str(other))


def test_unknown_model_name():
    with pytest.raises(ModelImportError, match="unknown model name 'resnet19'"):
        import_model("resnet19")


@pytest.mark.parametrize("spec", ["input:1x3xax4", "input:0x3", "x:"])
def test_bad_input_shape_specs(spec):
    with pytest.raises(ConfigError):
        parse_input_shapes([spec])


def test_input_shape_forms():
    assert parse_input_shapes(["input:1x3x224x224", "mask:[1,7]"]) == {"input": (1, 3, 224, 224), "mask": (1, 7)}
    assert parse_input_shapes(["1x3x8x8"]) == {"": (1, 3, 8, 8)}
