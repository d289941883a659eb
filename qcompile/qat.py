"""Quantization-aware training (QAT) in PyTorch, for a model qcompile then builds.

The model is fine-tuned with PT2E fake quantization (torchao's ``prepare_qat_pt2e``) whose
quantization matches what :mod:`qcompile.quantize.realize` executes, converted
(``convert_pt2e``) and saved as a ``.pt2``; ``qcompile build model.pt2`` realizes its
quantize/dequantize pairs as integer kernels without calibration::

    import qcompile.qat

    prepared = qcompile.qat.prepare(net, (torch.zeros(1, 1, 8, 8),), per_channel=True)
    ...  # the usual training loop on `prepared`, a few epochs at a small learning rate
    qcompile.qat.save(qcompile.qat.convert(prepared), "model-qat.pt2")

What the fake quantization simulates (:func:`quantization_config`):

* activations: uint8, asymmetric, one scale and zero point per tensor, [0, 255] (with
  ``symmetric_activations``: int8, zero point 0, [-128, 127]); ranges from a moving average
  of each batch's min/max;
* weights: int8, symmetric (zero point 0), [-127, 127] as qcompile's own PTQ
  (``Int8Config.weight_qmax``), one scale per output channel or, with
  ``per_channel=False``, per layer;
* biases: float; qcompile quantizes each to int32 at ``input_scale * weight_scale``;
* rounding: half to even, in the fake quantization and in qcompile's requantize.

The annotation rules (which ops are quantized, conv-BN-ReLU fusion) are torchao's
``X86InductorQuantizer``'s, with these specs in place of its default, whose weights use
[-128, 127] (scale ``max|w| / 127.5``) and which has no per-tensor weights for QAT.

torch and torchao are imported when a function here is called, not with ``qcompile``.
"""
from __future__ import annotations

import copy
from pathlib import Path

from qcompile.errors import ConfigError, MissingDependencyError

__all__ = ["convert", "prepare", "quantization_config", "quantizer", "save"]

WEIGHT_QMAX = 127  # Int8Config().weight_qmax: symmetric int8 weights in [-127, 127]
_EXAMPLES = "qcompile_qat_example_inputs"  # prepared.meta key: the inputs convert re-exports with


def _torchao():
    try:
        import torch
        from torchao.quantization import pt2e
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as exc:
        raise MissingDependencyError(
            "quantization-aware training needs torch and torchao: pip install 'qcompile[torch]' torchao") from exc
    return torch, pt2e, quantize_pt2e, x86_inductor_quantizer


def quantization_config(per_channel: bool = True, symmetric_activations: bool = False):
    """torchao ``QuantizationConfig`` for QAT with the quantization qcompile realizes.

    per_channel: one weight scale per output channel (qcompile's ``PerChannel()``), else one
      per layer (``PerTensor()``).
    symmetric_activations: int8 activations with zero point 0 (``activation_symmetric=True``)
      instead of uint8 with a zero point.
    """
    for name, value in (("per_channel", per_channel), ("symmetric_activations", symmetric_activations)):
        if not isinstance(value, bool):
            raise ConfigError(f"qcompile.qat: {name}: expected True or False, but got {value!r}")
    torch, pt2e, _, _ = _torchao()
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    eps = {"eps": 2**-12}  # the smallest scale, as X86InductorQuantizer's
    if symmetric_activations:
        act_range, act_dtype, act_scheme = (-128, 127), torch.int8, torch.per_tensor_symmetric
    else:
        act_range, act_dtype, act_scheme = (0, 255), torch.uint8, torch.per_tensor_affine
    activation = QuantizationSpec(
        dtype=act_dtype, quant_min=act_range[0], quant_max=act_range[1], qscheme=act_scheme, is_dynamic=False,
        observer_or_fake_quant_ctr=pt2e.FusedMovingAvgObsFakeQuantize.with_args(
            observer=pt2e.MovingAverageMinMaxObserver, **eps))
    if per_channel:
        scheme, observer = torch.per_channel_symmetric, pt2e.MovingAveragePerChannelMinMaxObserver
    else:
        scheme, observer = torch.per_tensor_symmetric, pt2e.MovingAverageMinMaxObserver
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-WEIGHT_QMAX, quant_max=WEIGHT_QMAX, qscheme=scheme,
        ch_axis=0 if per_channel else None,  # conv (O, I, kh, kw) and linear (O, I): output channels
        is_dynamic=False,
        observer_or_fake_quant_ctr=pt2e.FusedMovingAvgObsFakeQuantize.with_args(observer=observer, **eps))
    return QuantizationConfig(activation, activation, weight, None, is_qat=True)


def quantizer(per_channel: bool = True, symmetric_activations: bool = False):
    """torchao ``X86InductorQuantizer`` set to :func:`quantization_config` for the whole model."""
    _, _, _, x86 = _torchao()
    return x86.X86InductorQuantizer().set_global(quantization_config(per_channel, symmetric_activations))


def prepare(model, example_inputs: tuple, per_channel: bool = True, symmetric_activations: bool = False,
            strict: bool = True):
    """Export ``model`` (``torch.export``) and insert fake quantization for training.

    example_inputs: a tuple of tensors at the shapes the built model takes (batch 1, say);
      the first axis of every input is exported dynamic, so training may use any batch size.
    strict: ``torch.export``'s strict mode (needed where one module, a ReLU say, is called
      at several places).
    Returns a ``torch.fx.GraphModule`` in training mode, with its own copy of the
    parameters: train it as the float model, then :func:`convert` it.
    """
    torch, pt2e, quantize_pt2e, _ = _torchao()
    if not isinstance(example_inputs, tuple) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise ConfigError(f"qcompile.qat.prepare: example_inputs: expected a tuple of tensors, "
                          f"but got {type(example_inputs).__name__}")
    model = copy.deepcopy(model).train()  # the caller's model stays as it is
    batch = torch.export.Dim("batch", min=1)
    doubled = tuple(torch.cat([x, x]) for x in example_inputs)  # a batch of 1 would be specialized to 1
    dynamic = tuple({0: batch} for _ in example_inputs)
    graph = torch.export.export(model, doubled, dynamic_shapes=dynamic, strict=strict).module()
    prepared = quantize_pt2e.prepare_qat_pt2e(graph, quantizer(per_channel, symmetric_activations))
    prepared.meta[_EXAMPLES] = tuple(x.detach().clone() for x in example_inputs)
    return pt2e.move_exported_model_to_train(prepared)


def convert(prepared, example_inputs: tuple | None = None):
    """The trained ``prepared`` module as a quantized ``torch.export.ExportedProgram``:
    evaluation mode (batch norm's running statistics, folded into the convs), the fake
    quantization turned into quantize/dequantize ops with int8 weight constants, exported
    at the shapes of ``example_inputs`` (default: those given to :func:`prepare`)."""
    torch, pt2e, quantize_pt2e, _ = _torchao()
    examples = example_inputs if example_inputs is not None else prepared.meta.get(_EXAMPLES)
    if examples is None:
        raise ConfigError("qcompile.qat.convert: give example_inputs (the module was not made by qcompile.qat.prepare)")
    pt2e.move_exported_model_to_eval(prepared)
    converted = quantize_pt2e.convert_pt2e(prepared)
    return torch.export.export(converted, tuple(examples))


def save(program, path: str | Path) -> Path:
    """Write ``program`` (from :func:`convert`) as a ``.pt2`` that ``qcompile build`` takes.

    A program from :func:`convert` holds tensors only (no custom objects), so its archive
    pickles nothing beyond tensors and qcompile loads it without ``--trust-pt2``."""
    torch, _, _, _ = _torchao()
    path = Path(path)
    if path.suffix != ".pt2":
        raise ConfigError(f"qcompile.qat.save: path: expected a .pt2 file name, but got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path
