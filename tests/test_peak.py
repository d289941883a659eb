"""Measured compute peaks (qcompile.runtime.peak) and MAC counts (qcompile.build.macs)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import qcompile
from qcompile.build.macs import MacCount, count_macs
from qcompile.errors import ConfigError
from qcompile.kernels.int8_dot import cpu_features, int8_dot_for
from qcompile.runtime.peak import Peaks, measure_peaks, peak_assembly
from qcompile.target import resolve_target


@pytest.fixture(scope="module")
def native_peaks() -> Peaks:
    return measure_peaks("native", repeat=30)


def _lanes(target) -> int:
    features = cpu_features(target)
    return 16 if "avx512f" in features else 8 if "avx2" in features else 4


def test_peaks_are_positive_and_within_the_cpus_bounds(native_peaks):
    target = resolve_target("native").to_tvm()
    assert native_peaks.threads >= 1 and native_peaks.fp32.gmacs > 0
    # per thread and vector lane: between one FMA per cycle at 0.3 GHz (a loaded VM) and two
    # FMA pipes at 6 GHz -- what no CPU exceeds
    per_lane_ghz = native_peaks.fp32.gmacs / (native_peaks.threads * _lanes(target))
    assert 0.3 <= per_lane_ghz <= 2 * 6.0, per_lane_ghz
    if int8_dot_for(target) is not None:
        assert native_peaks.int8 is not None and native_peaks.int8.gmacs > 0
        # 4 int8 products per int32 lane: more MACs per instruction than fp32's one per lane
        assert native_peaks.int8.gmacs > native_peaks.fp32.gmacs
    else:
        assert native_peaks.int8 is None and native_peaks.int8_note
    assert Peaks.from_json(json.loads(json.dumps(native_peaks.to_json()))).to_json() == native_peaks.to_json()


def test_fraction_of_peak_is_macs_over_time_over_peak(native_peaks):
    macs = int(native_peaks.fp32.gmacs * 1e9 / 100)  # what the peak does in 10 ms ...
    assert native_peaks.fraction(macs, 0.02, "float32") == pytest.approx(0.5)  # ... done in 20 ms
    assert native_peaks.fraction(macs, 0.0, "float32") is None


def test_the_inner_loops_are_independent_fma_and_dot_chains():
    """The kernels' assembly: the fp32 loop is vfmadd*ps on zmm (AVX-512) or ymm registers, each
    on its own accumulator register, with no memory operand; the int8 loop is vpdpbusd where the
    target has VNNI."""
    target = resolve_target("native").to_tvm()
    asm = peak_assembly("native")
    width = {16: "zmm", 8: "ymm"}.get(_lanes(target))
    if width is None:
        pytest.skip("the assembly check reads x86 registers")
    fmas = re.findall(rf"vfmadd\d+ps\s+(%{width}\d+),\s*(%{width}\d+),\s*(%{width}\d+)", asm)
    assert fmas, "no register-only vfmadd*ps in the fp32 kernel"
    assert not re.search(r"vfmadd\d+ps\s+[^%\s]*\(", asm), "an FMA reads memory: accumulators spilled"
    accumulators = {dst for _, _, dst in fmas}
    assert len(accumulators) >= 12, accumulators  # independent chains, one register each
    if int8_dot_for(target) is not None and int8_dot_for(target).lanes == 16:
        dots = re.findall(r"vpdpbusd\s+%zmm\d+,\s*%zmm\d+,\s*(%zmm\d+)", asm)
        assert len(set(dots)) >= 12, dots


def test_avx2_target_measures_the_pmaddubsw_sequence():
    if "avx2" not in cpu_features(resolve_target("native").to_tvm()):
        pytest.skip("needs an AVX2 CPU")
    peaks = measure_peaks("x86-avx2", threads=1, repeat=5)
    assert peaks.fp32.instruction.endswith("ymm") and "vpmaddubsw" in peaks.int8.instruction
    asm = peak_assembly("x86-avx2")
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
    assert not re.search(r"vfmadd\d+ps\s+-?\d*\(%rsp\)", asm), "accumulators spilled to the stack"


def test_threads_beyond_the_pool_are_refused():
    import tvm

    with pytest.raises(ConfigError, match="TVM_NUM_THREADS"):
        measure_peaks("native", threads=int(tvm.runtime.num_threads()) + 1)


class ConvLinear(nn.Module):
    """Stride-2 conv, grouped conv, depthwise conv, a linear layer, an activation matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)  # 3x32x32 -> 16x16x16
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)  # 16x16x16 -> 32x16x16
        self.depthwise = nn.Conv2d(32, 32, 5, padding=2, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = self.depthwise(self.grouped(torch.relu(self.conv(x))))
        tokens = y.flatten(2).transpose(1, 2)  # 1 x 256 x 32
        scores = tokens @ tokens.transpose(1, 2)  # 1 x 256 x 256, K = 32
        return self.fc(scores.mean(dim=2, keepdim=True) * tokens)


CONV_LINEAR_MACS = (
    16 * 16 * 16 * (3 * 3 * 3)  # conv: out elements x IC x KH x KW
    + 32 * 16 * 16 * (16 // 4 * 3 * 3)  # grouped: IC / groups per output
    + 32 * 16 * 16 * (5 * 5)  # depthwise: one input channel per output
    + 256 * 256 * 32  # tokens @ tokens^T
    + 256 * 10 * 32  # fc over 256 rows
)


def test_mac_count_of_a_small_model_is_the_hand_count(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "convlinear.onnx"
    torch.onnx.export(ConvLinear().eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"], dynamo=False)
    imported = qcompile.import_model(str(path))
    count = count_macs(imported.mod)
    assert count.total == CONV_LINEAR_MACS
    assert count.by_dtype == {"float32": CONV_LINEAR_MACS}
    assert [layer.name for layer in count.layers] == ["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0", "matmul_1"]
    assert count.layers[3].macs == 256 * 256 * 32
    grouped, depthwise, scores = count.layers[1], count.layers[2], count.layers[3]
    assert (grouped.groups, grouped.group_channels, grouped.depthwise) == (4, 4, False)
    assert (depthwise.groups, depthwise.group_channels, depthwise.depthwise) == (32, 1, True)
    assert not scores.constant_weight and count.layers[4].constant_weight
    assert MacCount.from_json(json.loads(json.dumps(count.to_json()))) == count


def test_build_records_macs_per_dtype_in_the_manifest(tmp_path, tiny_onnx):
    """int8 layers count as int8, a layer kept float as float32; the total is the float model's."""
    calib = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype("float32")
    art = qcompile.compile(str(tiny_onnx), "native", quantization=qcompile.Int8Config(num_samples=4, keep_float=("conv2d_1",)),
                           calibration_data=calib, out_dir=tmp_path, name="tiny-int8", tuning_logs=False)
    macs = art.manifest.build["macs"]
    # TinyResNet: stem 3->8 3x3 s2 (16x16 out), block 8->8 3x3, depthwise 8 3x3, linear 8->10
    stem, block, depthwise, head = 8 * 16 * 16 * 27, 8 * 16 * 16 * 72, 8 * 16 * 16 * 9, 10 * 8
    assert macs["total"] == stem + block + depthwise + head
    assert macs["by_dtype"] == {"int8": stem + depthwise + head, "float32": block}
    assert {e["name"]: e["dtype"] for e in macs["layers"]}["conv2d_1"] == "float32"
