"""The quantization stage's steps over a whole model: QDQ form after calibration, then
realize (integer kernels), for a float model or a pre-quantized import."""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import tvm

from qcompile.build.pipeline import phases_through, run_phases
from qcompile.errors import ConfigError
from qcompile.model import ImportedModel
from qcompile.passes.bindings import readable
from qcompile.quantize.canonicalize import canonicalize_qdq
from qcompile.quantize.config import (
    DynamicInt8Config,
    Int4WeightConfig,
    Int8Config,
    QuantizationInfo,
)
from qcompile.quantize.embedding import quantize_embeddings
from qcompile.quantize.op_tables import ANCHORS
from qcompile.quantize.ptq import annotate, calibrate, emit_qdq
from qcompile.quantize.realize import realize


def to_qdq(
    model: ImportedModel,
    batches: Iterable[dict[str, np.ndarray]],
    config: Int8Config,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
):
    """The float model in QDQ form after calibration: (module, plan, qparams)."""
    mod, batches, _ = prepare_float(model, batches, config, target, progress)
    return _calibrated_qdq(mod, batches, config, target, progress)


def prepare_float(
    model: ImportedModel,
    batches: Iterable[dict[str, np.ndarray]],
    config: Int8Config,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
) -> tuple[tvm.IRModule, Iterable[dict[str, np.ndarray]], dict[str, list[str]]]:
    """The float module PTQ calibrates: after the ``inference`` phase (batch norm folded into
    the convs), then cross-layer equalization with high-bias absorption and bias correction
    where ``config`` asks for them (:attr:`Int8Config.equalizes`, :attr:`~Int8Config.corrects_bias`).
    Returns the module, the batches (read into a list when those steps read them too) and
    what the steps changed (:attr:`QuantizationInfo.corrections`)."""
    say = progress or (lambda _m: None)
    mod = run_phases(model.mod, target, phases=phases_through("inference"))  # fold batch-norm before calibrating
    corrections: dict[str, list[str]] = {}
    if not (config.equalizes or config.corrects_bias):
        return mod, batches, corrections
    batches = list(itertools.islice(batches, config.num_samples))
    if config.equalizes:
        from qcompile.quantize.equalize import absorb_high_bias, equalize

        equalized = equalize(mod)
        mod = equalized.mod
        mod, absorbed = absorb_high_bias(mod, batches, target, equalized.pairs)
        corrections.update(equalized=list(equalized.pairs), high_bias_absorbed=list(absorbed))
        if equalized.skipped:
            corrections["equalize_skipped"] = list(equalized.skipped)
        say(f"equalized {len(equalized.pairs)} conv pairs ({len(absorbed)} with high-bias absorption)")
    if config.corrects_bias:
        from qcompile.quantize.bias_correction import correct_bias

        mod, corrected = correct_bias(mod, batches, config, target)
        corrections["bias_corrected"] = list(corrected)
        say(f"corrected the biases of {len(corrected)} layers for their weights' quantization")
    return mod, batches, corrections


def _calibrated_qdq(mod, batches, config, target, progress):
    """(QDQ module, plan, qparams) of the float module ``mod`` calibrated on ``batches``."""
    plan = annotate(mod["main"], config)
    ranges = calibrate(mod, plan, batches, config, target, progress)
    main, qparams, _ = emit_qdq(mod["main"], plan, ranges, config)
    from qcompile.passes.bindings import with_main

    return with_main(mod, main), plan, qparams


def quantize_model(
    model: ImportedModel,
    batches: Iterable[dict[str, np.ndarray]],
    config: Int8Config,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
) -> ImportedModel:
    """Calibrate, emit QDQ and realize: the integer model, carrying its :class:`QuantizationInfo`.

    ``target`` is the build's: it decides ``reduce_range`` where the config leaves it open.
    Calibration runs the float model here, compiled for this machine (a cross-compiled or GPU
    target cannot run here, and an x86 target with features this CPU lacks would fault)."""
    from qcompile.target import resolve_target

    if model.is_quantized:
        raise ConfigError(f"model {model.source.name} is already quantized ({model.quantization.source}); "
                          "quantize the float model")
    say = progress or (lambda _m: None)
    config = config.for_target(target)
    with readable(model.source.name):
        host = resolve_target("native").to_tvm()
        mod, batches, corrections = prepare_float(model, batches, config, host, progress)
        qdq_mod, plan, _ = _calibrated_qdq(mod, batches, config, host, progress)
        say(f"realizing {len(plan.regions)} quantized layers ...")
        int_mod, report = realize(qdq_mod)
        int_mod, tables = _int8_embeddings(int_mod, say)
    info = QuantizationInfo(
        source="qcompile-ptq",
        config=config,
        activation_dtype=config.activation_dtype,
        weight_range=(-config.weight_qmax, config.weight_qmax),
        layers=_with_ptq_names(report.layers, plan.regions),
        float_layers=tuple(plan.kept_float),
        float_ops=dict(plan.skipped),
        embeddings=tables,
        corrections=corrections,
    )
    return replace(model, mod=int_mod, quantization=info)


def _with_ptq_names(layers: list[dict], regions) -> tuple[dict, ...]:
    """Realize's report entries under PTQ's layer names (the names ``keep_float`` and
    ``qcompile info --layers`` use): realize numbers only the layers it made integer, so
    with a layer kept float its ``conv2d_2`` would be PTQ's ``conv2d_3``.  Both list the
    layers in program order; where the two lists do not pair up op by op, realize's names
    stay.  (Integer adds, pools and concats keep realize's names: PTQ does not name them.)"""
    kinds = set(ANCHORS.values())
    anchors = [layer for layer in layers if layer["op"] in kinds]
    if len(anchors) != len(regions) or any(a["op"] != r.kind for a, r in zip(anchors, regions)):
        return tuple(layers)
    names = iter(region.name for region in regions)
    return tuple({**layer, "name": next(names)} if layer["op"] in kinds else layer for layer in layers)


def quantize_dynamic_model(
    model: ImportedModel,
    config: DynamicInt8Config,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
) -> ImportedModel:
    """:func:`qcompile.quantize.dynamic.quantize_dynamic`, then int8 embedding tables as
    for static int8 (:mod:`qcompile.quantize.embedding`)."""
    from qcompile.quantize.dynamic import quantize_dynamic

    quantized = quantize_dynamic(model, config, target, progress)
    with readable(model.source.name):
        mod, tables = _int8_embeddings(quantized.mod, progress or (lambda _m: None))
    return replace(quantized, mod=mod, quantization=replace(quantized.quantization, embeddings=tables))


def quantize_int4_weights(
    model: ImportedModel,
    config: Int4WeightConfig,
    target: tvm.target.Target,
    progress: Callable[[str], None] | None = None,
) -> ImportedModel:
    """:func:`qcompile.quantize.int4.quantize_int4_model` (int4 dense-layer weights, float
    activations), then int8 embedding tables as for int8 (:mod:`qcompile.quantize.embedding`)."""
    from qcompile.quantize.int4 import quantize_int4_model

    quantized = quantize_int4_model(model, config, target, progress)
    with readable(model.source.name):
        mod, tables = _int8_embeddings(quantized.mod, progress or (lambda _m: None))
    return replace(quantized, mod=mod, quantization=replace(quantized.quantization, embeddings=tables))


def _int8_embeddings(mod: tvm.IRModule, say: Callable[[str], None]) -> tuple[tvm.IRModule, tuple[dict, ...]]:
    """``mod`` with its embedding tables stored as int8 (:func:`quantize_embeddings`), and
    what was converted (for the manifest)."""
    mod, tables = quantize_embeddings(mod)
    for table in tables:
        say(f"embedding {table['name']} {table['table']}: int8 rows, per-row scales "
            f"({table['bytes'] / 1e6:.2f} MB -> {table['quantized_bytes'] / 1e6:.2f} MB)")
    return mod, tuple(tables)


def realize_prequantized(model: ImportedModel, source: str) -> ImportedModel:
    """Integer kernels for a model imported in QDQ form (ONNX QDQ/QOperator, PT2E)."""
    with readable(model.source.name):
        mod = canonicalize_qdq(model.mod)
        int_mod, report = realize(mod)
    float_anchors = _float_anchors(int_mod)
    activations = sorted({layer["dtype"].split()[0] for layer in report.layers if layer["op"] in ANCHORS.values()})
    info = QuantizationInfo(
        source=source,
        activation_dtype="/".join(activations) or None,
        layers=tuple(report.layers),
        float_ops=dict(Counter(op for _, op in float_anchors)),
        float_nodes=tuple(f"{name} = {op}" for name, op in float_anchors),
    )
    return replace(model, mod=int_mod, quantization=info)



def _float_anchors(mod) -> list[tuple[str, str]]:
    """(var name, op) of conv/matmul layers still on float inputs: layers realize could not match."""
    from qcompile.passes.bindings import Graph, dtype_of, op_name

    return [(var.name, op_name(value)) for var, value in Graph.from_main(mod["main"]).bindings
            if op_name(value) in ANCHORS and dtype_of(value.args[0]) == "float32"]

