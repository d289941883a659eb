"""Quantization-aware training (qcompile.qat) on real handwritten digits (scikit-learn's
8x8 scans, held-out test split): a model per-tensor PTQ ruins, fine-tuned in PyTorch with
fake quantization matching qcompile's integer arithmetic, converted, built by qcompile, and
compared with PyTorch's own converted model."""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

import qcompile
import qcompile.qat
from qcompile.frontend.pt2_safety import unsafe_members

EXAMPLE = (torch.zeros(1, 1, 8, 8),)


def bench():
    """benchmarks/digits_accuracy.py as a module (its data, models and training helpers)."""
    spec = importlib.util.spec_from_file_location("digits_accuracy", REPO / "benchmarks" / "digits_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def depthwise():
    """(bench module, data, the trained DepthwiseNet, the same net with uneven depthwise
    channels (``imbalance_depthwise``: the same function, per-tensor PTQ collapses))."""
    b = bench()
    torch.set_num_threads(2)
    data = b.load_digits()
    net = b.train(data[0], data[1], epochs=20, make=b.DepthwiseNet)
    return b, data, copy.deepcopy(net), b.imbalance_depthwise(net)


def fine_tune(prepared, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> None:
    torch.manual_seed(0)
    opt = torch.optim.Adam(prepared.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(prepared(xt[idx]), yt[idx]).backward()
            opt.step()


def outputs(model, reference, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The qcompile-built ``model``'s and the PyTorch ``reference``'s outputs, one sample at a time."""
    name_in, name_out = model.inputs[0].name, model.outputs[0].name
    ours, theirs = [], []
    for i in range(len(x)):
        ours.append(model.run({name_in: x[i:i + 1]})[name_out][0])
        with torch.no_grad():
            theirs.append(reference(torch.from_numpy(x[i:i + 1])).numpy()[0])
    return np.array(ours), np.array(theirs)


def compare(model, reference, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(qcompile top-1 %, PyTorch top-1 %, share of samples with the same prediction)."""
    ours, theirs = outputs(model, reference, x)
    return (100.0 * np.mean(ours.argmax(1) == y), 100.0 * np.mean(theirs.argmax(1) == y),
            float(np.mean(ours.argmax(1) == theirs.argmax(1))))


def test_qat_recovers_per_tensor_ptq_collapse(depthwise, tmp_path):
    """Per-tensor PTQ (no equalization, no bias correction) of the uneven depthwise CNN
    loses most of its accuracy; QAT with the same per-tensor quantization, a few epochs from
    the float weights, recovers at least half of that loss in the qcompile-built model.

    This model amplifies one LSB: the pointwise convs multiply each tiny depthwise channel
    by up to ~1000 (``1 / s_c``), so a +-1 LSB rounding difference there (qcompile adds the
    bias as int32 at ``input_scale * weight_scale``, PyTorch's reference in float) moves the
    next activation by tens of LSB.  Its predictions therefore agree with PyTorch's converted
    model a little less often than a well-conditioned model's do (the next test)."""
    b, (xtr, ytr, xte, yte), _, net = depthwise
    fp32 = b.accuracy(lambda x: net(torch.from_numpy(x)).detach().numpy(), xte, yte)
    float_pt2 = tmp_path / "dw.pt2"
    torch.export.save(torch.export.export(net, EXAMPLE), str(float_pt2))
    config = qcompile.Int8Config(weights=qcompile.PerTensor(), num_samples=200, equalize=False,
                                 bias_correction=False)
    ptq_art = qcompile.compile(str(float_pt2), quantization=config, calibration_data={"x": xtr[:200]},
                               out_dir=tmp_path, name="ptq", tuning_logs=False)
    ptq_model = qcompile.load(ptq_art.library)
    ptq = b.accuracy(lambda x: ptq_model.run({"x": x})[ptq_model.outputs[0].name], xte, yte)

    prepared = qcompile.qat.prepare(net, EXAMPLE, per_channel=False)
    fine_tune(prepared, xtr, ytr, epochs=10, lr=3e-3)
    program = qcompile.qat.convert(prepared)
    path = qcompile.qat.save(program, tmp_path / "dw-qat.pt2")
    assert unsafe_members(path) == []  # builds without --trust-pt2
    art = qcompile.compile(str(path), out_dir=tmp_path, tuning_logs=False)
    model = qcompile.load(art.library)
    quant = model.manifest.quantization
    qat, torch_qat, agree = compare(model, program.module(), xte, yte)
    print(f"digits depthwise CNN top-1: fp32 {fp32:.1f}, per-tensor PTQ {ptq:.1f}, per-tensor QAT built by "
          f"qcompile {qat:.1f} (PyTorch's converted model {torch_qat:.1f}, same prediction {agree:.3f})")
    assert fp32 >= 95.0, "the float model did not train"
    assert ptq <= fp32 - 1.0, "per-tensor PTQ lost less than a point: the case shows nothing"
    assert qat >= ptq + (fp32 - ptq) / 2, "QAT recovered less than half of the PTQ loss"
    assert quant["source"] == "pt2-qdq" and quant["float_ops"] == {}
    assert {layer["op"] for layer in quant["layers"]} >= {"conv2d", "matmul"}
    assert all(layer["weight_scale_min"] == layer["weight_scale_max"]  # one weight scale per layer
               for layer in quant["layers"] if "weight_scale_min" in layer)
    assert abs(qat - torch_qat) <= 1.0
    assert agree >= 0.97


def first_layer(program):
    """``program`` cut after its first conv (at its dequantized uint8 output), re-exported;
    and that output's scale."""
    module = copy.deepcopy(program.module())
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    output = [n for n in module.graph.nodes if n.target == quantize][1]  # [0] quantizes the input
    activation = next(iter(output.users))
    next(n for n in module.graph.nodes if n.op == "output").args = ((activation,),)
    module.graph.eliminate_dead_code()
    module.recompile()
    return torch.export.export(module, EXAMPLE), output.args[1]


def test_qat_build_matches_pytorch_converted(depthwise, tmp_path, cli):
    """Per-channel QAT of the well-conditioned depthwise CNN, built with ``qcompile build``
    (no ``--trust-pt2``): the integer kernels give PyTorch's converted model's predictions.

    One layer's uint8 output equals PyTorch's but for a few values one LSB off: qcompile adds
    each bias as int32 at ``input_scale * weight_scale`` (fbgemm's way), PyTorch's reference
    in float, which now and then rounds a value the other way.  Through the five convs and
    the pooling such values grow to a few percent of the classifier's input (measured: 7%,
    at most 2 LSB), which the predictions do not notice."""
    _, (xtr, ytr, xte, yte), net, _ = depthwise
    prepared = qcompile.qat.prepare(net, EXAMPLE)
    fine_tune(prepared, xtr, ytr, epochs=1, lr=1e-3)
    program = qcompile.qat.convert(prepared)
    weights = [n for n in program.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert weights and all(tuple(n.args[4:7]) == (-127, 127, torch.int8) for n in weights)
    path = qcompile.qat.save(program, tmp_path / "dw-qat-pc.pt2")
    result = cli("build", path, "--quiet", "-o", tmp_path)
    assert result.code == 0, result.err
    quant = json.loads((tmp_path / "dw-qat-pc.manifest.json").read_text())["quantization"]
    assert quant["source"] == "pt2-qdq" and quant["float_ops"] == {}
    qat, torch_qat, agree = compare(qcompile.load(tmp_path / "dw-qat-pc.so"), program.module(), xte, yte)

    layer, scale = first_layer(program)
    cut = qcompile.qat.save(layer, tmp_path / "first-layer.pt2")
    model = qcompile.load(qcompile.compile(str(cut), out_dir=tmp_path, tuning_logs=False).library)
    ours, theirs = outputs(model, layer.module(), xte)
    lsb = np.abs(ours - theirs) / scale
    print(f"per-channel QAT top-1: qcompile {qat:.1f}, PyTorch {torch_qat:.1f}; same prediction {agree:.3f}; "
          f"first conv's output: max diff {lsb.max():.2f} LSB, {np.mean(lsb > 0.5):.3%} of values differ")
    assert qat >= 95.0
    assert agree >= 0.99 and abs(qat - torch_qat) <= 0.5
    assert lsb.max() <= 1.001 and np.mean(lsb > 0.5) <= 0.002


def test_quantizer_matches_realize():
    """The fake quantization's specs are what qcompile executes."""
    config = qcompile.qat.quantization_config(per_channel=True)
    act, weight = config.input_activation, config.weight
    assert (act.dtype, act.quant_min, act.quant_max, act.qscheme) == (torch.uint8, 0, 255, torch.per_tensor_affine)
    assert config.output_activation == act
    assert (weight.dtype, weight.quant_min, weight.quant_max) == (torch.int8, -127, 127)
    assert weight.quant_max == qcompile.Int8Config().weight_qmax
    assert (weight.qscheme, weight.ch_axis) == (torch.per_channel_symmetric, 0)
    assert config.bias is None and config.is_qat  # float bias: qcompile quantizes it at sx * sw
    per_tensor = qcompile.qat.quantization_config(per_channel=False).weight
    assert per_tensor.qscheme == torch.per_tensor_symmetric
    symmetric = qcompile.qat.quantization_config(symmetric_activations=True).input_activation
    assert (symmetric.dtype, symmetric.quant_min, symmetric.quant_max) == (torch.int8, -128, 127)
    with pytest.raises(qcompile.ConfigError, match="per_channel"):
        qcompile.qat.quantization_config(per_channel="yes")
    with pytest.raises(qcompile.ConfigError, match=".pt2"):
        qcompile.qat.save(None, "model.onnx")


def test_import_qcompile_does_not_import_torch_for_qat():
    code = "import sys, qcompile; qcompile.qat.quantizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
