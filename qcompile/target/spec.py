"""Target specifications: presets, JSON and TVMC-style strings.

TVM 0.27 accepts targets only as dicts (``{"kind": "llvm", "mcpu": ...}``); it rejects
the ``"llvm -mcpu=..."`` strings TVMC users know.  This module accepts all of:

* ``native``: this machine, from the CPU flags the kernel reports,
* a preset name from ``targets/`` (``x86-avx512``, ``rpi4`` ...),
* a path to a preset-style or target-dict JSON file,
* an inline JSON object,
* a TVMC-style string: ``llvm -mcpu=cortex-a72 -mattr=+neon,+dotprod``,

and resolves each to a :class:`TargetSpec`.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.errors import ConfigError, first_line

# Attributes whose values are lists in TVM's target schema (comma-separated in strings).
_LIST_ATTRS = {"mattr", "keys", "libs", "cl-opt"}
# An ARM -mcpu given without -mtriple means aarch64 Linux (what TVMC users meant).
_ARM_CPU_PREFIXES = ("cortex-a", "neoverse", "apple-", "carmel", "thunderx", "cyclone", "a64fx")
_AARCH64_TRIPLE = "aarch64-linux-gnu"


def presets_dir() -> Path:
    """Folder holding the named target presets (``QCOMPILE_TARGETS_DIR`` overrides)."""
    env = os.environ.get("QCOMPILE_TARGETS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: TVM target dict, optional host, cross-compiler, tuning defaults."""

    name: str
    target: dict[str, Any]
    host: dict[str, Any] | None = None
    cross_compiler: str | None = None
    tuning: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def kind(self) -> str:
        return str(self.target["kind"])

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "rocm", "vulkan", "metal", "opencl")

    @property
    def triple(self) -> str | None:
        tgt = self.host if self.is_gpu and self.host else self.target
        return tgt.get("mtriple")

    def needs_cross_compile(self) -> bool:
        """True when the target's code cannot be linked by the host's own compiler."""
        triple = self.triple
        if not triple:
            return False
        return not triple.startswith(platform.machine())

    def to_tvm(self):
        """The ``tvm.target.Target`` (imports TVM lazily)."""
        import tvm

        try:
            if self.is_gpu:
                return tvm.target.Target(self.target, host=self.host or {"kind": "llvm"})
            return tvm.target.Target(self.target)
        except Exception as exc:  # TVM raises its own error types for bad attributes
            raise ConfigError(
                f"target {self.name!r}: TVM rejects {json.dumps(self.target)}: {first_line(exc)}"
            ) from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "host": self.host,
            "cross_compiler": self.cross_compiler,
        }


def list_presets() -> list[TargetSpec]:
    """All presets in :func:`presets_dir`, sorted by name."""
    folder = presets_dir()
    if not folder.is_dir():
        return []
    return [_load_preset_file(p, p.stem) for p in sorted(folder.glob("*.json"))]


def resolve_target(spec: str) -> TargetSpec:
    """Resolve a preset name, JSON file, inline JSON or TVMC-style string to a TargetSpec."""
    text = spec.strip()
    if not text:
        raise ConfigError("--target is empty: give a preset (see `qcompile targets`) or e.g. 'llvm -mcpu=cascadelake'")
    if text == "native":
        from qcompile.target.hostcpu import native_target

        return TargetSpec(name="native", target=native_target(), description="this machine (from /proc/cpuinfo)")
    preset = presets_dir() / f"{text}.json"
    if preset.is_file():
        return _load_preset_file(preset, text)
    if text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"target file {text} does not exist")
        return _load_preset_file(path, path.stem)
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--target JSON is malformed: {exc}") from exc
        return _from_json_obj(obj, "custom")
    return parse_tvmc_string(text)


def parse_tvmc_string(text: str) -> TargetSpec:
    """Translate ``"llvm -mcpu=cortex-a72 -mattr=+neon"`` into a TargetSpec."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--target {text!r}: {exc}") from exc
    kind = tokens[0]
    if kind.startswith("-") or "=" in kind:
        raise ConfigError(f"--target {text!r}: must start with a target kind such as 'llvm' or 'cuda'")
    _check_kind(kind, text)
    target: dict[str, Any] = {"kind": kind}
    i = 1
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("-"):
            raise ConfigError(f"--target {text!r}: expected an option like -mcpu=NAME, got {tok!r}")
        key, sep, value = tok.lstrip("-").partition("=")
        if not sep:  # "-mcpu cortex-a72" form
            if i + 1 >= len(tokens):
                raise ConfigError(f"--target {text!r}: option -{key} has no value")
            value = tokens[i + 1]
            i += 1
        target[key] = _parse_value(key, value)
        i += 1
    if kind == "cuda" and "arch" not in target:
        raise ConfigError(f"--target {text!r}: a CUDA target needs -arch=sm_XX (e.g. 'cuda -arch=sm_80')")
    if kind == "llvm":
        mcpu = str(target.get("mcpu", ""))
        if "mtriple" not in target and mcpu.startswith(_ARM_CPU_PREFIXES):
            target["mtriple"] = _AARCH64_TRIPLE
    host = {"kind": "llvm"} if kind == "cuda" else None
    spec = TargetSpec(name=text, target=target, host=host, cross_compiler=_default_cross_compiler(target))
    validate(spec)
    return spec


def _parse_value(key: str, value: str) -> Any:
    if key in _LIST_ATTRS:
        return [v for v in value.split(",") if v]
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.lstrip("-").isdigit():
        return int(value)
    return value


def _check_kind(kind: str, text: str) -> None:
    import tvm

    kinds = set(tvm.target.Target.list_kinds())
    if kind not in kinds:
        presets = ", ".join(p.name for p in list_presets())
        raise ConfigError(
            f"unknown target {text!r}: not a preset ({presets}) and {kind!r} is not a TVM target kind"
        )


def _default_cross_compiler(target: dict[str, Any]) -> str | None:
    triple = target.get("mtriple")
    if triple and not str(triple).startswith(platform.machine()) and str(triple).startswith("aarch64"):
        return "aarch64-linux-gnu-g++"
    return None


def _from_json_obj(obj: Any, name: str) -> TargetSpec:
    if not isinstance(obj, dict):
        raise ConfigError(f"target {name!r}: expected a JSON object, got {type(obj).__name__}")
    if "target" in obj:  # preset form
        target = obj["target"]
        if not isinstance(target, dict) or "kind" not in target:
            raise ConfigError(f"target {name!r}: 'target' must be an object with a 'kind'")
        spec = TargetSpec(
            name=name,
            target=target,
            host=obj.get("host"),
            cross_compiler=obj.get("cross_compiler") or _default_cross_compiler(target),
            tuning=dict(obj.get("tuning") or {}),
            description=obj.get("description", ""),
        )
    elif "kind" in obj:  # bare TVM target dict
        host = obj.pop("host", None) if isinstance(obj.get("host"), dict) else None
        spec = TargetSpec(name=name, target=obj, host=host, cross_compiler=_default_cross_compiler(obj))
    else:
        raise ConfigError(f"target {name!r}: JSON needs a 'kind' (TVM target dict) or a 'target' (preset)")
    validate(spec)
    return spec


def validate(spec: TargetSpec) -> None:
    """Refuse what TVM would reject (attribute names) and what it would silently ignore:
    an ``mcpu`` or ``mattr`` feature LLVM does not know for the target triple (TVM 0.27 then
    warns and builds generic code -- a typo'd ``-mcpu=cortexa72`` becomes a slow library)."""
    with _quiet_stderr():  # TVM's "-mcpu=... is not valid" warning: the error below says it better
        spec.to_tvm()  # attribute names first, with TVM's message naming the option
    for target in (spec.target, spec.host):
        if isinstance(target, dict) and target.get("kind") == "llvm":
            check_llvm_cpu(target, spec.name)


def check_llvm_cpu(target: dict[str, Any], name: str) -> None:
    """Raise ConfigError when ``target``'s mtriple, mcpu or mattr is unknown to TVM's LLVM,
    naming the bad value and the closest valid names."""
    try:
        from tvm.target import codegen

        version = codegen.llvm_version_major()
    except Exception:  # noqa: BLE001 -- a TVM without LLVM: it cannot check (nor build llvm targets)
        return
    with _quiet_stderr():  # LLVM and TVM warn on stderr about each value refused below
        problem = _llvm_cpu_problem(target, f"LLVM {version}")
    if problem:
        raise ConfigError(f"target {name!r}: {problem}")


def _llvm_cpu_problem(target: dict[str, Any], llvm: str) -> str | None:
    """What is wrong with ``target``'s mtriple/mcpu/mattr for this LLVM, or None."""
    from tvm.target import Target, codegen

    triple = str(target.get("mtriple") or codegen.llvm_get_system_triple())
    # Every CPU target of LLVM has a "generic" CPU; asking an unknown triple for its CPU list crashes.
    if not codegen.llvm_is_valid_cpu("generic", triple):
        return (f"-mtriple={triple} is not a triple {llvm} generates code for "
                "(e.g. x86_64-linux-gnu, aarch64-linux-gnu): fix the -mtriple value")
    mcpu = target.get("mcpu")
    if mcpu is not None and not codegen.llvm_is_valid_cpu(str(mcpu), triple):
        cpus = _cpus(triple)
        if "mtriple" not in target and not triple.startswith("aarch64"):
            cpus += _cpus(_AARCH64_TRIPLE)  # an ARM CPU name implies the aarch64 triple (parse_tvmc_string)
        if mcpu == "native":
            hint = "for this machine use --target native"
        else:
            hint = _did_you_mean(str(mcpu), cpus, f"`llc -mtriple={triple} -mcpu=help` lists them")
        return f"-mcpu={mcpu} is not a CPU {llvm} knows for {triple} (it would build generic code); {hint}"
    mattr = target.get("mattr") or []
    mattr = [str(f) for f in ([mattr] if isinstance(mattr, str) else mattr)]
    unsigned = [f for f in mattr if not f.startswith(("+", "-"))]
    if unsigned:
        return ("-mattr entries start with + (enable) or - (disable): "
                f"write {','.join('+' + f for f in unsigned)}")
    if not mattr:
        return None
    # A feature LLVM knows shows up in the CPU's feature map once enabled; an unknown one is
    # dropped with only a warning on stderr.
    base = {"kind": "llvm", "mtriple": triple, **({"mcpu": mcpu} if mcpu is not None else {})}
    names = [f[1:] for f in mattr]
    enabled = codegen.llvm_get_cpu_features(Target({**base, "mattr": [f"+{n}" for n in names]}))
    unknown = [n for n in names if n not in enabled]
    if not unknown:
        return None
    hint = _did_you_mean(unknown[0], _all_features(triple), f"`llc -mtriple={triple} -mattr=help` lists them")
    return f"-mattr feature {unknown[0]!r} is not one {llvm} knows for {triple} (it would be ignored); {hint}"


def _cpus(triple: str) -> list[str]:
    from tvm.target import Target, codegen

    return sorted(str(c) for c in codegen.llvm_get_cpu_archlist(Target({"kind": "llvm", "mtriple": triple})))


def _all_features(triple: str) -> list[str]:
    """Feature names LLVM knows for ``triple``: those of all its CPUs (for suggestions)."""
    from tvm.target import Target, codegen

    names: set[str] = set()
    for cpu in _cpus(triple):
        names |= set(codegen.llvm_get_cpu_features(Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})))
    return sorted(names)


def _did_you_mean(value: str, choices: list[str], fallback: str) -> str:
    close = closest(value, choices)
    return f"did you mean {' or '.join(close)}?" if close else fallback


def closest(value: str, choices: list[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The ``n`` names in ``choices`` most like ``value`` (difflib's ratio).  Names with the
    same letters rank first among equals: swapped characters (cortex-a27) are a common typo,
    and difflib alone ties cortex-a72 with cortex-a78, a77 and a76."""
    matcher = difflib.SequenceMatcher(b=value)
    scored = []
    for choice in set(choices):
        matcher.set_seq1(choice)
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff:
            ratio = matcher.ratio()
            if ratio >= cutoff:
                scored.append((ratio + (0.05 if sorted(choice) == sorted(value) else 0.0), choice))
    return [choice for _, choice in sorted(scored, key=lambda item: (-item[0], item[1]))[:n]]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (LLVM and TVM's C++ logging write there, not to sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2 to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _load_preset_file(path: Path, name: str) -> TargetSpec:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"target file {path}: cannot read JSON: {exc}") from exc
    return _from_json_obj(obj, name)

