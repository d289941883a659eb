"""Multiply-accumulates of a model: its convolutions and matrix products, per layer and dtype.

Counted on the Relax module a build compiles (float, or after quantization with the integer
layers' uint8/int8 inputs), from the static shapes: a convolution does ``out elements x
(weight elements / output channels)`` MACs (``in elements x (weight elements / input channels)``
for a transposed one), a matmul ``out elements x K``.  Layers are named as PTQ names them
(``conv2d_N``, ``matmul_N``: per kind, in program order), dtypes are the data input's
(``int8`` for uint8 and int8).  The build writes the count into the manifest (``build.macs``),
where ``qcompile explain`` reads it; ``MACs / latency / peak`` is the share of the measured
peak a model reaches (:mod:`qcompile.runtime.peak`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# op -> (layer kind as PTQ names it, transposed convolution)
CONV_OPS = {"relax.nn.conv1d": ("conv1d", False), "relax.nn.conv2d": ("conv2d", False),
            "relax.nn.conv3d": ("conv3d", False), "relax.nn.conv1d_transpose": ("conv1d_transpose", True),
            "relax.nn.conv2d_transpose": ("conv2d_transpose", True)}
MATMUL_OP = "relax.matmul"


@dataclass(frozen=True)
class LayerMacs:
    """One conv/matmul: its name, op kind, data dtype (``float32``, ``int8``, ...) and MACs;
    ``groups`` and ``group_channels`` (input channels per group) of a convolution (depthwise:
    one channel per group), ``constant_weight`` False for a product of two activations."""

    name: str
    op: str
    dtype: str
    macs: int
    groups: int = 1
    group_channels: int = 0
    constant_weight: bool = True

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.group_channels == 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "dtype": self.dtype, "macs": self.macs, "groups": self.groups,
                "group_channels": self.group_channels, "constant_weight": self.constant_weight}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LayerMacs:
        return cls(str(obj["name"]), str(obj["op"]), str(obj["dtype"]), int(obj["macs"]), int(obj.get("groups", 1)),
                   int(obj.get("group_channels", 0)), bool(obj.get("constant_weight", True)))


@dataclass(frozen=True)
class MacCount:
    """The MACs of a module's layers; ``unknown`` counts layers with a symbolic shape."""

    layers: tuple[LayerMacs, ...]
    unknown: int = 0

    @property
    def total(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.dtype] = out.get(layer.dtype, 0) + layer.macs
        return out

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "by_dtype": self.by_dtype, "unknown_layers": self.unknown,
                "layers": [layer.to_json() for layer in self.layers]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MacCount:
        return cls(tuple(LayerMacs.from_json(e) for e in obj.get("layers", [])), int(obj.get("unknown_layers", 0)))


def _static_shape(expr) -> tuple[int, ...] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    try:
        return tuple(int(d) for d in values)
    except (TypeError, ValueError):  # a symbolic dimension
        return None


def _dtype(expr) -> str:
    dtype = str(getattr(getattr(expr, "ty", None), "dtype", ""))
    return "int8" if dtype in ("int8", "uint8") else dtype


# Ops through which a weight stays a constant (a linear layer's transposed weight).
_WEIGHT_VIEWS = frozenset({"relax.permute_dims", "relax.reshape", "relax.astype", "relax.expand_dims"})


def _is_constant(expr, producers: dict) -> bool:
    """A Relax constant, or a var bound to one behind transposes/reshapes/casts."""
    import tvm

    for _ in range(8):
        if isinstance(getattr(expr, "value", None), tvm.runtime.Tensor):
            return True
        value = producers.get(expr)
        if value is None or getattr(getattr(value, "op", None), "name", None) not in _WEIGHT_VIEWS:
            return False
        expr = value.args[0]
    return False


def call_macs(call, name: str = "", producers: dict | None = None) -> LayerMacs | None:
    """The MACs of one Relax call to a conv/matmul op, as layer ``name`` (MACs -1 when a shape
    is symbolic); None for any other call.  ``producers`` (var -> bound value) lets a weight
    behind a transpose count as constant."""
    op = getattr(getattr(call, "op", None), "name", None)
    if op not in CONV_OPS and op != MATMUL_OP:
        return None
    data, weight = call.args[0], call.args[1]
    constant = _is_constant(weight, producers or {})
    if op == MATMUL_OP:
        a_shape, out_shape = _static_shape(data), _static_shape(call)
        macs = -1 if a_shape is None or out_shape is None else math.prod(out_shape) * a_shape[-1]
        return LayerMacs(name, "matmul", _dtype(data), macs, constant_weight=constant)
    kind, transposed = CONV_OPS[op]
    data_shape, weight_shape, out_shape = _static_shape(data), _static_shape(weight), _static_shape(call)
    groups = int(call.attrs.groups)
    if data_shape is None or weight_shape is None or out_shape is None:
        return LayerMacs(name, kind, _dtype(data), -1, groups, constant_weight=constant)
    layout = str(call.attrs.kernel_layout)
    channels = weight_shape[layout.index("I" if transposed else "O")]
    per_element = math.prod(weight_shape) // channels
    group_channels = weight_shape[layout.index("I")] if not transposed else weight_shape[layout.index("I")] // groups
    return LayerMacs(name, kind, _dtype(data), math.prod(data_shape if transposed else out_shape) * per_element,
                     groups, group_channels, constant)


def count_macs(mod, function: str = "main") -> MacCount:
    """The MACs of the conv/matmul calls in ``mod[function]`` (a Relax function), in program order."""
    from tvm import relax

    calls: list = []
    relax.analysis.post_order_visit(mod[function], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    producers: dict = {}
    body = mod[function].body
    for block in getattr(body, "blocks", []):
        for binding in block.bindings:
            producers[binding.var] = binding.value
    counters: dict[str, int] = {}
    layers, unknown = [], 0
    for call in calls:
        layer = call_macs(call, producers=producers)
        if layer is None:
            continue
        index = counters.get(layer.op, 0)
        counters[layer.op] = index + 1
        if layer.macs < 0:
            unknown += 1
            continue
        layers.append(dataclasses.replace(layer, name=f"{layer.op}_{index}"))
    return MacCount(tuple(layers), unknown)
