"""Run and benchmark built artifacts: numpy in, numpy out.

Needs only TVM's runtime and numpy (never torch).  Inputs are checked against the
manifest (names, shapes, dtypes) before they reach the library, and the library's
hash and CPU requirements are checked before it is loaded.  ``CompiledModel.load(...,
rpc=endpoint)`` uploads the library to a TVM RPC server (a board, an emulator, a pool
behind a tracker) and runs it there; inputs and outputs travel as numpy arrays.
"""
from __future__ import annotations

import contextlib
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import ArtifactError, RpcError, RuntimeInputError, first_line
from qcompile.manifest import Manifest, load_manifest, verify_library
from qcompile.model import TensorInfo

Inputs = Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray


@dataclass(frozen=True)
class BenchResult:
    """Latency statistics over ``repeat`` timed runs (each the mean of ``number`` calls)."""

    times_ms: tuple[float, ...]
    number: int
    warmup: int
    batch: int

    def _pct(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q))

    def to_json(self) -> dict[str, Any]:
        median = self._pct(50)
        return {
            "median_ms": round(median, 4),
            "mean_ms": round(float(np.mean(self.times_ms)), 4),
            "p90_ms": round(self._pct(90), 4),
            "p99_ms": round(self._pct(99), 4),
            "min_ms": round(float(np.min(self.times_ms)), 4),
            "max_ms": round(float(np.max(self.times_ms)), 4),
            "std_ms": round(float(np.std(self.times_ms)), 4),
            "repeat": len(self.times_ms),
            "number": self.number,
            "warmup": self.warmup,
            "throughput_per_s": round(1000.0 * self.batch / median, 3) if median > 0 else None,
        }


def default_inputs(infos: Sequence[TensorInfo], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for a smoke run (as TVMC's 'random' fill did)."""
    rng = np.random.default_rng(seed)
    out = {}
    for info in infos:
        if np.dtype(info.dtype).kind == "f":
            out[info.name] = rng.standard_normal(info.shape).astype(info.dtype)
        else:
            out[info.name] = rng.integers(0, 10, size=info.shape).astype(info.dtype)
    return out


def check_inputs(infos: Sequence[TensorInfo], inputs: Inputs) -> list[np.ndarray]:
    """Validate ``inputs`` against ``infos``; return the arrays in signature order."""
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        if len(inputs) != len(infos) or any(i.name not in inputs for i in infos):
            names = [i.name for i in infos]
            unknown = sorted(set(inputs) - set(names))
            missing = [n for n in names if n not in inputs]
            raise RuntimeInputError(
                f"inputs {unknown or ''}{' are unknown' if unknown else ''}"
                f"{'; ' if unknown and missing else ''}{'missing ' + str(missing) if missing else ''}: "
                f"the model takes {names}"
            )
        arrays = [inputs[i.name] for i in infos]
    else:
        arrays = list(inputs)
        if len(arrays) != len(infos):
            raise RuntimeInputError(f"got {len(arrays)} inputs, the model takes {len(infos)}: "
                                    f"{[i.name for i in infos]}")
    checked = []
    for info, arr in zip(infos, arrays):
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        if arr.shape != info.shape:
            raise RuntimeInputError(
                f"input {info.name!r} has shape {list(arr.shape)}, the model expects {list(info.shape)}"
            )
        if arr.dtype != info.dtype:
            raise RuntimeInputError(
                f"input {info.name!r} has dtype {arr.dtype}, the model expects {info.dtype} "
                f"(convert with .astype('{info.dtype}'))"
            )
        checked.append(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
    return checked


class CompiledModel:
    """A loaded artifact: ``run`` numpy inputs, ``benchmark`` latency."""

    def __init__(self, library: Path, manifest: Manifest, vm, device, remote: str | None = None,
                 session=None) -> None:
        self.library = library
        self.manifest = manifest
        self._vm = vm
        self._device = device
        self.remote = remote  # "RPC server HOST:PORT" where the model runs, None when local
        self._session = session  # keeps the RPC session open as long as the model
        # Local CPU: the input tensors the VM holds, and numpy views of them that each run copies
        # its inputs into (see _set_inputs)
        self._tensors: list | None = None
        self._input_views: list[np.ndarray] | None = None
        self._main = None  # the VM's ``main``, called directly with those tensors (see run)
        self._output_names = tuple(o.name for o in manifest.outputs)
        # what a run's inputs must be, in the forms numpy compares fastest (see _ready_inputs)
        self._expected = tuple((i.name, tuple(i.shape), np.dtype(i.dtype)) for i in manifest.inputs)

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self.manifest.inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self.manifest.outputs)

    @classmethod
    def load(cls, library: str | Path, verify: bool = True, rpc=None, session=None) -> CompiledModel:
        """Load ``library`` (and its manifest) on this machine, or on the device behind
        ``rpc`` (a :class:`qcompile.runtime.rpc.RpcEndpoint`): in a new session, or in
        ``session`` (one :func:`qcompile.runtime.rpc.connect` opened there, shared by models)."""
        library = Path(library)
        if not library.is_file():
            raise ArtifactError(f"{library} does not exist")
        manifest = load_manifest(library)
        if verify:
            verify_library(library, manifest)
        if rpc is not None:
            return cls._load_remote(library, manifest, rpc, session)
        _check_runs_here(library, manifest)
        import tvm
        from tvm import relax

        try:
            lib = tvm.runtime.load_module(str(library))
        except Exception as exc:
            raise ArtifactError(f"{library}: cannot load: {first_line(exc)}") from exc
        device = _device_for(manifest, library)
        return cls(library, manifest, relax.VirtualMachine(lib, device), device)

    @classmethod
    def _load_remote(cls, library: Path, manifest: Manifest, endpoint, session=None) -> CompiledModel:
        from tvm import relax

        from qcompile.runtime.rpc import connect

        session = connect(endpoint) if session is None else session
        kind = manifest.target["target"]["kind"]
        triple = (manifest.target["target"] if kind == "llvm" else manifest.target.get("host") or {}).get("mtriple")
        try:
            session.upload(str(library))
            lib = session.load_module(library.name)
            device = session.cpu(0) if kind == "llvm" else session.device(kind, 0)
            vm = relax.VirtualMachine(lib, device)
        except Exception as exc:
            raise RpcError(f"{endpoint.label}: cannot load {library.name} there ({first_line(exc)}); it was "
                           f"built for {triple or kind}: does the device match?") from exc
        return cls(library, manifest, vm, device, remote=endpoint.label, session=session)

    @contextlib.contextmanager
    def _remote_guard(self, what: str):
        """Turn a dropped connection into an RpcError naming the device (local: no-op)."""
        if self.remote is None:
            yield
            return
        try:
            yield
        except RuntimeInputError:
            raise
        except Exception as exc:
            raise RpcError(f"{self.remote}: {what} failed ({first_line(exc)}): the server may have died "
                           "or timed out; check it is still running and restart it") from exc

    def default_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        return default_inputs(self.inputs, seed)

    def _local_cpu(self) -> bool:
        return self.remote is None and self._device.dlpack_device_type() == 1  # kDLCPU

    def _set_inputs(self, arrays: list[np.ndarray]) -> None:
        """Hand ``arrays`` to the VM.  On the local CPU the first call allocates the input tensors
        and sets them; later calls copy into them through numpy views (the VM keeps references to
        the tensors it was given and reads them at each invoke): allocating and setting three small
        tensors per run cost ~90 us of Python and FFI calls, several times a small model's kernels."""
        import tvm

        if self._input_views is not None:
            for view, array in zip(self._input_views, arrays):
                np.copyto(view, array)
            return
        tensors = [tvm.runtime.tensor(a, self._device) for a in arrays]
        self._vm.set_input("main", *tensors)
        if self._local_cpu():
            try:
                views = [np.from_dlpack(t) for t in tensors]
            except (BufferError, TypeError, RuntimeError):  # a dtype numpy's DLPack does not take
                return
            if all(v.flags.writeable and v.shape == a.shape for v, a in zip(views, arrays)):
                self._tensors, self._input_views = tensors, views

    def _ready_inputs(self, inputs: Inputs | None) -> list[np.ndarray] | None:
        """``inputs`` in signature order if each is already an array of the model's shape and
        dtype (the common call), else None: ``check_inputs`` then converts them or says what
        is wrong.  On a model whose kernels take ~20 us, the general checks cost ~3 us a run."""
        expected = self._expected
        if isinstance(inputs, dict) and len(inputs) == len(expected):
            arrays = [inputs.get(name) for name, _, _ in expected]
        elif isinstance(inputs, (list, tuple)) and len(inputs) == len(expected):
            arrays = list(inputs)
        elif isinstance(inputs, np.ndarray) and len(expected) == 1:
            arrays = [inputs]
        else:
            return None
        for array, (_, shape, dtype) in zip(arrays, expected):
            if type(array) is not np.ndarray or array.shape != shape or array.dtype != dtype:
                return None
        return arrays

    def run(self, inputs: Inputs | None = None) -> dict[str, np.ndarray]:
        """Run once; returns ``{output name: array}``."""
        if self._main is not None:  # local CPU, inputs held since an earlier run (see _set_inputs)
            arrays = self._ready_inputs(inputs)
            if arrays is not None:
                for view, array in zip(self._input_views, arrays):
                    np.copyto(view, array)
                return self._collect_outputs(self._main(*self._tensors))
        arrays = check_inputs(self.manifest.inputs, self.default_inputs() if inputs is None else inputs)
        with self._remote_guard("run"):
            self._set_inputs(arrays)
            if self._input_views is not None:
                # Local CPU: one call of ``main`` with the held input tensors returns the outputs;
                # invoke_stateful + get_outputs are two FFI calls plus the VM's saved-argument
                # bookkeeping, ~10 us more per run (a small RNN's kernels take ~12 us)
                if self._main is None:
                    self._main = self._vm["main"]
                return self._collect_outputs(self._main(*self._tensors))
            self._vm.invoke_stateful("main")
            return self._collect_outputs()

    def _collect_outputs(self, result=None) -> dict[str, np.ndarray]:
        if result is None:
            result = self._vm.get_outputs("main")
        flat = _flatten(result)
        names = self._output_names
        if len(flat) != len(names):
            raise ArtifactError(f"{self.library}: produced {len(flat)} outputs, the manifest lists {len(names)}")
        if self._input_views is not None:  # local CPU
            return {n: _copy_local(t) for n, t in zip(names, flat)}
        return {n: t.numpy() for n, t in zip(names, flat)}

    def benchmark(
        self, inputs: Inputs | None = None, repeat: int = 50, warmup: int = 5, number: int = 1
    ) -> BenchResult:
        """Time ``repeat`` runs after ``warmup`` untimed ones (TVM's time evaluator)."""
        if repeat < 1 or number < 1 or warmup < 0:
            raise RuntimeInputError("benchmark needs repeat >= 1, number >= 1, warmup >= 0")
        arrays = check_inputs(self.inputs, self.default_inputs() if inputs is None else inputs)
        with self._remote_guard("benchmark"):
            self._set_inputs(arrays)
            for _ in range(warmup):
                self._vm.invoke_stateful("main")
            timer = self._vm.time_evaluator("invoke_stateful", self._device, number=number, repeat=repeat)
            times = timer("main").results
        batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else 1
        return BenchResult(tuple(t * 1000.0 for t in times), number, warmup, batch)


    def profile(self, inputs: Inputs | None = None, runs: int = 20, warmup: int = 2) -> list:
        """Per-kernel time per run, slowest first (:mod:`qcompile.runtime.profile`); local only."""
        from qcompile.runtime.profile import profile_vm

        if self.remote is not None:
            raise RuntimeInputError(f"--profile times kernels with a hook in this process; {self.library.name} "
                                    f"runs on {self.remote}: profile it on a local copy, or bench it without --profile")
        if runs < 1 or warmup < 0:
            raise RuntimeInputError("profile needs runs >= 1, warmup >= 0")
        self._set_inputs(check_inputs(self.inputs, self.default_inputs() if inputs is None else inputs))
        return profile_vm(self._vm, lambda: self._vm.invoke_stateful("main"), runs, warmup)


def _copy_local(tensor) -> np.ndarray:
    """A copy of an output on the local CPU (the VM may reuse its storage): through DLPack,
    ~10x cheaper than ``Tensor.numpy()`` for small outputs."""
    try:
        return np.from_dlpack(tensor).copy()
    except (BufferError, TypeError, RuntimeError):  # a dtype numpy's DLPack does not take
        return tensor.numpy()


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out


def _device_for(manifest: Manifest, library: Path):
    import tvm

    kind = manifest.target["target"]["kind"]
    if kind == "llvm":
        return tvm.cpu(0)
    device = tvm.device(kind, 0)
    if not device.exist:
        raise ArtifactError(f"{library} was built for {kind}, but this machine has no {kind} device")
    return device


def _check_runs_here(library: Path, manifest: Manifest) -> None:
    """Refuse (instead of crashing with SIGILL) artifacts this CPU cannot execute."""
    from qcompile.target.hostcpu import missing_features

    target = manifest.target["target"] if manifest.target["target"]["kind"] == "llvm" else (manifest.target.get("host") or {})
    triple = str(target.get("mtriple") or "")
    machine = platform.machine()
    if triple and not triple.startswith(machine):
        raise ArtifactError(
            f"{library} was built for {triple}, this machine is {machine}: run it on the device "
            "(copy the .so and its manifest) or over RPC"
        )
    missing = missing_features(manifest.cpu_features, triple)
    if missing:
        raise ArtifactError(
            f"{library} was built for {manifest.target['name']!r} and uses {', '.join(missing)}, "
            "which this CPU lacks: rebuild with --target native"
        )
