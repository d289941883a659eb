"""Mixed precision under an accuracy budget: the fastest int8/float mix that keeps accuracy.

:func:`fit_budget` builds the float model and the all-int8 model (one calibration), and
evaluates both (:func:`qcompile.accuracy.evaluate`, the float build as the reference).  If
int8 misses the :class:`AccuracyBudget`, it measures for every quantizable layer (PTQ's
``conv2d_N``/``matmul_N``):

* its **sensitivity**: the loss of the model with *only that layer* int8, every other layer
  float -- a build and an evaluation per layer, not a proxy.  (Only-this-layer-int8, not
  only-this-layer-float: where two layers each break the model on their own, keeping either
  one float alone buys nothing, and the ranking would be blind);
* its **cost**: how much slower the model is with the layer float.  On this machine, the time
  of its kernel in the float build minus in the int8 build, from the per-kernel profiles of
  both builds matched to the layers (:mod:`qcompile.runtime.explain`).  On a device over RPC,
  where that profiler (a hook in this process) cannot run, the all-float model's latency minus
  the only-this-layer-int8 model's (the sensitivity builds), all timed there in turns.

It then falls layers back to float one at a time, the highest loss per millisecond of cost
first (layers whose float kernel is no slower first of all), rebuilding and re-evaluating the
model after each, until the budget holds; then it tries each fallen-back layer int8 again, the
costliest first, and keeps it int8 where the budget still holds.  Every step's accuracy and
end-to-end latency are measured, not added up.  The fastest model within the budget wins: the mix, or the float
build where that is faster still.  Losses are in the budget's terms, 0 for the float model:
top-1 points lost, agreement points lost, ``1 - cosine``, or the noise-to-signal power ratio
``10^(-SQNR/10)`` (which adds up over independent errors).

Without ``rpc`` every candidate runs here, so the target must be this machine's.  With ``rpc``
every candidate is timed *and* evaluated on that device, in one session held for the whole
search (under a tracker, the same device for every candidate): its outputs are what the
deployed model computes, and a device of another architecture could not be evaluated here at
all.  The float build's outputs are recorded there once, as the reference.
``BudgetResult.timed_on`` and ``evaluated_on`` say where.
"""
from __future__ import annotations

import gc
import itertools
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompile.errors import AccuracyBudgetError, ConfigError

if TYPE_CHECKING:
    from qcompile.runtime.rpc import RpcEndpoint

Progress = Callable[[str], None]

# --accuracy-metric -> (AccuracyBudget field, what the value means)
METRICS = {
    "top1": ("max_top1_drop", "largest top-1 drop vs the float model, in points (needs labels)"),
    "agreement": ("min_agreement", "lowest share of samples (%) whose top-1 class is the float model's"),
    "cosine": ("min_cosine", "lowest mean cosine similarity of the outputs to the float model's"),
    "sqnr": ("min_sqnr_db", "lowest SQNR (dB) of the outputs against the float model's"),
}


@dataclass(frozen=True)
class AccuracyBudget:
    """How much accuracy the int8 model may lose: exactly one of

    max_top1_drop: top-1 points below the float build on labelled data;
    min_agreement: the percentage of samples whose top-1 class the float build's must be;
    min_cosine: the lowest mean (over samples) cosine similarity to the float build's output;
    min_sqnr_db: the lowest SQNR of the output against the float build's, in dB.

    The last three need no labels.  All are measured on the first output."""

    max_top1_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None

    def __post_init__(self) -> None:
        given = [(k, v) for k, v in self._fields() if v is not None]
        if len(given) != 1:
            raise ConfigError("AccuracyBudget: expected exactly one of max_top1_drop, min_agreement, min_cosine, "
                              f"min_sqnr_db, but got {dict(given) or 'none'}")
        key, value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"AccuracyBudget.{key}: expected a number, but got {value!r}")
        limits = {"max_top1_drop": (0.0, 100.0), "min_agreement": (0.0, 100.0), "min_cosine": (-1.0, 1.0)}
        lo, hi = limits.get(key, (-math.inf, math.inf))
        if not lo <= value <= hi:
            raise ConfigError(f"AccuracyBudget.{key}: expected a value in [{lo:g}, {hi:g}], but got {value!r}")

    @classmethod
    def from_metric(cls, metric: str, value: float) -> AccuracyBudget:
        """The budget ``qcompile build --accuracy-metric METRIC --accuracy-budget VALUE`` means."""
        if metric not in METRICS:
            raise ConfigError(f"accuracy metric: expected one of {', '.join(METRICS)}, but got {metric!r}")
        return cls(**{METRICS[metric][0]: value})

    def _fields(self) -> list[tuple[str, float | None]]:
        return [("max_top1_drop", self.max_top1_drop), ("min_agreement", self.min_agreement),
                ("min_cosine", self.min_cosine), ("min_sqnr_db", self.min_sqnr_db)]

    @property
    def metric(self) -> str:
        """``top1``, ``agreement``, ``cosine`` or ``sqnr``."""
        key = next(k for k, v in self._fields() if v is not None)
        return next(m for m, (f, _) in METRICS.items() if f == key)

    @property
    def limit(self) -> float:
        return next(v for _, v in self._fields() if v is not None)

    @property
    def needs_labels(self) -> bool:
        return self.metric == "top1"

    def value(self, result, float_top1: float | None) -> float:
        """The budget's figure for ``result`` (an :class:`EvalResult` against the float build):
        the top-1 drop in points, or the agreement, cosine or SQNR."""
        if self.metric == "top1":
            return float_top1 - result.top1
        agreement = result.agreement[result.output]
        key = {"agreement": "top1_agreement", "cosine": "cosine_mean", "sqnr": "sqnr_db"}[self.metric]
        if agreement.get(key) is None:
            raise ConfigError(f"accuracy metric {self.metric}: output {result.output!r} has no {key} (a top-1 "
                              "agreement needs a class axis): choose another --accuracy-metric")
        return float(agreement[key])

    def holds(self, value: float) -> bool:
        return value <= self.limit if self.metric == "top1" else value >= self.limit

    def loss(self, value: float) -> float:
        """What ``value`` lost against the float model (0 for the float model itself), in units
        that add up roughly over independent errors."""
        if self.metric == "top1":
            return max(0.0, value)
        if self.metric == "agreement":
            return max(0.0, 100.0 - value)
        if self.metric == "cosine":
            return max(0.0, 1.0 - value)
        return 0.0 if value == math.inf else 10.0 ** (-value / 10.0)

    def gain(self, before: float, after: float) -> float:
        """How much better ``after`` is than ``before``, in the metric's units (top-1 points
        regained, agreement points, cosine, dB)."""
        if before == after:
            return 0.0
        return before - after if self.metric == "top1" else after - before

    def describe(self) -> str:
        return {"top1": f"top-1 drop <= {self.limit:g} points", "agreement": f"top-1 agreement >= {self.limit:g}%",
                "cosine": f"mean cosine >= {self.limit:g}", "sqnr": f"SQNR >= {self.limit:g} dB"}[self.metric]

    def unit(self) -> str:
        return {"top1": "top-1 drop (points)", "agreement": "agreement %", "cosine": "cosine",
                "sqnr": "SQNR dB"}[self.metric]

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "limit": self.limit}


@dataclass(frozen=True)
class LayerCost:
    """One quantizable layer: the budget's figure and loss with only it int8 (the rest float),
    the int8 and float times its cost comes from (ms, None where unmatched), and the cost of
    keeping it float (``cost_ms``: float minus int8).  ``timed`` says what those times are:
    ``kernel``, its kernel in the int8 and float builds (profiled here); ``model``, the whole
    model with only this layer int8 and the all-float model (timed on the RPC device)."""

    name: str
    op: str
    value: float
    loss: float
    int8_ms: float | None
    float_ms: float | None
    cost_ms: float
    timed: str = "kernel"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "value": _num(self.value), "loss": _num(self.loss),
                "int8_ms": _ms(self.int8_ms), "float_ms": _ms(self.float_ms), "cost_ms": _ms(self.cost_ms),
                "timed": self.timed}


@dataclass(frozen=True)
class BudgetStep:
    """One measured model of the search: its float layers (``added``: the one this step fell
    back; ``removed``: the one a pruning step tried int8 again, kept int8 where the step
    holds), why, the budget's figure, its end-to-end latency and whether it holds."""

    float_layers: tuple[str, ...]
    added: str | None
    value: float
    latency_ms: float
    holds: bool
    why: str = ""
    removed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"float_layers": list(self.float_layers), "added": self.added, "removed": self.removed,
                "value": _num(self.value), "latency_ms": _ms(self.latency_ms), "holds": self.holds, "why": self.why}


@dataclass(frozen=True)
class BudgetResult:
    """What :func:`fit_budget` found: the chosen ``artifact`` (``chosen``: ``int8``, ``mixed``
    or ``float``), its float layers, the float and all-int8 builds' figures and latencies, the
    layers' sensitivities and costs, the steps (the all-int8 model first), and where every
    latency was timed and every figure evaluated (``local`` or ``rpc HOST:PORT``)."""

    budget: AccuracyBudget
    artifact: Any  # qcompile.build.Artifact
    chosen: str
    float_layers: tuple[str, ...]
    value: float
    latency_ms: float
    float_value: float
    float_latency_ms: float
    int8_value: float
    int8_latency_ms: float
    layers: tuple[LayerCost, ...] = ()
    steps: tuple[BudgetStep, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    timed_on: str = "local"
    evaluated_on: str = "local"

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget.to_json(), "chosen": self.chosen, "float_layers": list(self.float_layers),
                "timed_on": self.timed_on, "evaluated_on": self.evaluated_on,
                "value": _num(self.value), "latency_ms": _ms(self.latency_ms),
                "float": {"value": _num(self.float_value), "latency_ms": _ms(self.float_latency_ms)},
                "int8": {"value": _num(self.int8_value), "latency_ms": _ms(self.int8_latency_ms)},
                "layers": [la.to_json() for la in self.layers], "steps": [s.to_json() for s in self.steps],
                "notes": list(self.notes)}

    def to_text(self) -> str:
        unit = self.budget.unit()
        lines = [(f"budget: {self.budget.describe()}; float build: {unit} {self.float_value:.4g}, "
                  f"{self.float_latency_ms:.4f} ms; all-int8: {self.int8_value:.4g}, {self.int8_latency_ms:.4f} ms "
                  f"(timed on {self.timed_on}, evaluated on {self.evaluated_on})")]
        if self.layers:
            by_model = any(la.timed == "model" for la in self.layers)
            how = ("the model: all-float ms - only-this-layer-int8 ms" if by_model
                   else "its kernel: float ms - int8 ms")
            lines += ["", ("layer sensitivity (the model with only this layer int8) and the cost of keeping it "
                           f"float ({how}):"),
                      (f"| layer | {unit} | loss | {'only-int8 model' if by_model else 'int8'} ms | "
                       f"{'float model' if by_model else 'float'} ms | cost ms |"), "|---|---|---|---|---|---|"]
            lines += [f"| {la.name} | {la.value:.4g} | {la.loss:.4g} | {_fmt(la.int8_ms)} | {_fmt(la.float_ms)} | "
                      f"{la.cost_ms:+.4f} |" for la in self.layers]
        lines += ["", f"| step | float layers | {unit} | bought | ms | cost ms | holds | why |",
                  "|---|---|---|---|---|---|---|---|"]
        base = None  # the model a step changes: the previous step, or for a pruning step the last that held
        for k, step in enumerate(self.steps):
            before = base if step.removed is not None else (self.steps[k - 1] if k else None)
            if step.holds or step.removed is None:
                base = step
            bought = "" if before is None else _signed(self.budget.gain(before.value, step.value))
            cost = "" if before is None else f"{step.latency_ms - before.latency_ms:+.4f}"
            lines.append(f"| {k} | {', '.join(step.float_layers) or '(none)'} | {step.value:.4g} | {bought} | "
                         f"{step.latency_ms:.4f} | {cost} | {'yes' if step.holds else 'no'} | {step.why} |")
        what = ("the float build" if self.chosen == "float"
                else f"{self.chosen} ({', '.join(self.float_layers) or 'no layer'} float)")
        lines += ["", (f"chosen: {what}: {unit} {self.value:.4g}, {self.latency_ms:.4f} ms vs float "
                       f"{self.float_latency_ms:.4f} ms ({self.float_latency_ms / self.latency_ms:.2f}x)")]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def fit_budget(model, target, calibration_data, eval_data, budget: AccuracyBudget, config=None, *,
               labels=None, out_dir: str | Path = "out", name: str | None = None, preprocess=None,
               limit: int | None = None, repeat: int = 50, rounds: int = 3, prune: bool = True,
               tuning_logs=None, rpc: RpcEndpoint | None = None,
               progress: Progress | None = None) -> BudgetResult:
    """The fastest model within ``budget``: int8 with the fewest, cheapest layers float (module docstring).

    model: a path or torchvision name (imported here), or an :class:`~qcompile.model.ImportedModel`.
    calibration_data: as for :func:`qcompile.quantize` (read once, used for every candidate).
    eval_data: an ``.npz``/image folder (``labels`` overrides its labels) or an :class:`EvalData`;
      ``limit`` samples at most.
    config: the :class:`Int8Config` every candidate uses (its ``keep_float`` stays float throughout).
    repeat, rounds: each latency is the fastest of ``rounds`` medians of ``repeat`` runs (twice the
      rounds for the final comparison with the float build).
    prune: once the budget holds, try each fallen-back layer int8 again (one build each).
    rpc: a :class:`~qcompile.runtime.rpc.RpcEndpoint`: time and evaluate every candidate on that
      device (any target it runs), layer costs from whole-model latencies there; None: here.
    The winner is written to ``out_dir/NAME.so`` (NAME: the model's name, with ``-int8`` unless the
    float build wins) with its
    manifest, which records the search under ``quantization.budget``.  Raises
    :class:`~qcompile.errors.AccuracyBudgetError` when no mix of int8 and float layers holds."""
    from qcompile.accuracy.dataset import EvalData, load_eval_data
    from qcompile.api import import_model, prepare
    from qcompile.quantize.config import Int8Config
    from qcompile.quantize.data import ImagePreprocess, as_batches
    from qcompile.target import as_target

    say = progress or (lambda _m: None)
    config = config or Int8Config()
    if not isinstance(config, Int8Config):
        raise ConfigError(f"an accuracy budget applies to static int8 (Int8Config), but got {type(config).__name__}")
    if not isinstance(budget, AccuracyBudget):
        raise ConfigError(f"budget: expected an AccuracyBudget, but got {type(budget).__name__}")
    spec = as_target(target)
    if rpc is None and (spec.is_gpu or spec.needs_cross_compile()):
        raise ConfigError(f"without RPC an accuracy budget times and evaluates every candidate on this machine's "
                          f"CPU; target {spec.name} does not run here: search on the device (--rpc HOST:PORT or "
                          "--rpc-tracker HOST:PORT --rpc-key KEY), or with --target native")
    session = None
    if rpc is not None:
        from qcompile.runtime.rpc import connect

        session = connect(rpc)  # fails now with a clear message, not after the first builds
    if not hasattr(model, "mod"):
        say(f"importing {model} ...")
        model = import_model(model)
    pre = preprocess or ImagePreprocess()
    calib = list(itertools.islice(as_batches(calibration_data, model.inputs, pre), config.num_samples))
    data = eval_data if isinstance(eval_data, EvalData) else load_eval_data(eval_data, model.inputs, labels, pre, limit)
    if budget.needs_labels and data.labels is None:
        raise ConfigError(f"a top-1 budget needs labels: {data.source} has none; add 'labels' to the .npz, give "
                          "--labels, or budget agreement/cosine/sqnr with the float model (--accuracy-metric)")
    feeds = next(iter(data.iter_batches()))
    work = Path(tempfile.mkdtemp(prefix=".budget-", dir=_made(Path(out_dir))))
    search = None
    try:
        search = _Search(model, spec, calib, config, data, budget, feeds, work, repeat, rounds, tuning_logs, say,
                         prepare, prune, rpc, session)
        result = search.run()
        if name is None:
            name = model.source.name if result.chosen == "float" else f"{model.source.name}-int8"
        return _publish(result, Path(out_dir), name, say)
    finally:
        search = session = None
        gc.collect()  # remote models sit in reference cycles: free them, and close the session, now
        shutil.rmtree(work, ignore_errors=True)


class _Search:
    """The builds, evaluations and timings of one :func:`fit_budget`, here or on ``rpc``'s
    device (each build its own file: a library path loaded once stays loaded in the process)."""

    def __init__(self, model, spec, calib, config, data, budget, feeds, work, repeat, rounds, tuning_logs, say,
                 prepare, prune, rpc: RpcEndpoint | None = None, session=None) -> None:
        self.model, self.spec, self.calib, self.config, self.data = model, spec, calib, config, data
        self.budget, self.feeds, self.work, self.repeat, self.rounds = budget, feeds, work, repeat, rounds
        self.tuning_logs, self.say, self.prepare = tuning_logs, say, prepare
        self.count = 0
        self.prune_steps = prune
        self.float_top1: float | None = None
        self.notes: list[str] = []
        self.rpc, self.session = rpc, session
        self.remote_models: dict[Path, Any] = {}
        self.device = _device_name(rpc)
        self.on_device: _DeviceEval | None = None  # the float build's outputs there, with rpc

    def build(self, keep: tuple[str, ...] | None):
        """The model with ``keep`` float (None: not quantized at all), built under a new name."""
        from qcompile.build import build

        self.count += 1
        quantization = None if keep is None else replace(self.config, keep_float=tuple(keep))
        prepared = self.prepare(self.model, self.spec, quantization=quantization,
                                calibration_data=None if keep is None else self.calib)
        return build(prepared, self.spec, self.work, name=f"candidate-{self.count}", tuning_logs=self.tuning_logs)

    def load(self, library: Path):
        """``library`` loaded here, or on the device in the search's session: there once per
        library, kept until the search ends (uploading a loaded library again would overwrite
        the file the device has mapped)."""
        from qcompile.runtime import CompiledModel

        if self.rpc is None:
            return CompiledModel.load(library)
        if library not in self.remote_models:
            self.remote_models[library] = CompiledModel.load(library, rpc=self.rpc, session=self.session)
        return self.remote_models[library]

    def evaluate(self, artifact) -> float:
        from qcompile.accuracy.evaluate import evaluate

        if self.on_device is not None:
            result = self.on_device.evaluate(artifact.library)
        else:
            result = evaluate(artifact.library, self.data, reference=self.float_artifact.library)
        return self.budget.value(result, self.float_top1)

    def latency(self, *artifacts, rounds: int | None = None) -> list[float]:
        """Latency (ms) of each: benchmarked in turn ``rounds`` times (so that a busy machine
        slows them alike), the fastest of the rounds' medians (load on the machine only ever
        adds time).  Over RPC, TVM's time evaluator times them on the device."""
        models = [self.load(a.library) for a in artifacts]
        times: list[list[float]] = [[] for _ in models]
        for _ in range(rounds or self.rounds):
            for k, m in enumerate(models):
                times[k].append(statistics.median(m.benchmark(self.feeds, repeat=self.repeat).times_ms))
        return [min(t) for t in times]

    def run(self) -> BudgetResult:
        from qcompile.accuracy.evaluate import evaluate

        say, budget = self.say, self.budget
        say("budget: building the float and the all-int8 model ...")
        self.float_artifact = self.build(None)
        if self.rpc is not None:
            say(f"budget: recording the float build's outputs on {self.device} ...")
            self.on_device = _DeviceEval(self.float_artifact.library, self.data, self.load, self.device)
            reference = self.on_device.evaluate(self.float_artifact.library)
        else:
            reference = evaluate(self.float_artifact.library, self.data, reference=self.float_artifact.library)
        self.float_top1 = reference.top1
        float_value = budget.value(reference, self.float_top1)
        int8 = self.build(tuple(self.config.keep_float))
        int8_value = self.evaluate(int8)
        float_ms, int8_ms = self.latency(self.float_artifact, int8)
        say(f"budget {budget.describe()} on {self.device}: float {float_value:.4g} ({float_ms:.4f} ms), "
            f"int8 {int8_value:.4g} ({int8_ms:.4f} ms)")
        kept = tuple(int8.manifest.quantization.get("float_layers", []))
        start = BudgetStep(kept, None, int8_value, int8_ms, budget.holds(int8_value), "all layers int8")
        common = {"budget": budget, "float_value": float_value, "float_latency_ms": float_ms,
                  "int8_value": int8_value, "int8_latency_ms": int8_ms, "timed_on": self.device,
                  "evaluated_on": self.device}
        if start.holds:
            return self._winner(BudgetResult(artifact=int8, chosen="int8", float_layers=kept, value=int8_value,
                                             latency_ms=int8_ms, steps=(start,), **common))
        layers = self.layer_costs(int8, kept)
        steps = [start]
        floated = list(kept)
        for layer, why in _order(layers):
            floated.append(layer.name)
            candidate = self.build(tuple(floated))
            value = self.evaluate(candidate)
            (ms,) = self.latency(candidate)
            step = BudgetStep(tuple(floated), layer.name, value, ms, budget.holds(value), why)
            steps.append(step)
            say(f"budget step {len(steps) - 1}: {layer.name} float ({why}): {value:.4g}, {ms:.4f} ms"
                f"{' -- holds' if step.holds else ''}")
            if step.holds:
                best = self.prune(step, candidate, layers, kept, steps) if self.prune_steps else (step, candidate)
                return self._winner(BudgetResult(artifact=best[1], chosen="mixed", float_layers=best[0].float_layers,
                                                 value=best[0].value, latency_ms=best[0].latency_ms,
                                                 layers=tuple(layers), steps=tuple(steps), **common))
        raise AccuracyBudgetError(
            f"no mix of int8 and float layers holds {budget.describe()}: with every quantizable layer float "
            f"({len(floated)}) the model reaches {steps[-1].value:.4g} ({budget.unit()}); relax the budget or "
            "build in float32 (without --quantize)")

    def prune(self, step: BudgetStep, artifact, layers: list[LayerCost], kept: tuple[str, ...],
              steps: list[BudgetStep]) -> tuple[BudgetStep, Any]:
        """Try each fallen-back layer int8 again, the costliest float first; keep it int8 where
        the budget still holds (a layer fallen back early may be needed no more).  Appends the
        trials to ``steps``; returns the holding step with the fewest float layers, and its build."""
        cost = {la.name: la.cost_ms for la in layers}
        fallen = [n for n in step.float_layers if n not in kept]
        if len(fallen) < 2:
            return step, artifact
        best = (step, artifact)
        for name in sorted(fallen, key=lambda n: -cost.get(n, 0.0)):
            trial = tuple(n for n in best[0].float_layers if n != name)
            candidate = self.build(trial)
            value = self.evaluate(candidate)
            (ms,) = self.latency(candidate)
            tried = BudgetStep(trial, None, value, ms, self.budget.holds(value),
                               f"int8 again (float costs {cost.get(name, 0.0):+.4f} ms)", removed=name)
            steps.append(tried)
            self.say(f"budget step {len(steps) - 1}: {name} int8 again: {value:.4g}, {ms:.4f} ms"
                     f"{' -- holds: stays int8' if tried.holds else ' -- misses: stays float'}")
            if tried.holds:
                best = (tried, candidate)
        return best

    def layer_costs(self, int8, kept: tuple[str, ...]) -> list[LayerCost]:
        """Each quantizable layer's sensitivity (only it int8) and float-minus-int8 kernel time
        (over RPC: float-minus-only-it-int8 model latency)."""
        from qcompile.quantize.op_tables import ANCHORS

        kinds = set(ANCHORS.values())
        names = [(la["name"], la["op"]) for la in int8.manifest.quantization.get("layers", [])
                 if la["op"] in kinds and la["name"] not in kept]
        if self.rpc is not None:
            return self.layer_costs_on_device(names, kept)
        int8_times, note_a = _kernel_times(int8.library, self.feeds)
        float_times, note_b = _kernel_times(self.float_artifact.library, self.feeds)
        self.notes += [n for n in (note_a, note_b) if n]
        macs = {la["name"]: la["macs"] for la in int8.manifest.build.get("macs", {}).get("layers", [])}
        total_macs = sum(macs.values()) or 1
        whole: list[float] = []
        out = []
        for k, (name, op) in enumerate(names):
            self.say(f"budget: sensitivity of {name} ({k + 1}/{len(names)}): only it int8 ...")
            only = self.build(tuple(n for n, _ in names if n != name) + kept)
            value = self.evaluate(only)
            a, b = int8_times.get(name), float_times.get(name)
            if a is not None and b is not None:
                cost = b - a
            else:  # kernels not matched to layers: the model's float-int8 difference by MAC share
                whole = whole or self.latency(self.float_artifact, int8)
                cost = (whole[0] - whole[1]) * macs.get(name, 0) / total_macs
            out.append(LayerCost(name, op, value, self.budget.loss(value), a, b, cost))
        if any(la.int8_ms is None or la.float_ms is None for la in out):
            self.notes.append("some layers' kernels were not matched: their cost is the float-int8 latency "
                              "difference shared by MACs")
        return out

    def layer_costs_on_device(self, names: list[tuple[str, str]], kept: tuple[str, ...]) -> list[LayerCost]:
        """Each layer's sensitivity, and as its cost the all-float model's latency minus the
        only-it-int8 model's, all timed on the device in turns (no kernel profiler there)."""
        only, values = [], []
        for k, (name, _) in enumerate(names):
            self.say(f"budget: sensitivity of {name} ({k + 1}/{len(names)}): only it int8 ...")
            only.append(self.build(tuple(n for n, _ in names if n != name) + kept))
            values.append(self.evaluate(only[-1]))
        self.say(f"budget: timing the all-float and {len(only)} only-one-layer-int8 models on {self.device} ...")
        float_ms, *only_ms = self.latency(self.float_artifact, *only)
        self.notes.append(f"layer costs: all-float minus only-this-layer-int8 model latency on {self.device} "
                          "(kernels cannot be profiled over RPC); a layer's cost includes its own quantize/"
                          "dequantize steps")
        return [LayerCost(name, op, value, self.budget.loss(value), ms, float_ms, float_ms - ms, timed="model")
                for (name, op), value, ms in zip(names, values, only_ms)]

    def _winner(self, result: BudgetResult) -> BudgetResult:
        """The result, or the float build where it is measured faster (re-timed side by side)."""
        mixed_ms, float_ms = self.latency(result.artifact, self.float_artifact, rounds=2 * self.rounds)
        result = replace(result, latency_ms=mixed_ms, float_latency_ms=float_ms)
        if float_ms <= mixed_ms:
            everything = tuple(dict.fromkeys((*result.float_layers, *(la.name for la in result.layers))))
            return replace(result, artifact=self.float_artifact, chosen="float", float_layers=everything,
                           value=result.float_value, latency_ms=float_ms,
                           notes=(*self.notes, (f"the {result.chosen} model within the budget ({mixed_ms:.4f} ms) is "
                                                f"not faster than the float build ({float_ms:.4f} ms): it wins")))
        return replace(result, notes=tuple(self.notes))


class _DeviceEval:
    """The budget's figures on an RPC device: the float build's outputs recorded there once
    (the reference), each candidate run there on the same batches and compared with them."""

    def __init__(self, float_library: Path, data, load: Callable[[Path], Any], device: str) -> None:
        self.data, self.load = data, load
        self.reference_name = f"{Path(float_library).name} on {device}"
        self.reference, self.batch = self._outputs(float_library)

    def _outputs(self, library: Path) -> tuple[list[dict[str, Any]], int]:
        """``library``'s outputs on the device, batch by batch, and its batch size."""
        model = self.load(library)
        batch = model.inputs[0].shape[0] if model.inputs and model.inputs[0].shape else 1
        return [model.run(feeds) for feeds in self.data.iter_batches()], batch

    def evaluate(self, library: Path):
        """An :class:`~qcompile.accuracy.evaluate.EvalResult` of ``library`` on the device
        against the float build's outputs (top-1 of the first output where there are labels)."""
        from qcompile.accuracy.evaluate import EvalResult
        from qcompile.accuracy.metrics import Agreement, TopK

        outputs, _ = self._outputs(library)
        names, labels, batch = list(self.reference[0]), self.data.labels, self.batch
        top, agreements = TopK(), {n: Agreement() for n in names}
        for k, (got, expected) in enumerate(zip(outputs, self.reference)):
            for n in names:
                agreements[n].update(got[n], expected[n])
            if labels is not None:
                top.update(got[names[0]], labels[k * batch:(k + 1) * batch])
        top1, top5 = top.result() if labels is not None else (None, None)
        return EvalResult(str(library), self.data.source, len(outputs) * batch, names[0], top1, top5,
                          self.reference_name, agreement={n: a.to_json() for n, a in agreements.items()})


def _device_name(rpc: RpcEndpoint | None) -> str:
    """``local``, or ``rpc HOST:PORT`` (with the tracker's key where it hands out the device)."""
    if rpc is None:
        return "local"
    host, port = rpc.address
    return f"rpc {host}:{port}" + (f" (tracker, key {rpc.key!r})" if rpc.key else "")


def _order(layers: list[LayerCost]) -> list[tuple[LayerCost, str]]:
    """The fallback order: layers whose float kernel costs nothing more and that lose accuracy
    int8 first (most loss first), then loss per ms of cost, then layers that lose nothing
    measurable, cheapest first; each with why."""
    free = sorted((la for la in layers if la.loss > 0 and la.cost_ms <= 0), key=lambda la: -la.loss)
    paid = sorted((la for la in layers if la.loss > 0 and la.cost_ms > 0), key=lambda la: -la.loss / la.cost_ms)
    rest = sorted((la for la in layers if la.loss <= 0), key=lambda la: la.cost_ms)
    out = [(la, f"loss {la.loss:.4g} int8, float no slower ({la.cost_ms:+.4f} ms)") for la in free]
    out += [(la, f"loss {la.loss:.4g} int8 for {la.cost_ms:.4f} ms: {la.loss / la.cost_ms:.4g}/ms") for la in paid]
    out += [(la, f"no measured loss alone; {la.cost_ms:+.4f} ms") for la in rest]
    return out


def _kernel_times(library: Path, feeds) -> tuple[dict[str, float], str | None]:
    """{layer name: ms} of the conv/matmul kernels of ``library`` (median over 50 profiled runs)."""
    from qcompile.runtime import CompiledModel
    from qcompile.runtime.explain import _macs_of, match_layers, profile_calls

    model = CompiledModel.load(library)
    calls, note = match_layers(profile_calls(model, feeds, runs=50), _macs_of(model.manifest))
    return {c.layer.name: c.ms for c in calls if c.layer is not None}, note


def _publish(result: BudgetResult, out_dir: Path, name: str, say: Progress) -> BudgetResult:
    """Copy the winner to ``out_dir/NAME.so`` with its manifest, the search recorded in it."""
    from qcompile.build import Artifact
    from qcompile.manifest import manifest_path

    library = out_dir / f"{name}.so"
    shutil.copyfile(result.artifact.library, library)
    manifest = result.artifact.manifest
    record = {k: v for k, v in result.to_json().items() if k != "notes"}
    manifest = replace(manifest, library={**manifest.library, "file": library.name},
                       quantization={**manifest.quantization, "budget": record})
    manifest.write(manifest_path(library))
    say(f"wrote {library} ({result.chosen}: {', '.join(result.float_layers) or 'no layer'} float)")
    return replace(result, artifact=Artifact(library=library, manifest=manifest))


def _made(folder: Path) -> Path:
    from qcompile.build import check_writable

    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _num(v: float) -> float | str:
    return round(v, 6) if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 5)


def _signed(v: float) -> str:
    return f"{v:+.4g}" if math.isfinite(v) else ("+inf" if v > 0 else "-inf")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
