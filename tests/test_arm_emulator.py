"""Emulated boards: resnet18 int8 cross-compiled for a Cortex-A72 (``llvm -mcpu=cortex-a72``,
widening multiplies) and for the rpi5 preset (Cortex-A76, convs tensorized with ``sdot``) runs
over RPC under qemu-user and computes what the x86 build computes."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import skip_unless

from qcompile.build import build
from qcompile.frontend import import_model
from qcompile.quantize import quantize_model
from qcompile.quantize.config import Int8Config
from qcompile.runtime import CompiledModel
from qcompile.runtime.emulator import emulator_dir
from qcompile.runtime.rpc import RpcEndpoint, free_port
from qcompile.target import resolve_target

pytestmark = pytest.mark.slow


def _board(tmp_path_factory, cpu: str):
    skip_unless((emulator_dir() / "python3").is_file(), "emulator",
                f"no emulated ARM board in {emulator_dir()}: run deploy/arm-emulator/setup.sh")
    from qcompile.runtime.emulator import start_emulated_board

    return start_emulated_board(port=free_port(), cpu=cpu, log=tmp_path_factory.mktemp(cpu) / "server.log")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    service = _board(tmp_path_factory, "cortex-a72")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def board_a76(tmp_path_factory):
    service = _board(tmp_path_factory, "cortex-a76")
    yield service
    service.stop()


def test_resnet18_int8_on_emulated_cortex_a72_matches_x86(board, tmp_path):
    # Parsed exactly as `qcompile build --target "llvm -mcpu=cortex-a72"` parses it.
    _check_arm_matches_x86(board, resolve_target("llvm -mcpu=cortex-a72"), Int8Config(num_samples=4), tmp_path)


def test_resnet18_int8_sdot_on_emulated_cortex_a76_matches_x86(board_a76, tmp_path):
    # int8 activations: what sdot multiplies; the x86 build of the same model is not tensorized
    # (x86's instructions take uint8 activations), so this compares two independent kernels.
    _check_arm_matches_x86(board_a76, resolve_target("rpi5"), Int8Config(num_samples=4, activation_symmetric=True),
                           tmp_path)


def _check_arm_matches_x86(board, arm_target, config, tmp_path):
    rng = np.random.default_rng(0)
    model = import_model("resnet18", {})
    name = model.inputs[0].name
    calib = [{name: rng.standard_normal((1, 3, 224, 224)).astype("float32")} for _ in range(4)]
    native = resolve_target("native")
    quantized = quantize_model(model, calib, config, arm_target.to_tvm())
    arm = build(quantized, arm_target, tmp_path / "arm")
    x86 = build(quantized, native, tmp_path / "x86")
    assert "aarch64" in arm.manifest.target["target"]["mtriple"]

    x = rng.standard_normal((1, 3, 224, 224)).astype("float32")
    remote = CompiledModel.load(arm.library, rpc=RpcEndpoint(board.address, timeout=120))
    got = remote.run(x)
    want = CompiledModel.load(x86.library).run(x)
    # The logits are the last matmul's int32 accumulator times sx * sw: one LSB of that
    # accumulator is the smallest difference an integer disagreement can make.
    last = [layer for layer in quantized.quantization.layers if layer["op"] == "matmul"][-1]
    lsb = float(last["input_scale"]) * float(last["weight_scale_max"])
    for key in want:
        diff = float(np.abs(got[key] - want[key]).max())
        assert diff <= lsb * 1.001, f"{key}: ARM vs x86 max diff {diff:.3g} > 1 LSB ({lsb:.3g})"
        assert np.argsort(-got[key][0])[:5].tolist() == np.argsort(-want[key][0])[:5].tolist()


def test_tune_seeds_conv_tiles_on_the_emulated_board(board, tmp_path, tiny_pt2):
    """`qcompile tune --rpc` measures the conv kernels' register tiles on the board and writes
    their records (qemu's timings: a check that it works, never committed)."""
    from qcompile.cli.main import main
    from qcompile.frontend import import_model as _import
    from qcompile.kernels import hand_kernel_tiles
    from qcompile.tune import records

    target = resolve_target("rpi4")  # Cortex-A72, 4 cores: the search needs a core count
    host, port = board.address
    code = main(["tune", str(tiny_pt2), "--target", "rpi4", "--trials", "2",
                 "--max-trials-per-task", "1", "--log-dir", str(tmp_path / "logs"), "--rpc", f"{host}:{port}"])
    assert code == 0
    tasks = records.extract_tasks(_import(str(tiny_pt2)), target)
    convs = [t for t in tasks if hand_kernel_tiles(t.dispatched[0]) is not None]
    database = records.open_database(records.database_dir(target, tmp_path / "logs"))
    assert convs and all(database.get_top_k(database.commit_workload(t.dispatched[0]), 1) for t in convs)
