"""Mixed precision under an accuracy budget (qcompile.accuracy.budget, build --accuracy-budget).

The model: a depthwise-separable CNN (benchmarks/digits_accuracy.py's layer pattern, wider)
on the real scikit-learn digits upsampled to 16x16, trained for 3 epochs, built for batches of
8 (at batch 1 a model this small spends most of a run in the VM's fixed per-call work, and
int8's advantage would be within the noise of a shared machine; at batch 8 int8 is ~1.7x).  Two of its layers are then broken for per-tensor int8, the
function unchanged: one output channel of the first conv and one input channel of the linear
head carry weights 1000x the others' on a channel that is always zero (a dead ReLU channel).
One weight scale per layer (``Int8Config(weights=PerTensor(), equalize=False,
bias_correction=False)``) then rounds every other weight of those layers to zero and top-1
collapses to chance, while the float model is untouched: the budget must find those two
layers and keep the rest int8.
"""
from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

import qcompile
from qcompile.accuracy import budget as budget_module
from qcompile.accuracy import evaluate
from qcompile.accuracy.budget import AccuracyBudget, fit_budget
from qcompile.errors import AccuracyBudgetError, ConfigError
from qcompile.runtime import CompiledModel
from qcompile.runtime.rpc import RpcEndpoint, free_port, start_server

pytestmark = pytest.mark.slow

SIZE, WIDTH, BATCH = 16, 48, 8
CONFIG = qcompile.Int8Config(weights=qcompile.PerTensor(), equalize=False, bias_correction=False, num_samples=64)


class SeparableNet(nn.Module):
    """conv-BN-ReLU, then depthwise 3x3 + pointwise 1x1 twice (each with BN + ReLU), global pool, linear."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, k: int, groups: int = 1, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        c = WIDTH
        self.features = nn.Sequential(*cbr(1, c, 3), *cbr(c, c, 3, groups=c), *cbr(c, 2 * c, 1),
                                      *cbr(2 * c, 2 * c, 3, groups=2 * c, stride=2), *cbr(2 * c, 4 * c, 1))
        self.head = nn.Linear(4 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def break_for_per_tensor(net: SeparableNet) -> SeparableNet:
    """Dead channels with outlier weights in the first conv (conv2d_0) and the head (matmul_0):
    the same function, but no single weight scale covers those layers."""
    layers = list(net.features)
    with torch.no_grad():
        conv, bn = layers[0], layers[1]
        conv.weight[0] *= 1000.0  # output channel 0: huge weights ...
        bn.weight[0], bn.running_mean[0], bn.running_var[0] = 1.0, 0.0, 1.0 - bn.eps
        bn.bias[0] = -2.0 * float(conv.weight[0].abs().sum())  # ... and a bias no input overcomes: ReLU gives 0
        last_bn = layers[13]  # the last pointwise conv's output channel 0 dies ...
        last_bn.bias[0] = -1000.0
        net.head.weight[:, 0] = 1000.0 * net.head.weight.abs().max()  # ... and the head weighs it 1000x
    return net


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(onnx path, calibration x, eval .npz with labels, eval .npz without, float .so, workdir)."""
    spec = importlib.util.spec_from_file_location("digits_accuracy", REPO / "benchmarks" / "digits_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = bench.load_digits()
    up = SIZE // 8
    xtr, xte = (np.ascontiguousarray(x.repeat(up, 2).repeat(up, 3)) for x in (xtr, xte))
    net = break_for_per_tensor(bench.train(xtr, ytr, epochs=3, make=SeparableNet))
    work = tmp_path_factory.mktemp("budget")
    onnx = work / "separable.onnx"
    torch.onnx.export(net, (torch.zeros(BATCH, 1, SIZE, SIZE),), str(onnx), input_names=["x"], output_names=["y"],
                      dynamo=False)
    labelled, unlabelled = work / "val.npz", work / "val-nolabels.npz"
    np.savez(labelled, x=xte[:296], labels=yte[:296])  # 37 batches of 8
    np.savez(unlabelled, x=xte[:296])
    fp32 = qcompile.compile(str(onnx), out_dir=work, name="fp32", tuning_logs=False)
    return onnx, xtr[:64], labelled, unlabelled, fp32, work


def _median_latencies(libraries, rounds: int = 9, repeat: int = 100) -> list[float]:
    """Median over ``rounds`` interleaved benchmarks (each a median of ``repeat`` runs): the
    libraries take turns, so a busy neighbour on the machine slows them alike."""
    models = [qcompile.load(lib) for lib in libraries]
    times = [[] for _ in models]
    for _ in range(rounds):
        for k, m in enumerate(models):
            times[k].append(float(np.median(m.benchmark(repeat=repeat).times_ms)))
    return [float(np.median(t)) for t in times]


def test_budget_falls_back_the_broken_layers_and_beats_float(case, tmp_path):
    """The chosen model meets the budget (re-evaluated here), keeps fewer layers float than
    the float model has, and is measured faster than the float build: medians of 9
    interleaved rounds of 100 runs each, the mix at least 10% faster (all-int8 is ~1.7x)."""
    onnx, calib, labelled, _, fp32, _ = case
    budget = AccuracyBudget(max_top1_drop=0.5)
    result = fit_budget(str(onnx), "native", {"x": calib}, labelled, budget, CONFIG, out_dir=tmp_path,
                        name="mixed", rounds=5, tuning_logs=False)
    print(result.to_text())

    # int8 alone misses the budget: the case forces fallbacks
    assert not result.steps[0].holds and result.steps[0].added is None
    assert result.int8_value > 0.5
    assert result.chosen == "mixed"

    # the written model meets the budget, measured again here
    reference = evaluate(fp32.library, labelled)
    chosen = evaluate(result.artifact.library, labelled)
    assert reference.top1 >= 80.0, "the float model did not train"
    assert reference.top1 - chosen.top1 <= 0.5
    assert abs((reference.top1 - chosen.top1) - result.value) < 1e-9

    # fewer float layers than all-float; the broken layers among them; the manifest says so
    names = [la.name for la in result.layers]
    assert len(names) == 6 and len(result.float_layers) < len(names)
    assert {"conv2d_0", "matmul_0"} <= set(result.float_layers)
    manifest = json.loads(result.artifact.manifest_file.read_text())
    assert sorted(manifest["quantization"]["float_layers"]) == sorted(result.float_layers)  # program order there
    assert manifest["quantization"]["budget"]["chosen"] == "mixed"
    recorded = manifest["quantization"]["budget"]["steps"]
    assert {s["added"] for s in recorded[1:] if s["added"]} >= set(result.float_layers)

    # the step record: each fallback adds one layer, with its figure, latency and why, until one
    # holds; then pruning tries each fallen-back layer int8 again (both are needed here: no trial holds)
    fallbacks = [s for s in result.steps if s.removed is None]
    for before, step in itertools.pairwise(fallbacks):
        assert step.float_layers == (*before.float_layers, step.added)
        assert step.latency_ms > 0 and step.why
    assert fallbacks[-1].holds and not any(s.holds for s in fallbacks[:-1])
    assert fallbacks[-1].float_layers == result.float_layers
    trials = [s for s in result.steps if s.removed is not None]
    assert sorted(s.removed for s in trials) == sorted(result.float_layers)
    assert not any(s.holds for s in trials)
    assert all(set(s.float_layers) == set(result.float_layers) - {s.removed} for s in trials)
    by_name = {la.name: la for la in result.layers}
    for name in result.float_layers:  # the broken layers lose the most alone
        assert by_name[name].loss > 10.0 and by_name[name].int8_ms is not None and by_name[name].float_ms is not None
    assert all(by_name[n].loss < 10.0 for n in names if n not in ("conv2d_0", "matmul_0"))

    # measured faster than the float build
    mixed_ms, float_ms = _median_latencies([result.artifact.library, fp32.library])
    assert mixed_ms < 0.9 * float_ms, (mixed_ms, float_ms)


def test_budget_without_labels_on_the_cli(case, tmp_path, cli):
    """--accuracy-metric agreement on unlabelled data: the CLI prints the step table and writes
    the artifact; a top-1 budget on the same data is refused (no labels: exit 2)."""
    onnx, calib, _, unlabelled, _, work = case
    calib_file = work / "calib.npz"
    np.savez(calib_file, x=calib)
    flags = ["build", onnx, "--quantize", "int8", "--calib-data", calib_file, "--per-tensor", "--no-equalize",
             "--no-bias-correction", "--eval-data", unlabelled, "-o", tmp_path, "--quiet"]
    refused = cli(*flags, "--accuracy-budget", "0.5")
    assert refused.code == ConfigError.exit_code and "labels" in refused.err
    done = cli(*flags, "--accuracy-budget", "98", "--accuracy-metric", "agreement", "--name", "agree")
    assert done.code == 0, done.err
    assert "| step | float layers | agreement % | bought | ms | cost ms |" in done.out and "chosen: mixed" in done.out
    manifest = json.loads((tmp_path / "agree.manifest.json").read_text())
    budget = manifest["quantization"]["budget"]
    assert budget["budget"] == {"metric": "agreement", "limit": 98.0}
    assert budget["value"] >= 98.0 and any(s["holds"] for s in budget["steps"])
    assert {s["float_layers"] == budget["float_layers"] and s["holds"] for s in budget["steps"]} >= {True}


def test_budget_over_rpc_times_and_evaluates_on_the_device(case, tmp_path, monkeypatch):
    """With ``rpc`` (a local RPC server): every benchmark and every evaluation run is on the
    remote, the kernel profiler is never used, each layer's cost is the all-float minus the
    only-this-layer-int8 model latency timed there, and the result and manifest say where."""
    onnx, calib, labelled, _, fp32, _ = case
    benchmarked: list[str | None] = []
    ran: list[str | None] = []
    benchmark, run = CompiledModel.benchmark, CompiledModel.run

    def spy_benchmark(self, *args, **kwargs):
        benchmarked.append(self.remote)
        return benchmark(self, *args, **kwargs)

    def spy_run(self, *args, **kwargs):
        ran.append(self.remote)
        return run(self, *args, **kwargs)

    def no_profiler(*_args, **_kwargs):
        raise AssertionError("the kernel profiler ran during an RPC search")

    monkeypatch.setattr(CompiledModel, "benchmark", spy_benchmark)
    monkeypatch.setattr(CompiledModel, "run", spy_run)
    monkeypatch.setattr(budget_module, "_kernel_times", no_profiler)
    with start_server("127.0.0.1", free_port(), log=tmp_path / "server.log") as server:
        result = fit_budget(str(onnx), "native", {"x": calib}, labelled, AccuracyBudget(max_top1_drop=0.5), CONFIG,
                            out_dir=tmp_path, name="mixed-rpc", rounds=3, repeat=20, tuning_logs=False,
                            rpc=RpcEndpoint(server.address))
    print(result.to_text())
    remote = f"RPC server 127.0.0.1:{server.address[1]}"
    assert benchmarked and set(benchmarked) == {remote}
    assert ran and set(ran) == {remote}
    device = f"rpc 127.0.0.1:{server.address[1]}"
    assert result.timed_on == result.evaluated_on == device
    assert f"timed on {device}" in result.to_text()

    # per-layer costs: whole-model latencies on the device, one all-float figure for all layers
    assert not result.steps[0].holds and len(result.layers) == 6
    assert all(la.timed == "model" and la.int8_ms > 0 and la.float_ms > 0 for la in result.layers)
    assert len({la.float_ms for la in result.layers}) == 1
    assert all(abs(la.cost_ms - (la.float_ms - la.int8_ms)) < 1e-9 for la in result.layers)
    by_name = {la.name: la for la in result.layers}
    assert by_name["conv2d_0"].loss > 10.0 and by_name["matmul_0"].loss > 10.0

    # the written model meets the budget (evaluated again here: the same library on the same CPU)
    reference = evaluate(fp32.library, labelled)
    chosen = evaluate(result.artifact.library, labelled)
    assert reference.top1 - chosen.top1 <= 0.5
    if result.chosen == "mixed":
        assert {"conv2d_0", "matmul_0"} <= set(result.float_layers)
        assert abs((reference.top1 - chosen.top1) - result.value) < 1e-9
    manifest = json.loads(result.artifact.manifest_file.read_text())["quantization"]["budget"]
    assert manifest["timed_on"] == manifest["evaluated_on"] == device
    assert {la["timed"] for la in manifest["layers"]} == {"model"}


def test_budget_config_errors(cli):
    with pytest.raises(ConfigError, match="exactly one"):
        AccuracyBudget(max_top1_drop=0.5, min_cosine=0.99)
    with pytest.raises(ConfigError, match="min_cosine"):
        AccuracyBudget(min_cosine=1.5)
    with pytest.raises(ConfigError, match="accuracy metric"):
        AccuracyBudget.from_metric("f1", 0.5)
    assert AccuracyBudget.from_metric("sqnr", 30).min_sqnr_db == 30
    assert issubclass(AccuracyBudgetError, qcompile.QcompileError) and AccuracyBudgetError.exit_code == 12
    refused = cli("build", "model.onnx", "--rpc", "127.0.0.1:9090")  # refused before the model is read
    assert refused.code == ConfigError.exit_code and "--accuracy-budget" in refused.err
