"""Per-layer quantization debugger: which layer loses accuracy, and why.

For every quantized layer (conv / linear / matmul region of :func:`qcompile.quantize.ptq.annotate`)
the float model and its QDQ form (what realize turns into integer kernels; the same scales and
roundings) run on the same samples, each returning the layer's input and output.  Per layer:

* ``sqnr_db`` / ``cosine``: the QDQ model's layer output against the float model's -- the
  error that reached this point, including what earlier layers passed on (ONNX Runtime's
  ``qdq_loss_debug`` "activation" figures);
* what the layer itself adds, each as a noise-to-signal ratio measured on the float tensors:
  its int8 weights (``weight_sqnr_db``), its input's and output's quantization, split into
  clipping (values beyond the calibrated range) and resolution (rounding to the scale);
  ``local_sqnr_db`` combines them;
* ``cause``: the largest contribution -- ``weights``, ``input range (clipping)``, ``input
  resolution``, ``output range (clipping)``, ``output resolution``, or ``accumulated`` when
  the error arriving at the input outweighs everything the layer adds.

The model is the one a build makes: cross-layer equalization and bias correction are applied
as :func:`qcompile.quantize.pipeline.prepare_float` applies them for ``config`` (on by default
for per-tensor weights), and the report says which were.

Layers come out worst ``local_sqnr_db`` first: a layer with a bad scale ranks first even
when the layers after it inherit its error.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qcompile.accuracy.metrics import Agreement
from qcompile.quantize.config import Int8Config

RangesHook = Callable[[Any, dict], dict]


@dataclass
class _Noise:
    """Signal and noise power summed over samples."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, signal: float, noise: float) -> None:
        self.signal += signal
        self.noise += noise

    @property
    def ratio(self) -> float:
        return self.noise / self.signal if self.signal else (0.0 if not self.noise else math.inf)


def _db(ratio: float) -> float:
    """Noise-to-signal ratio as SQNR in dB (inf for no noise)."""
    return math.inf if ratio <= 0 else -10.0 * math.log10(ratio)


@dataclass(frozen=True)
class TensorStats:
    """A quantized tensor: its float range seen on the data, the calibrated range, scale."""

    observed: tuple[float, float]
    calibrated: tuple[float, float]
    scale: float
    zero_point: int
    clipped: float  # share of values outside the calibrated range

    def to_json(self) -> dict[str, Any]:
        return {"observed": [round(v, 6) for v in self.observed], "calibrated": [round(v, 6) for v in self.calibrated],
                "scale": self.scale, "zero_point": self.zero_point, "clipped": round(self.clipped, 6)}


@dataclass(frozen=True)
class LayerError:
    """One layer's figures (see the module docstring)."""

    name: str
    kind: str
    sqnr_db: float
    cosine: float
    int8_sqnr_db: float
    input_sqnr_db: float
    local_sqnr_db: float
    weight_sqnr_db: float
    contributions_db: dict[str, float]
    cause: str
    input: TensorStats | None
    output: TensorStats | None

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | str:
            return round(v, 3) if math.isfinite(v) else ("inf" if v > 0 else "-inf")

        return {"name": self.name, "kind": self.kind, "sqnr_db": num(self.sqnr_db), "cosine": round(self.cosine, 6),
                "int8_sqnr_db": num(self.int8_sqnr_db),
                "input_sqnr_db": num(self.input_sqnr_db), "local_sqnr_db": num(self.local_sqnr_db),
                "weight_sqnr_db": num(self.weight_sqnr_db),
                "contributions_db": {k: num(v) for k, v in self.contributions_db.items()}, "cause": self.cause,
                "input": self.input.to_json() if self.input else None,
                "output": self.output.to_json() if self.output else None}


@dataclass(frozen=True)
class DebugReport:
    """Layers worst first, the model outputs' agreement (QDQ vs float), and the corrections
    applied before calibration, as :attr:`QuantizationInfo.corrections` lists them (``equalized``,
    ``high_bias_absorbed``, ``equalize_skipped``: conv pairs; ``bias_corrected``: layers)."""

    layers: list[LayerError]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    int8_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int = 0
    corrections: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "corrections": self.corrections, "outputs": self.outputs,
                "int8_outputs": self.int8_outputs, "layers": [la.to_json() for la in self.layers]}

    def describe_corrections(self) -> str:
        """One line: which PTQ corrections the measured model has."""
        c = self.corrections
        done = []
        if "equalized" in c:
            done.append(f"cross-layer equalization ({len(c['equalized'])} conv pairs, high-bias absorption in "
                        f"{len(c.get('high_bias_absorbed', []))})")
        if "bias_corrected" in c:
            done.append(f"bias correction ({len(c['bias_corrected'])} layers)")
        return "corrections applied: " + ("; ".join(done) or "none")

    def to_markdown(self, top: int | None = None) -> str:
        lines = [(f"{len(self.layers)} quantized layers on {self.samples} samples, worst first "
                 "(SQNR in dB: higher is better)"), self.describe_corrections(), "",
                 ("| layer | SQNR (QDQ) | cosine | SQNR (int8 kernels) | arriving at input | layer's own | weights "
                 "| cause |"), "|---|---|---|---|---|---|---|---|"]
        for la in self.layers[:top]:
            lines.append(f"| {la.name} | {la.sqnr_db:.1f} | {la.cosine:.5f} | {la.int8_sqnr_db:.1f} | "
                         f"{la.input_sqnr_db:.1f} | {la.local_sqnr_db:.1f} | {la.weight_sqnr_db:.1f} | {la.cause} |")
        return "\n".join(lines) + "\n"


def debug_layers(model, calibration_data, config: Int8Config | None = None, data=None, *,
                 target="native", limit: int = 16, preprocess=None,
                 ranges_hook: RangesHook | None = None) -> DebugReport:
    """Per-layer errors of ``model`` (a path or :class:`~qcompile.model.ImportedModel`) int8-quantized
    with ``config`` calibrated on ``calibration_data``, measured on ``data`` (default: the
    calibration samples), at most ``limit`` samples; ``preprocess`` for image folders
    (:class:`~qcompile.quantize.data.ImagePreprocess`).  ``ranges_hook(plan, ranges)`` may change
    the calibrated ranges before the QDQ model is written (to try a scale).

    The model is prepared as a build prepares it (:func:`qcompile.quantize.pipeline.prepare_float`:
    cross-layer equalization and bias correction where ``config`` asks for them; listed in
    :attr:`DebugReport.corrections`).  Each layer is compared with the same layer of the float
    model as equalized (equalization rescales channels between layers, so the imported model's
    tensors are not the equalized layers'), without bias correction (which is there to undo the
    int8 weights' mean shift: against its own float biases that would count as error); the
    model outputs are compared with the imported float model's, as ``qcompile eval`` compares
    the builds."""
    import tvm
    from tvm import relax

    from qcompile.api import import_model
    from qcompile.build.pipeline import compile_module
    from qcompile.passes.bindings import Graph, rebuild, with_main
    from qcompile.quantize.data import ImagePreprocess, as_batches
    from qcompile.quantize.pipeline import prepare_float
    from qcompile.quantize.ptq import annotate, calibrate, emit_qdq
    from qcompile.quantize.realize import realize
    from qcompile.target import resolve_target

    if not hasattr(model, "mod"):
        model = import_model(model)
    config = (config or Int8Config()).for_target(resolve_target(target).to_tvm())
    host = resolve_target("native").to_tvm()  # all models run here
    pre = preprocess or ImagePreprocess()
    mod, batches, corrections = prepare_float(model, as_batches(calibration_data, model.inputs, pre), config, host)
    imported = reference = mod  # the float model as imported; the one each layer is compared with
    if config.equalizes or config.corrects_bias:
        imported = prepare_float(model, batches, replace(config, equalize=False, bias_correction=False), host)[0]
    if config.corrects_bias:
        reference = (prepare_float(model, batches, replace(config, bias_correction=False), host)[0]
                     if config.equalizes else imported)
    func, ref_func = mod["main"], reference["main"]
    plan = annotate(func, config)
    ranges = calibrate(mod, plan, batches, config, host)
    if ranges_hook is not None:
        ranges = ranges_hook(plan, ranges)
    regions = list(plan.regions)
    ref_regions = {r.name: r for r in (plan if ref_func is func else annotate(ref_func, config)).regions}
    # each probed tensor as (var of the quantized model's function, var of the reference's)
    probes = [(r, (r.data, ref_regions[r.name].data), (r.out, ref_regions[r.name].out)) for r in regions]
    probed = list(dict.fromkeys(p for _, a, b in probes for p in (a, b)))
    # a model output is read from the outputs, not returned twice (the VM cannot bind one
    # var as both the result and a field of it)
    index, extra, n_out = [], [], 0
    for f, side in ((func, 0), (ref_func, 1)):
        graph = Graph.from_main(f)
        results = _output_vars(graph.output, dict(graph.bindings))
        n_out = n_out or len(results)
        watched = list(dict.fromkeys(p[side] for p in probed if p[side] not in results))
        extra.append(watched)
        index.append({p: results.index(p[side]) if p[side] in results else len(results) + watched.index(p[side])
                      for p in probed})
    qdq_main, qparams, wscales = emit_qdq(func, plan, ranges, config, extra_outputs=extra[0])
    float_main = rebuild(ref_func, lambda em, v, val: None, extra_outputs=extra[1])
    int8_mod, _ = realize(with_main(mod, qdq_main))  # the integer kernels, the same probes returned
    modules = [with_main(reference, float_main), with_main(mod, qdq_main), int8_mod]
    if imported is not reference:
        modules.append(imported)
    runs = [relax.VirtualMachine(compile_module(m, host), tvm.cpu()) for m in modules]
    params = [p.name for p in func.params]

    cumulative = {p: _Noise() for p in probed}
    cosines: dict = {p: [] for p in probed}
    seen_range = {p: [math.inf, -math.inf] for p in probed}
    quant = {p: {"clip": _Noise(), "round": _Noise(), "clipped": 0, "count": 0} for p in probed if p[0] in qparams}
    compiled = {p: _Noise() for p in probed}
    outputs = [Agreement() for _ in range(n_out)]
    int8_outputs = [Agreement() for _ in range(n_out)]
    source = data if data is not None else calibration_data
    samples = 0
    for batch in _take(as_batches(source, model.inputs, pre), limit):
        args = [tvm.runtime.tensor(np.ascontiguousarray(batch[n])) for n in params]
        fl, qd, i8, *rest = ([t.numpy() for t in _flat(run["main"](*args))] for run in runs)
        base = rest[0] if rest else fl
        for k in range(n_out):
            outputs[k].update(qd[k], base[k])
            int8_outputs[k].update(i8[k], base[k])
        for p in probed:
            f = fl[index[1][p]].astype(np.float64)
            q, i = qd[index[0][p]].astype(np.float64), i8[index[0][p]].astype(np.float64)
            cumulative[p].add(float(np.sum(f * f)), float(np.sum((q - f) ** 2)))
            compiled[p].add(float(np.sum(f * f)), float(np.sum((i - f) ** 2)))
            cosines[p].append(_cos(q, f))
            seen_range[p] = [min(seen_range[p][0], float(f.min())), max(seen_range[p][1], float(f.max()))]
            if p in quant:
                _quantization_noise(quant[p], f, qparams[p[0]])
        samples += 1
    names = [o.name for o in model.outputs] if len(model.outputs) == n_out else [f"output{k}" for k in range(n_out)]
    layers = []
    produced = {r.out for r in regions}  # a layer's output quantization is that layer's
    for r, x, y in probes:
        weight_ratio = _weight_noise(r, wscales, config) if r.weight is not None else 0.0
        parts = {"weights": weight_ratio}
        for label, p in (("input", x), ("output", y)):
            if p in quant and (label == "output" or p[0] not in produced):
                parts[f"{label} range (clipping)"] = quant[p]["clip"].ratio
                parts[f"{label} resolution"] = quant[p]["round"].ratio
        local = sum(parts.values())
        # what reached the input from earlier layers, without the input's own quantization
        own_input = parts.get("input range (clipping)", 0.0) + parts.get("input resolution", 0.0)
        inherited = max(0.0, cumulative[x].ratio - own_input)
        cause = max(parts, key=parts.get)
        if inherited > max(parts.values()):
            cause = "accumulated"
        layers.append(LayerError(
            r.name, r.kind, _db(cumulative[y].ratio), float(min(cosines[y])) if cosines[y] else 1.0,
            _db(compiled[y].ratio), _db(inherited), _db(local), _db(weight_ratio),
            {k: _db(v) for k, v in parts.items()}, cause,
            _stats(quant.get(x), seen_range[x], ranges.get(x[0]), qparams.get(x[0])),
            _stats(quant.get(y), seen_range[y], ranges.get(y[0]), qparams.get(y[0]))))
    layers.sort(key=lambda la: (la.local_sqnr_db, la.sqnr_db))
    return DebugReport(layers, {n: a.to_json() for n, a in zip(names, outputs)},
                       {n: a.to_json() for n, a in zip(names, int8_outputs)}, samples, corrections)


def _output_vars(expr, bound: dict) -> list:
    """The tensors a function returns, flattened in output order (a tuple's fields, also of
    a var bound to a tuple), as the VM's outputs come out."""
    from tvm import relax

    if isinstance(expr, relax.Var) and isinstance(bound.get(expr), relax.Tuple):
        expr = bound[expr]
    if isinstance(expr, relax.Tuple):
        return [v for f in expr.fields for v in _output_vars(f, bound)]
    return [expr]


def _take(batches: Iterable, limit: int):
    for k, batch in enumerate(batches):
        if k >= limit:
            return
        yield batch


def _flat(result) -> list:
    import tvm

    if isinstance(result, tvm.runtime.Tensor):
        return [result]
    out = []
    for item in result:
        out += _flat(item)
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def _quantization_noise(acc: dict, x: np.ndarray, params) -> None:
    """Clipping and rounding noise of quantizing the float tensor ``x`` with ``params``."""
    lo_q, hi_q = (0, 255) if params.dtype == "uint8" else (-128, 127)
    lo, hi = (lo_q - params.zero_point) * params.scale, (hi_q - params.zero_point) * params.scale
    clipped = np.clip(x, lo, hi)
    rounded = (np.clip(np.round(x / params.scale) + params.zero_point, lo_q, hi_q) - params.zero_point) * params.scale
    signal = float(np.sum(x * x))
    acc["clip"].add(signal, float(np.sum((clipped - x) ** 2)))
    acc["round"].add(signal, float(np.sum((rounded - clipped) ** 2)))
    acc["clipped"] += int(np.sum((x < lo) | (x > hi)))
    acc["count"] += x.size


def _weight_noise(region, wscales: dict, config: Int8Config) -> float:
    """Noise-to-signal power of the layer's int8 weights."""
    from qcompile.quantize.op_tables import CONV_LAYOUTS

    w = region.weight.astype(np.float64)
    axis = CONV_LAYOUTS[region.kind][2] if region.kind in CONV_LAYOUTS else 1
    scale = wscales[region.name].astype(np.float64)
    shape = [1] * w.ndim
    shape[axis] = -1
    s = scale.reshape(shape)
    wq = np.clip(np.round(w / s), -config.weight_qmax, config.weight_qmax) * s
    power = float(np.sum(w * w))
    return float(np.sum((wq - w) ** 2)) / power if power else 0.0


def _stats(acc: dict | None, seen: list[float], calibrated, params) -> TensorStats | None:
    if acc is None or params is None:
        return None
    lo_q, hi_q = (0, 255) if params.dtype == "uint8" else (-128, 127)
    covered = ((lo_q - params.zero_point) * params.scale, (hi_q - params.zero_point) * params.scale)
    return TensorStats((seen[0], seen[1]), tuple(calibrated) if calibrated else covered, params.scale,
                       params.zero_point, acc["clipped"] / max(acc["count"], 1))
