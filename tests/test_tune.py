"""Tuning: records written by `qcompile tune` are found and applied by `qcompile build`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qcompile.runtime import CompiledModel
from qcompile.target import resolve_target
from qcompile.tune.records import database_dir

pytestmark = pytest.mark.slow


def _tune(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from qcompile.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["tune", *map(str, args)])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_pt2):
    logs = tmp_path_factory.mktemp("tuning_logs")
    # 6 kernels, at least one measured candidate each: enough to check the plumbing.
    code, err = _tune(tiny_pt2, "--trials", "12", "--max-trials-per-task", "2", "--log-dir", logs)
    assert code == 0, err
    return logs, err


@pytest.fixture(scope="module")
def tuned_logs(tuned):
    return tuned[0]


def test_tune_reports_progress_with_best_latency(tuned):
    lines = [ln for ln in tuned[1].splitlines() if "trials]" in ln]
    assert lines, tuned[1][-2000:]
    assert "/12 trials]" in lines[-1] and "best" in lines[-1] and "ms over" in lines[-1]
    # The default schedule is measured and committed first: a tuned build is never slower.
    assert "kernels seeded with the default schedule's measurement" in tuned[1]
    # the float convs run on qcompile's own kernel: its register tiles are measured, not searched
    assert "register tiles of fused_qc_conv2d_float32" in tuned[1]
    assert "conv kernels keep their hand schedule" in tuned[1]


def test_tune_measures_over_rpc(tmp_path, tiny_pt2):
    from qcompile.runtime.rpc import free_port, start_server

    with start_server("127.0.0.1", free_port(), log=tmp_path / "server.log") as server:
        host, port = server.address
        code, err = _tune(tiny_pt2, "--trials", "6", "--max-trials-per-task", "1", "--log-dir", tmp_path / "logs",
                          "--rpc", f"{host}:{port}")
    assert code == 0, err[-3000:]
    records = (database_dir(resolve_target("native"), tmp_path / "logs") / "database_tuning_record.json")
    measured = [json.loads(r)[1][1][0] for r in records.read_text().splitlines()]
    assert len(measured) >= 4 and all(t < 1.0 for t in measured), measured
    # the conv kernels' register tiles are measured on the board too (seeding over RPC)
    assert "kernels seeded with the default schedule's measurement on" in err
    from qcompile.frontend import import_model
    from qcompile.kernels import hand_kernel_tiles
    from qcompile.tune import records as rec

    tasks = rec.extract_tasks(import_model(str(tiny_pt2)), resolve_target("native"))
    convs = [t for t in tasks if hand_kernel_tiles(t.dispatched[0]) is not None]
    database = rec.open_database(database_dir(resolve_target("native"), tmp_path / "logs"))
    assert convs and all(database.get_top_k(database.commit_workload(t.dispatched[0]), 1) for t in convs)
    refused = _tune(tiny_pt2, "--trials", "2", "--log-dir", tmp_path / "x", "--rpc", f"127.0.0.1:{free_port()}")
    assert refused[0] == 11 and "cannot reach RPC server" in refused[1]


def test_tune_writes_database_keyed_by_target_and_tvm(tuned_logs):
    import tvm

    path = database_dir(resolve_target("native"), tuned_logs)
    assert path.parent.parent == tuned_logs and path.name == f"tvm-{tvm.__version__}"
    records = (path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 6
    # Every record carries a real measurement (MetaSchedule writes 1e10 s for a failed run).
    assert all(json.loads(r)[1][1][0] < 1.0 for r in records)


def test_build_applies_records_and_reports_hits(cli, tuned_logs, tiny_pt2, tmp_path, tiny_input):
    result = cli("build", tiny_pt2, "--log-dir", tuned_logs, "-o", tmp_path / "tuned")
    assert result.code == 0, result.err
    tuning = json.loads((tmp_path / "tuned" / "tiny.manifest.json").read_text())["build"]["tuning"]
    assert tuning["hits"] >= 4 and tuning["misses"] == 0, tuning
    assert f"tuning records: {tuning['hits']} kernels tuned, 0 untuned" in result.err
    untuned = cli("build", tiny_pt2, "--log-dir", tmp_path / "empty", "-o", tmp_path / "untuned")
    # a warning naming the folder it looked in, not a progress line
    assert "warning: no tuning records" in untuned.err and str(tmp_path / "empty") in untuned.err, untuned.err
    a = CompiledModel.load(tmp_path / "tuned" / "tiny.so").run({"x": tiny_input})["output0"]
    b = CompiledModel.load(tmp_path / "untuned" / "tiny.so").run({"x": tiny_input})["output0"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_database_for_another_model_warns(cli, tuned_logs, dynamic_onnx, tmp_path):
    result = cli("build", dynamic_onnx, "--input-shape", "input:1x3x8x8", "--log-dir", tuned_logs, "-o", tmp_path)
    assert result.code == 0, result.err
    assert "warning: tuning records in" in result.err and "matched none of" in result.err


def test_int8_tuning_keeps_tensorized_convs_and_builds_from_records(cli, cli_subprocess, tiny_pt2, tmp_path,
                                                                    tiny_input):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4,) + tiny_input.shape[1:]).astype("float32"))
    logs = tmp_path / "logs"
    quant = ["--quantize", "int8", "--calib-data", calib, "--calib-samples", "4"]
    code, err = _tune(tiny_pt2, *quant, "--trials", "24", "--max-trials-per-task", "2", "--log-dir", logs)
    assert code == 0, err
    assert "conv kernels keep their hand schedule" in err
    tuned = cli("build", tiny_pt2, *quant, "--log-dir", logs, "-o", tmp_path / "tuned")
    assert tuned.code == 0, tuned.err
    tuning = json.loads((tmp_path / "tuned" / "tiny-int8.manifest.json").read_text())["build"]["tuning"]
    assert tuning["misses"] == 0 and tuning["hits"] > 0  # seeded hand schedules replay from the records
    untuned = cli("build", tiny_pt2, *quant, "--log-dir", tmp_path / "empty", "-o", tmp_path / "untuned")
    assert untuned.code == 0, untuned.err
    a = CompiledModel.load(tmp_path / "tuned" / "tiny-int8.so").run({"x": tiny_input})["output0"]
    b = CompiledModel.load(tmp_path / "untuned" / "tiny-int8.so").run({"x": tiny_input})["output0"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # A fresh process reading a database whose records name qcompile's tensor intrinsics
    # (an fp32 build imports nothing int8 before opening it).
    fp32 = cli_subprocess("build", tiny_pt2, "--log-dir", logs, "-o", tmp_path / "fp32")
    assert fp32.code == 0, fp32.err


class _FakeResult:
    def __init__(self, secs, error=None):
        self.run_secs, self.error_msg = secs, error

    def result(self):
        return self


class _FakeRunner:
    """Each input is a name; its run takes seconds[name][round]; records the order run."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def run(self, inputs):
        self.calls.append(list(inputs))
        return [_FakeResult([self.seconds[name][len(self.calls) - 1]]) if name in self.seconds
                else _FakeResult(None, "failed") for name in inputs]


def test_register_tiles_are_measured_in_rotated_interleaved_rounds():
    from qcompile.tune.seeding import _measure_interleaved

    runner = _FakeRunner({"a": [1.0, 5.0, 1.2], "b": [2.0, 2.1, 1.9]})
    secs = _measure_interleaved(runner, ["a", "b", "broken"], rounds=3)
    assert runner.calls == [["a", "b", "broken"], ["b", "broken", "a"], ["broken", "a", "b"]]
    # per input, one mean per round, in round order; a failing input gets none
    assert secs == [[1.0, 5.0, 1.2], [2.0, 2.1, 1.9], []]
    assert float(np.median(secs[0])) < float(np.median(secs[1]))  # one slow round does not decide


def test_pooled_builder_keeps_its_workers_across_batches():
    import os

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune.workers import build_candidate, pooled_builder

    _, mod, target, _ = _double_kernel()
    good = ms.builder.BuilderInput(mod, target)
    builder = pooled_builder(build_candidate, max_workers=1)
    first = builder.build([good, good])
    pool = builder.pool
    second = builder.build([good])
    assert builder.pool is pool  # the same worker processes served both batches
    builder.close()
    assert first[0].error_msg is None and os.path.isfile(first[0].artifact_path)
    assert first[1].error_msg is None and first[1].artifact_path != first[0].artifact_path
    assert second[0].error_msg is None and os.path.isfile(second[0].artifact_path)
    lib = tvm.runtime.load_module(second[0].artifact_path)
    a = tvm.runtime.tensor(np.arange(16, dtype="float32"))
    b = tvm.runtime.tensor(np.zeros(16, dtype="float32"))
    lib["main"](a, b)
    np.testing.assert_allclose(b.numpy(), np.arange(16) * 2)


def test_seed_choice_keeps_the_default_unless_another_is_clearly_faster():
    from qcompile.tune.seeding import choose_seed

    assert choose_seed([[1.00, 1.02, 0.99], [0.985, 0.98, 0.99]]) == 0  # 1.5% faster: noise
    assert choose_seed([[1.00, 1.02, 0.99], [0.90, 0.91, 5.0]]) == 1  # 10% faster by the median
    assert choose_seed([[1.00], [0.985]], default_first=False) == 1  # no default: the fastest


def _double_kernel():
    """A 16-element kernel, a JSON database and what a tuning record of it needs."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def double(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")):
        for i in range(16):
            with T.sblock("b"):
                vi = T.axis.spatial(16, i)
                b[vi] = a[vi] * T.float32(2)

    target = tvm.target.Target({"kind": "llvm"})
    return double, tvm.IRModule({"main": double}), target, ms.arg_info.ArgInfo.from_prim_func(double)


def test_a_workload_with_only_failed_runs_counts_as_unmeasured(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune.records import open_database
    from qcompile.tune.seeding import default_lowering, has_valid_record

    double, mod, target, args_info = _double_kernel()
    database = open_database(tmp_path)
    assert not has_valid_record(database, mod)
    workload = database.commit_workload(mod)
    trace = default_lowering(double).trace
    # MetaSchedule stores a failed measurement as 1e10 s: a build would not apply it
    database.commit_tuning_record(ms.database.TuningRecord(trace, workload, [1e10], target, args_info))
    assert database.has_workload(mod) and not has_valid_record(database, mod)
    database.commit_tuning_record(ms.database.TuningRecord(trace, workload, [2e-6], target, args_info))
    assert has_valid_record(database, mod)


def test_default_lowering_records_are_visible_to_builds(tmp_path):
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune.records import open_database
    from qcompile.tune.seeding import default_lowering

    double, mod, target, args_info = _double_kernel()
    database = open_database(tmp_path)
    workload = database.commit_workload(mod)
    # TVM 0.27's JSONDatabase skips records with an empty trace, however fast
    database.commit_tuning_record(ms.database.TuningRecord(s_tir.Schedule(double).trace, workload, [1e-6], target,
                                                           args_info))
    assert not database.get_top_k(workload, 1)
    sch = default_lowering(double)
    tvm.ir.assert_structural_equal(sch.mod, mod)  # the same code as no schedule at all
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [2e-6], target, args_info))
    with target:
        found = database.query_tuning_record(mod, target, "main")
    assert found is not None and float(found.run_secs[0]) == 2e-6


def test_records_do_not_depend_on_the_core_count():
    """A 16-core machine finds the records of its ISA; another mcpu does not."""
    from dataclasses import replace

    from qcompile.tune.records import PACKAGED_ROOT, find_database

    spec = resolve_target("x86-avx512")
    many = replace(spec, name="native", target={**spec.target, "num-cores": 16})
    assert database_dir(many) == database_dir(spec)
    assert find_database(many) is not None and find_database(many).is_relative_to(PACKAGED_ROOT)
    other = replace(spec, target={**spec.target, "mcpu": "znver4"})
    assert database_dir(other) != database_dir(spec)
