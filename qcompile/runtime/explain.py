"""Why an int8 build is not faster: where its time goes, and why, in order of cost.

:func:`explain` times every kernel call of the int8 library (the VM's instrument hook, as
:mod:`qcompile.runtime.profile` does, but call by call), matches the conv/matmul kernel calls
to the model's layers (the manifest's ``build.macs``: layers in program order, which the
kernels run in), and sorts what it finds by time:

* **float fallbacks**: conv/matmul layers that run in float32 (kept float with
  ``keep_float``, left float by a pre-quantized model, or with no int8 form), with the float
  build's time for the same layer when one is given;
* **generic kernels**: layers on TVM's default-schedule conv/matmul instead of qcompile's
  packed kernels (the name has no ``qc_``), and why: a grouped conv, a product of two
  activations, a convolution other than conv2d, no int8 dot-product instruction on the target
  (no VNNI/AVX2/dotprod), 8-bit weights whose pairs would saturate AVX2's ``vpmaddubsw``;
* **quantize/dequantize boundaries** that remain (kernels that only convert);
* the int8 layers on qcompile's dot-product kernels, the VM's bookkeeping and the other ops
  (elementwise, pooling, layout), each as one row;

and what share of this CPU's measured peaks (:mod:`qcompile.runtime.peak`) the run reaches:
the whole model's MACs per second against the int8 dot-product peak, and each layer's against
the peak of its dtype.  Shares are of the instrumented run (a hook of about 1 us per call
inflates the smallest kernels and the bookkeeping row); the latencies are TVM's time evaluator's.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.build.macs import LayerMacs, MacCount
from qcompile.runtime.profile import VM_BUILTIN

# Finding kinds, in the order the text explains them.
FLOAT_FALLBACK = "float_fallback"
GENERIC_KERNEL = "generic_kernel"
QDQ_BOUNDARY = "qdq_boundary"
INT8_KERNELS = "int8_kernels"
FLOAT_KERNELS = "float_kernels"
VM_BOOKKEEPING = "vm"
OTHER = "other"


@dataclass(frozen=True)
class Call:
    """One kernel call of a run: its kernel, median time (ms) and the layer it computes."""

    kernel: str
    ms: float
    layer: LayerMacs | None = None


@dataclass(frozen=True)
class Finding:
    """One row of the explanation: what costs ``ms`` per run (``share`` of the int8 run), why,
    the kernels it runs on, the share of the peak of its dtype it reaches where its MACs are
    known, and the float build's time for the same layers where one was given."""

    kind: str
    subject: str
    reason: str
    ms: float
    share: float
    kernels: tuple[str, ...] = ()
    macs: int | None = None
    peak_fraction: float | None = None
    float_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "reason": self.reason, "ms": round(self.ms, 5),
                "share": round(self.share, 5), "kernels": list(self.kernels), "macs": self.macs,
                "peak_fraction": None if self.peak_fraction is None else round(self.peak_fraction, 5),
                "float_ms": None if self.float_ms is None else round(self.float_ms, 5)}

    def line(self) -> str:
        extra = []
        if self.peak_fraction is not None:
            extra.append(f"{100 * self.peak_fraction:.1f}% of peak")
        if self.float_ms is not None:
            extra.append(f"float build {self.float_ms:.4f} ms")
        tail = f" [{'; '.join(extra)}]" if extra else ""
        return f"{100 * self.share:5.1f}%  {self.ms:8.4f} ms  {self.subject}: {self.reason}{tail}"


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found: latencies, peaks, findings (costliest first) and notes."""

    library: str
    scheme: str
    int8_ms: float  # median latency (time evaluator)
    profiled_ms: float  # the instrumented run the shares are of
    findings: tuple[Finding, ...]
    float_library: str | None = None
    float_ms: float | None = None
    macs: int | None = None
    peaks: Any = None  # qcompile.runtime.peak.Peaks | None
    peak_fraction: float | None = None  # whole model vs the int8 (or fp32, for a float build) peak
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def speedup(self) -> float | None:
        return self.float_ms / self.int8_ms if self.float_ms and self.int8_ms > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "library": self.library, "scheme": self.scheme, "float_library": self.float_library,
            "latency_ms": {"int8": round(self.int8_ms, 5),
                           "float": None if self.float_ms is None else round(self.float_ms, 5)},
            "speedup": None if self.speedup is None else round(self.speedup, 4),
            "profiled_ms": round(self.profiled_ms, 5), "macs": self.macs,
            "peaks": self.peaks.to_json() if self.peaks is not None else None,
            "peak_fraction": None if self.peak_fraction is None else round(self.peak_fraction, 5),
            "findings": [f.to_json() for f in self.findings], "notes": list(self.notes),
        }

    def to_text(self) -> str:
        head = f"{self.library} ({self.scheme}): {self.int8_ms:.4f} ms"
        if self.float_ms is not None:
            verdict = "faster" if self.speedup >= 1.0 else "SLOWER"
            head += f"; float {self.float_ms:.4f} ms ({Path(self.float_library).name}): {self.speedup:.2f}x, int8 {verdict}"
        lines = [head]
        if self.peak_fraction is not None:
            peak = self.peaks.for_dtype("int8" if self.scheme.startswith("int8") else "float32")
            lines.append(f"the model reaches {100 * self.peak_fraction:.1f}% of the measured {peak.instruction} peak "
                         f"({peak.gmacs:.0f} GMAC/s, {self.peaks.threads} threads): {self.macs / 1e6:.2f} M MACs "
                         f"in {self.int8_ms:.4f} ms")
        lines.append(f"where the time goes (instrumented run, {self.profiled_ms:.4f} ms), costliest first:")
        lines += [f"  {f.line()}" for f in self.findings]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def profile_calls(model, inputs=None, runs: int = 20, warmup: int = 2) -> list[Call]:
    """Every kernel call of one run of ``model`` (a local :class:`CompiledModel`) in call order,
    each the median over ``runs`` runs; the VM's own calls summed into one :data:`VM_BUILTIN` row
    at the end."""
    from qcompile.errors import RuntimeInputError
    from qcompile.runtime.local import check_inputs

    if model.remote is not None:
        raise RuntimeInputError(f"explain times kernels with a hook in this process; {model.library.name} runs on "
                                f"{model.remote}: explain a local copy")
    if runs < 1:
        raise RuntimeInputError("explain needs runs >= 1")
    vm = model._vm  # the kernels are timed through the VM's instrument hook (as CompiledModel.profile does)
    model._set_inputs(check_inputs(model.inputs, model.default_inputs() if inputs is None else inputs))
    sequence: list[tuple[str, float]] = []
    builtin = [0.0]
    started: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *args) -> int:
        if before_run:
            started.append(time.perf_counter())
            return 0
        elapsed = time.perf_counter() - started.pop()
        if str(symbol).startswith("vm.builtin."):
            builtin[0] += elapsed
        else:
            sequence.append((str(symbol), elapsed))
        return 0

    def invoke() -> None:
        vm.invoke_stateful("main")

    for _ in range(warmup):
        invoke()
    per_run: list[list[tuple[str, float]]] = []
    builtins: list[float] = []
    vm.set_instrument(instrument)
    try:
        invoke()  # the hook's own first call is slow: not counted
        for _ in range(runs):
            sequence.clear()
            builtin[0] = 0.0
            invoke()
            per_run.append(list(sequence))
            builtins.append(builtin[0])
    finally:
        vm.set_instrument(None)
    first = per_run[0]
    calls = []
    for i, (name, _) in enumerate(first):
        times = sorted(run[i][1] for run in per_run if len(run) > i and run[i][0] == name)
        calls.append(Call(name, 1000.0 * times[len(times) // 2]))
    calls.append(Call(VM_BUILTIN, 1000.0 * sorted(builtins)[len(builtins) // 2]))
    return calls


_COMPUTE = re.compile(r"(?:^|_)(?:conv\dd|matmul|dense)")
# Float ops the layer rows already show (a conv/matmul kept float is a layer, not an "other" op).
_LAYER_OPS = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.nn.conv2d_transpose", "relax.matmul")


def _is_compute(kernel: str) -> bool:
    """A conv/matmul kernel (``fused_conv2d1_add``, ``qc_conv2d_int8``, ``fused_matmul_...``)."""
    return _COMPUTE.search(kernel.lower()) is not None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _is_qdq(kernel: str) -> bool:
    return "quantize" in kernel.lower() and not _is_compute(kernel)


def _is_packed(kernel: str) -> bool:
    return "qc_" in kernel


def _kernel_dtype(kernel: str) -> str | None:
    if "qc_" in kernel and "_int8" in kernel:
        return "int8"
    if "qc_" in kernel and "_float32" in kernel:
        return "float32"
    return None


def match_layers(calls: list[Call], macs: MacCount | None) -> tuple[list[Call], str | None]:
    """``calls`` with their layers: the conv/matmul calls in call order are the layers in
    program order.  Unmatched (and a note why) when the counts differ or a packed kernel's
    dtype contradicts its layer's."""
    if macs is None:
        return calls, "the manifest has no MAC count (built by an older qcompile): kernels are not matched to layers"
    compute = [i for i, c in enumerate(calls) if _is_compute(c.kernel)]
    if len(compute) != len(macs.layers) or macs.unknown:
        return calls, (f"{len(compute)} conv/matmul kernel calls for {len(macs.layers) + macs.unknown} layers: "
                       "kernels are not matched to layers")
    out = list(calls)
    for i, layer in zip(compute, macs.layers):
        dtype = _kernel_dtype(calls[i].kernel)
        if dtype is not None and dtype != layer.dtype:
            return calls, (f"kernel {calls[i].kernel} ({dtype}) does not compute {layer.name} ({layer.dtype}) in "
                           "call order: kernels are not matched to layers")
        out[i] = Call(calls[i].kernel, calls[i].ms, layer)
    return out, None


def _float_reason(layer: LayerMacs, quantization: dict) -> str:
    if layer.name in quantization.get("float_layers", []):
        return "kept float32 (keep_float)"
    if quantization.get("float_nodes"):
        return "float32: the pre-quantized model left it float"
    if layer.op == "matmul" and not layer.constant_weight:
        return "float32: a product of two activations the quantizer left float"
    return "float32: no int8 form for this layer"


def _generic_reason(layer: LayerMacs | None, kernel: str, dot, build: dict) -> str:
    """Why a conv/matmul runs on TVM's generic kernel rather than a packed one."""
    if layer is None:
        return "a shape, layout or form qcompile's packed kernels do not take"
    int8 = layer.dtype == "int8"
    if layer.op == "matmul":
        if not layer.constant_weight:
            return "a matmul of two activations (the packed kernels need a constant weight)"
        if not int8:
            return "a float32 matmul whose output channels are no multiple of 8, or a weight layout the float kernel does not take"
        return "an int8 matmul whose weight or shape the packed dense kernel does not take"
    if layer.op != "conv2d":
        return f"a {layer.op}: qcompile's packed kernels take conv2d only"
    if layer.groups > 1 and not layer.depthwise:
        return (f"a grouped conv ({layer.groups} groups of {layer.group_channels} input channels; "
                "the packed kernels take 1 group, depthwise, or groups of output channels that fill or divide "
                "their 8- or 16-channel blocks)")
    if int8 and dot is None:
        return "no int8 dot-product instruction on the target (no VNNI, AVX2 or dotprod)"
    if int8 and build.get("conv_kernels", {}).get("int8_inexact"):
        return (f"8-bit weights whose pairs would saturate {dot.name} (vpmaddubsw's int16 sums), so TVM's exact "
                "conv runs instead: build with --reduce-range")
    return "channels, layout or padding the packed kernels do not take"


def _target_dot(manifest):
    import tvm

    from qcompile.kernels.int8_dot import int8_dot_for

    target = manifest.target["target"]
    if target.get("kind") != "llvm":
        return None
    try:
        return int8_dot_for(tvm.target.Target(target))
    except Exception:  # noqa: BLE001 (a target this TVM cannot rebuild: assume no dot product)
        return None


def _findings(calls: list[Call], manifest, float_by_layer: dict[str, float], peaks, dot) -> list[Finding]:
    quantization = manifest.quantization
    build = manifest.build
    quantized = quantization.get("scheme", "none") != "none"
    total = sum(c.ms for c in calls) or 1.0
    out: list[Finding] = []
    groups: dict[str, list[Call]] = {INT8_KERNELS: [], FLOAT_KERNELS: [], QDQ_BOUNDARY: [], OTHER: [], VM_BOOKKEEPING: []}

    def fraction(macs: int | None, ms: float, dtype: str) -> float | None:
        if peaks is None or not macs:
            return None
        return peaks.fraction(macs, ms / 1000.0, dtype)

    for call in calls:
        layer = call.layer
        if call.kernel == VM_BUILTIN:
            groups[VM_BOOKKEEPING].append(call)
        elif _is_compute(call.kernel) and not _is_packed(call.kernel):
            subject = (f"{layer.name} ({layer.dtype} {layer.op}) on a generic kernel (TVM's default schedule)" if layer
                       else f"{call.kernel}: a generic kernel (TVM's default schedule)")
            kind, reason = GENERIC_KERNEL, _generic_reason(layer, call.kernel, dot, build)
            if quantized and layer is not None and layer.dtype == "float32":  # both: a float layer, slowly
                kind, subject = FLOAT_FALLBACK, f"float fallback {layer.name} ({layer.op}) on a generic kernel"
                reason = f"{_float_reason(layer, quantization)}; {reason}"
            out.append(Finding(kind, subject, reason, call.ms, call.ms / total, (call.kernel,),
                               layer.macs if layer else None,
                               fraction(layer.macs, call.ms, layer.dtype) if layer else None,
                               float_by_layer.get(layer.name) if layer else None))
        elif _is_compute(call.kernel) and quantized and (_kernel_dtype(call.kernel) == "float32"
                                                         or (layer is not None and layer.dtype == "float32")):
            if layer is None:
                reason = ("float32 kernel in the int8 build; layers left float: "
                          + (", ".join(quantization.get("float_layers", [])) or "see the manifest"))
                out.append(Finding(FLOAT_FALLBACK, f"float fallback {call.kernel}", reason, call.ms, call.ms / total,
                                   (call.kernel,)))
            else:
                out.append(Finding(FLOAT_FALLBACK, f"float fallback {layer.name} ({layer.op})",
                                   _float_reason(layer, quantization),
                                   call.ms, call.ms / total, (call.kernel,), layer.macs,
                                   fraction(layer.macs, call.ms, "float32"), float_by_layer.get(layer.name)))
        elif _is_compute(call.kernel):
            groups[INT8_KERNELS if (_kernel_dtype(call.kernel) == "int8" or (layer and layer.dtype == "int8"))
                   else FLOAT_KERNELS].append(call)
        elif _is_qdq(call.kernel):
            groups[QDQ_BOUNDARY].append(call)
        else:
            groups[OTHER].append(call)

    def group_row(kind: str, subject: str, reason: str, dtype: str | None = None) -> None:
        members = groups[kind]
        if not members:
            return
        ms = sum(c.ms for c in members)
        layers = [c.layer for c in members if c.layer is not None]
        macs = sum(layer.macs for layer in layers) if layers and len(layers) == len(members) else None
        names = [layer.name for layer in layers]
        floats = [float_by_layer.get(n) for n in names]
        listed = names if len(names) <= 6 else [*names[:3], "...", *names[-2:]]
        out.append(Finding(kind, subject.format(calls=_plural(len(members), "call"),
                                                kernels=_plural(len(members), "kernel")),
                           reason + (f" ({', '.join(listed)})" if names else ""),
                           ms, ms / total, tuple(dict.fromkeys(c.kernel for c in members)), macs,
                           fraction(macs, ms, dtype) if dtype else None,
                           sum(floats) if floats and all(f is not None for f in floats) else None))

    group_row(INT8_KERNELS, "int8 layers on qcompile's dot-product kernels ({calls})", "the fast path", "int8")
    group_row(FLOAT_KERNELS, "float32 layers on qcompile's packed kernels ({calls})", "the float fast path",
              "float32")
    boundary_note = "converting between float32 and int8 where float ops or float layers meet int8 ones"
    fused = sum(1 for c in calls if "quantize" in c.kernel.lower() and _is_compute(c.kernel))
    if fused:
        boundary_note += f"; {fused} more fused into conv/matmul kernels (counted there)"
    group_row(QDQ_BOUNDARY, "quantize/dequantize boundaries ({kernels})", boundary_note)
    float_ops = {op: n for op, n in (quantization.get("float_ops") or {}).items() if op not in _LAYER_OPS}
    other = "elementwise, pooling, reductions, layout changes"
    if quantized and float_ops:
        other += "; ops left in float32: " + ", ".join(f"{op} x{n}" for op, n in sorted(float_ops.items()))
    group_row(OTHER, "other kernels ({calls})", other)
    group_row(VM_BOOKKEEPING, "VM bookkeeping", "allocations and shape checks between kernels, and the timing hook")
    return sorted(out, key=lambda f: -f.ms)


def _macs_of(manifest) -> MacCount | None:
    obj = manifest.build.get("macs")
    return MacCount.from_json(obj) if obj else None


def explain(int8_library: str | Path, float_library: str | Path | None = None, inputs=None, runs: int = 20,
            repeat: int = 20, peaks: Any = True) -> Explanation:
    """Explain where ``int8_library``'s time goes (beside ``float_library``'s, when given) and
    what share of this CPU's measured peaks it reaches.  ``peaks``: True measures them here
    (:func:`qcompile.runtime.peak.measure_peaks`, about a second), a ``Peaks`` uses those, False
    leaves the peak fractions out."""
    from qcompile.runtime.local import CompiledModel

    model = CompiledModel.load(int8_library)
    reference = CompiledModel.load(float_library) if float_library is not None else None
    manifest = model.manifest
    scheme = str(manifest.quantization.get("scheme", "none"))
    notes: list[str] = []
    if scheme == "none":
        notes.append(f"{Path(int8_library).name} is a float build: nothing was quantized")
    calls, note = match_layers(profile_calls(model, inputs, runs), _macs_of(manifest))
    if note:
        notes.append(note)
    float_by_layer: dict[str, float] = {}
    float_ms = None
    if reference is not None:
        float_calls, _ = match_layers(profile_calls(reference, inputs, runs), _macs_of(reference.manifest))
        float_by_layer = {c.layer.name: c.ms for c in float_calls if c.layer is not None}
        float_ms = reference.benchmark(inputs, repeat=repeat).to_json()["median_ms"]
    int8_ms = model.benchmark(inputs, repeat=repeat).to_json()["median_ms"]
    if peaks is True:
        from qcompile.runtime.peak import measure_peaks

        peaks = measure_peaks("native")
    elif peaks is False:
        peaks = None
    dot = _target_dot(manifest)
    if scheme.startswith("int8") and dot is None and manifest.target["target"].get("kind") == "llvm":
        notes.append("the target has no int8 dot-product instruction (no VNNI, AVX2 or dotprod): int8 convs run on "
                     "TVM's generic kernels")
    if scheme.startswith("int8") and dot is not None and dot.pair_saturates:
        notes.append("the target's int8 dot product is AVX2's vpmaddubsw + vpmaddwd sequence (no VNNI): about twice "
                     "fp32's MACs per cycle, not four times")
    findings = _findings(calls, manifest, float_by_layer, peaks, dot)
    macs = _macs_of(manifest)
    total_macs = macs.total if macs is not None else None
    fraction = None
    if peaks is not None and total_macs:
        fraction = peaks.fraction(total_macs, int8_ms / 1000.0, "int8" if scheme.startswith("int8") else "float32")
    return Explanation(str(int8_library), scheme, int8_ms, sum(c.ms for c in calls), tuple(findings),
                       str(float_library) if float_library is not None else None, float_ms, total_macs, peaks,
                       fraction, tuple(notes))
