"""Which integer instructions the int8 kernels compile to, read from the disassembly.

The conv kernels are tensorized (qcompile.kernels.packed_conv2d) with the target's dot
product: x86 AVX-512 VNNI `vpdpbusd`, x86 AVX2 `vpmaddubsw` (+ `vpmaddwd`), aarch64 `sdot` on
a +dotprod Cortex-A76 with int8 activations.  Without one (Cortex-A72) the int8 kernels use
widening multiplies (smull/smlal).  Compiling needs no such CPU; running is tested in
test_packed_conv.py (this machine's instruction) and test_arm_emulator.py (sdot under qemu)."""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from conftest import skip_unless

from qcompile.build import build
from qcompile.frontend import import_model
from qcompile.quantize import quantize_model
from qcompile.quantize.config import Int8Config
from qcompile.target import resolve_target

# int8 x int8 products widened to 16/32 bits: multiply-accumulate or multiply-long.
WIDENING_MAC = {"smlal", "smlal2", "smull", "smull2"}


def _quantized(tiny_pt2, symmetric: bool, preset: str):
    """The tiny model quantized for ``preset`` (7-bit weights for AVX2's vpmaddubsw, 8-bit for
    VNNI / sdot: quantizing for another CPU leaves AVX2's kernels inexact, on TVM's conv)."""
    model = import_model(str(tiny_pt2))
    rng = np.random.default_rng(0)
    calib = [{model.inputs[0].name: rng.standard_normal((1, 3, 32, 32)).astype("float32")} for _ in range(4)]
    return quantize_model(model, calib, Int8Config(num_samples=4, activation_symmetric=symmetric),
                          resolve_target(preset).to_tvm())


def _mnemonics(objdump: str, library) -> Counter:
    skip_unless(shutil.which(objdump) is not None, "cross",
                f"{objdump} is not installed (scripts/setup.sh installs binutils for aarch64)")
    text = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return Counter(m.group(1) for m in re.finditer(r"^\s+[0-9a-f]+:\s+(?:[0-9a-f]{2,8} )+\s*([a-z0-9.]+)", text, re.MULTILINE))


@pytest.mark.parametrize("preset, symmetric, expected", [
    ("rpi4", False, WIDENING_MAC),
    ("rpi5", True, {"sdot"}),
])
def test_aarch64_int8_uses_widening_mac_or_dot_product(tmp_path, tiny_pt2, preset, symmetric, expected):
    quantized = _quantized(tiny_pt2, symmetric, preset)
    artifact = build(quantized, resolve_target(preset), tmp_path)
    ops = _mnemonics("aarch64-linux-gnu-objdump", artifact.library)
    assert expected & set(ops), {k: v for k, v in ops.items() if k.startswith(("s", "u", "m"))}


@pytest.mark.parametrize("preset, instruction", [("x86-avx2", "vpmaddubsw"), ("x86-avx512", "vpdpbusd")])
def test_x86_int8_convs_use_the_dot_product_instruction(tmp_path, tiny_pt2, preset, instruction):
    quantized = _quantized(tiny_pt2, False, preset)
    artifact = build(quantized, resolve_target(preset), tmp_path)
    ops = _mnemonics("objdump", artifact.library)
    assert ops[instruction] > 0, {k: v for k, v in ops.items() if k.startswith("vp")}
