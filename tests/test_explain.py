"""``qcompile explain`` / qcompile.runtime.explain: why an int8 build is not faster."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import qcompile
from qcompile.runtime.explain import (
    FLOAT_FALLBACK,
    GENERIC_KERNEL,
    INT8_KERNELS,
    QDQ_BOUNDARY,
    explain,
)


class SlowPathNet(nn.Module):
    """conv2d_0 (to be kept float), conv2d_1 a grouped conv (2 groups of 12 output channels, which
    straddle the int8 kernel's 8- or 16-channel blocks: no packed kernel takes it), conv2d_2 depthwise and a linear layer (packed int8 kernels), matmul_0 a product of two
    activations (TVM's generic matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = self.depthwise(torch.relu(self.grouped(torch.relu(self.conv(x)))))
        tokens = y.flatten(2).transpose(1, 2)  # 1 x 256 x 24
        scores = tokens @ tokens.transpose(1, 2)
        return self.fc(scores.mean(dim=2, keepdim=True) * tokens)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """(int8 .so with conv2d_0 kept float, float .so) of SlowPathNet."""
    work = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    path = work / "slowpath.onnx"
    torch.onnx.export(SlowPathNet().eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"], dynamo=False)
    calib = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype("float32")
    int8 = qcompile.compile(str(path), "native", quantization=qcompile.Int8Config(num_samples=4, keep_float=("conv2d_0",)),
                            calibration_data=calib, out_dir=work, name="slowpath-int8", tuning_logs=False)
    fp32 = qcompile.compile(str(path), "native", out_dir=work, name="slowpath-fp32", tuning_logs=False)
    return int8.library, fp32.library


def _by_subject(result, start: str):
    return [f for f in result.findings if f.subject.startswith(start)]


def test_explain_names_the_float_fallback_and_the_slow_kernels_with_their_shares(builds):
    int8, fp32 = builds
    result = explain(int8, fp32, runs=5, repeat=5)
    shares = [f.share for f in result.findings]
    assert all(0.0 < s < 1.0 for s in shares)
    assert shares == sorted(shares, reverse=True)  # costliest first
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)

    (fallback,) = [f for f in result.findings if f.kind == FLOAT_FALLBACK]
    assert fallback.subject == "float fallback conv2d_0 (conv2d)" and "keep_float" in fallback.reason
    assert "float32" in fallback.kernels[0]
    generic = {f.subject.split()[0]: f for f in result.findings if f.kind == GENERIC_KERNEL}
    assert set(generic) == {"conv2d_1", "matmul_0"}
    assert "grouped conv (2 groups of 8 input channels" in generic["conv2d_1"].reason
    assert "two activations" in generic["matmul_0"].reason
    assert all("qc_" not in f.kernels[0] for f in generic.values())
    (fast,) = [f for f in result.findings if f.kind == INT8_KERNELS]
    assert "conv2d_2" in fast.reason and "matmul_1" in fast.reason
    # no quantize/dequantize kernel of its own: the fallback's quantize runs in the float
    # conv's epilogue, the classifier's dequantize in its int8 kernel's (SinkReshapes)
    assert not any(f.kind == QDQ_BOUNDARY for f in result.findings)
    assert any("quantize" in k for f in result.findings if f.kind == FLOAT_FALLBACK for k in f.kernels)

    # the same layers in the float build, and each layer's share of the peak of its dtype
    assert fallback.float_ms is not None and generic["conv2d_1"].float_ms is not None
    assert 0.0 < fallback.peak_fraction < 1.0 and 0.0 < generic["conv2d_1"].peak_fraction < 1.0
    assert result.float_ms > 0 and result.speedup == pytest.approx(result.float_ms / result.int8_ms)
    macs = qcompile.load(int8).manifest.build["macs"]["total"]
    peak = result.peaks.for_dtype("int8")  # None on a CPU without a dot-product instruction
    if peak is None:
        assert result.peak_fraction is None
    else:
        assert 0.0 < result.peak_fraction < 1.0
        assert result.peak_fraction == pytest.approx(macs / (result.int8_ms / 1e3) / (peak.gmacs * 1e9))

    text = result.to_text()
    for name in ("float fallback conv2d_0", "conv2d_1 (int8 conv2d) on a generic kernel", "matmul_0",
                 "of the measured"):
        assert name in text
    lines = [line for line in text.splitlines() if "%  " in line]
    assert [float(line.split("%")[0]) for line in lines] == sorted((float(line.split("%")[0]) for line in lines),
                                                                    reverse=True)


def test_explain_a_float_build_says_so(builds):
    _, fp32 = builds
    result = explain(fp32, runs=3, repeat=3, peaks=False)
    assert result.scheme == "none" and any("float build" in n for n in result.notes)
    assert not [f for f in result.findings if f.kind == FLOAT_FALLBACK]
    assert result.peak_fraction is None


def test_cli_explain_json(cli, builds):
    int8, fp32 = builds
    out = cli("explain", int8, "--float", fp32, "--runs", "3", "--repeat", "3", "--no-peaks", "--json")
    assert out.code == 0, out.err
    data = json.loads(out.out)
    kinds = {f["kind"] for f in data["findings"]}
    assert {FLOAT_FALLBACK, GENERIC_KERNEL} <= kinds
    assert data["latency_ms"]["int8"] > 0 and data["latency_ms"]["float"] > 0 and data["peaks"] is None
    text = cli("explain", int8, "--runs", "3", "--repeat", "3", "--no-peaks")
    assert text.code == 0 and "float fallback conv2d_0" in text.out


def test_cli_explain_missing_file_is_one_line_artifact_error(cli, tmp_path):
    result = cli("explain", tmp_path / "missing.so")
    assert result.code == 6  # ArtifactError (README: Errors and exit codes)
    assert result.err.count("\n") == 1 and result.err.startswith("error: ") and "missing.so" in result.err
    int8_missing_float = cli("explain", tmp_path / "missing.so", "--float", tmp_path / "f.so")
    assert int8_missing_float.code == 6


def test_kernels_are_matched_to_layers_only_when_call_order_fits():
    from qcompile.build.macs import LayerMacs, MacCount
    from qcompile.runtime.explain import Call, match_layers

    layers = MacCount((LayerMacs("conv2d_0", "conv2d", "float32", 100), LayerMacs("matmul_0", "matmul", "int8", 10)))
    calls = [Call("fused_qc_conv2d_float32_add", 0.2), Call("fused_reshape", 0.1), Call("qc_conv2d_int8", 0.1)]
    matched, note = match_layers(calls, layers)
    assert note is None and [c.layer.name if c.layer else None for c in matched] == ["conv2d_0", None, "matmul_0"]
    # a float kernel where the int8 layer should be: no matching, and a note saying so
    swapped = [calls[2], calls[1], calls[0]]
    unmatched, note = match_layers(swapped, layers)
    assert all(c.layer is None for c in unmatched) and "not matched" in note
    fewer, note = match_layers(calls[:2], layers)
    assert all(c.layer is None for c in fewer) and "1 conv/matmul kernel calls for 2 layers" in note


def test_explain_lists_a_stand_alone_quantize_boundary(tmp_path):
    """Token MLP whose first dense layer is int8: the model input reaches it through a quantize
    kernel of its own, which explain lists as a quantize/dequantize boundary with its share."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(net, (torch.zeros(1, 24, 32),), str(path), input_names=["x"], dynamo=False)
    calib = np.random.default_rng(0).standard_normal((4, 24, 32)).astype("float32")
    int8 = qcompile.compile(str(path), "native", quantization=qcompile.Int8Config(num_samples=4),
                            calibration_data={"x": calib}, out_dir=tmp_path, name="mlp-int8", tuning_logs=False)
    result = explain(int8.library, runs=3, repeat=3, peaks=False)
    (boundary,) = [f for f in result.findings if f.kind == QDQ_BOUNDARY]
    assert 0.0 < boundary.share < 1.0 and any("quantize" in k for k in boundary.kernels)
    assert "quantize/dequantize boundaries" in result.to_text()
