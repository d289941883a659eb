"""ONNX ``Clip`` and ``Pad`` imported as Relax operators (qcompile.frontend.onnx_converters).

Every Clip form a file can hold (opset 6 attributes, opset 11+ inputs, one bound, NaN
bound, ``min > max``, integers) gives what ONNX Runtime gives; a ReLU6 after a convolution
-- every MobileNet's activation, as the PyTorch exporter writes it -- ends up in the
convolution's epilogue in float32 and int8 builds, with no layout transposes around it.
Constant pads give ONNX Runtime's result and an explicit pad before a convolution becomes
the convolution's own padding; other pad modes and crops keep TVM's converter.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qcompile

FLOATS = np.array([[-10, -1, 0, 0.5, 3], [5, 6, 7, 2.5, 100]], np.float32)


def clip_model(path, opset: int, lo, hi, elem=TensorProto.FLOAT) -> str:
    """One Clip node; bounds as attributes (opset < 11) or initializers (None: absent)."""
    np_type = np.float32 if elem == TensorProto.FLOAT else np.int32
    inputs, inits, attrs = ["x"], [], {}
    if opset < 11:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
    else:
        for name, value in (("lo", lo), ("hi", hi)):
            if value is None:
                inputs.append("")
            else:
                inits.append(numpy_helper.from_array(np.array(value, np_type), name))
                inputs.append(name)
        while inputs[-1] == "":
            inputs.pop()
    graph = helper.make_graph([helper.make_node("Clip", inputs, ["y"], **attrs)], "clip",
                              [helper.make_tensor_value_info("x", elem, [2, 5])],
                              [helper.make_tensor_value_info("y", elem, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("opset, lo, hi", [
    (13, 0.0, 6.0), (13, None, 6.0), (13, -1.0, None), (13, None, None), (13, 3.0, 1.0),
    (13, float("nan"), 2.0), (7, 0.0, 6.0), (7, -2.0, None)])
def test_clip_forms_match_onnx_runtime(tmp_path, opset, lo, hi):
    path = clip_model(tmp_path / "clip.onnx", opset, lo, hi)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": FLOATS})[0]
    built = qcompile.compile(qcompile.import_model(path), "llvm", out_dir=tmp_path / "out", name="clip")
    np.testing.assert_array_equal(qcompile.load(built.library).run({"x": FLOATS})["y"], expected)


def test_integer_clip_matches_onnx_runtime(tmp_path):
    path = clip_model(tmp_path / "clip.onnx", 13, 0, 6, TensorProto.INT32)
    x = np.array([[-10, -1, 0, 5, 3], [5, 6, 7, 300, 100]], np.int32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    built = qcompile.compile(qcompile.import_model(path), "llvm", out_dir=tmp_path / "out", name="clip")
    np.testing.assert_array_equal(qcompile.load(built.library).run({"x": x})["y"], expected)


@pytest.fixture(scope="module")
def relu6_net(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.ReLU6(), nn.Conv2d(16, 8, 1)).eval()
    path = tmp_path_factory.mktemp("relu6") / "relu6.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), str(path), input_names=["x"], dynamo=False)
    return str(path)


def test_relu6_is_a_relax_clip(relu6_net):
    script = qcompile.import_model(relu6_net).mod.script()
    assert script.count("R.clip(") == 2
    assert "call_tir" not in script


@pytest.mark.parametrize("int8", [False, True])
def test_relu6_fuses_into_the_conv_epilogue(relu6_net, tmp_path, int8):
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 3, 16, 16)).astype("float32")} for _ in range(2)]
    options = {"quantization": qcompile.Int8Config(num_samples=2), "calibration_data": samples} if int8 else {}
    built = qcompile.compile(qcompile.import_model(relu6_net), "llvm", out_dir=tmp_path / "out", name="m",
                             dump_ir=tmp_path / "ir", **options)
    kernels = re.findall(r"def (fused_\w+)", (tmp_path / "ir" / "04-lower.py").read_text())
    convs = [k for k in kernels if "conv2d" in k]
    assert len(convs) == 3
    assert sum("maximum" in k and "minimum" in k for k in convs) >= 2  # both clips in conv epilogues
    assert not [k for k in kernels if "transpose" in k and "minimum" in k]
    if not int8:
        expected = ort.InferenceSession(relu6_net, providers=["CPUExecutionProvider"]).run(None, samples[0])[0]
        got = next(iter(qcompile.load(built.library).run(samples[0]).values()))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def pad_model(path, opset: int, pads: list[int], mode: str = "constant", value: float | None = None) -> str:
    """One Pad node over a [1, 2, 3, 4] float input."""
    shape = [d + pads[i] + pads[i + 4] for i, d in enumerate((1, 2, 3, 4))]
    attrs, inputs, inits = {"mode": mode}, ["x"], []
    if opset < 11:
        attrs["pads"] = pads
        if value is not None:
            attrs["value"] = value
    else:
        inits.append(numpy_helper.from_array(np.array(pads, np.int64), "pads"))
        inputs.append("pads")
        if value is not None:
            inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
            inputs.append("value")
    graph = helper.make_graph([helper.make_node("Pad", inputs, ["y"], **attrs)], "pad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("opset, pads, mode, value, relax_pad", [
    (13, [0, 0, 1, 2, 0, 0, 2, 1], "constant", None, True),
    (13, [0, 1, 0, 1, 0, 0, 1, 0], "constant", 1.5, True),
    (7, [0, 0, 1, 1, 0, 0, 1, 1], "constant", -2.0, True),
    (13, [0, 0, -1, 1, 0, 0, 0, 1], "constant", None, False),  # a crop
    (13, [0, 0, 1, 1, 0, 0, 1, 1], "reflect", None, False)])
def test_pad_forms_match_onnx_runtime(tmp_path, opset, pads, mode, value, relax_pad):
    path = pad_model(tmp_path / "pad.onnx", opset, pads, mode, value)
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    imported = qcompile.import_model(path)
    assert ("R.nn.pad(" in imported.mod.script()) == relax_pad
    built = qcompile.compile(imported, "llvm", out_dir=tmp_path / "out", name="pad")
    np.testing.assert_array_equal(qcompile.load(built.library).run({"x": x})["y"], expected)


def test_explicit_pad_becomes_the_convolutions_padding(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()).eval()
    path = tmp_path / "zeropad.onnx"
    x = torch.randn(1, 3, 17, 17)
    torch.onnx.export(net, (x,), str(path), input_names=["x"], dynamo=False)
    built = qcompile.compile(qcompile.import_model(str(path)), "llvm", out_dir=tmp_path / "out", name="m",
                             dump_ir=tmp_path / "ir")
    kernels = re.findall(r"def (fused_\w+)", (tmp_path / "ir" / "04-lower.py").read_text())
    assert not [k for k in kernels if "pad" in k and "conv" not in k]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    got = next(iter(qcompile.load(built.library).run({"x": x.numpy()}).values()))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
