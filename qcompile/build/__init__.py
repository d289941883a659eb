"""Build: compile an imported (optionally quantized) model into one ``.so`` + manifest.

The library and manifest are written under temporary names and renamed into place
only when both are complete, so a failed build leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from qcompile import __version__
from qcompile.errors import BuildError, ConfigError, QcompileError, first_line
from qcompile.manifest import Manifest, manifest_path, sha256_file
from qcompile.model import ImportedModel
from qcompile.target import TargetSpec

Progress = Callable[[str], None]

_CROSS_INSTALL_HINT = {
    "aarch64-linux-gnu-g++": "sudo apt-get install g++-aarch64-linux-gnu",
}


@dataclass(frozen=True)
class Artifact:
    """A built library and its manifest."""

    library: Path
    manifest: Manifest

    @property
    def manifest_file(self) -> Path:
        return manifest_path(self.library)


def build(
    model: ImportedModel,
    target: TargetSpec,
    out_dir: Path,
    name: str | None = None,
    quantization: dict[str, Any] | None = None,
    dump_ir: Path | None = None,
    progress: Progress | None = None,
    tuning_logs: Path | None | bool = None,
) -> Artifact:
    """Compile ``model`` for ``target``; write ``out_dir/name.so`` and its manifest.

    Tuning records for ``target`` under ``tuning_logs`` (default: :func:`tune.log_root`)
    are applied when present; ``tuning_logs=False`` builds untuned.
    """
    say = progress or (lambda _msg: None)
    name = name or model.source.name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"artifact name {name!r} is not a plain file name")
    tvm_target = target.to_tvm()
    fcompile = _export_compiler(target)
    library = out_dir / f"{name}.so"

    started = time.perf_counter()
    say(f"compiling {model.source.name} for {target.name} ...")
    try:
        from qcompile.build.pipeline import compile_module
        from qcompile.tune.records import apply_database_passes

        tuning: dict = {}
        kernels: dict = {}
        passes = [] if tuning_logs is False else apply_database_passes(target, tuning_logs or None, tuning)
        executable = compile_module(model.mod, tvm_target, dump_ir=dump_ir, tuning_passes=passes,
                                    kernel_counts=kernels)
    except QcompileError:
        raise
    except Exception as exc:
        raise BuildError(f"compiling {model.source.name} for {target.name} failed: {first_line(exc)}") from exc
    compile_s = time.perf_counter() - started
    _report_tuning(tuning, target, say)
    _report_kernels(kernels, target, say)

    say(f"exporting {library} ...")
    from qcompile.target.hostcpu import required_features

    with _atomic_outputs(out_dir, [library, manifest_path(library)]) as (tmp_lib, tmp_manifest):
        try:
            # -s: no symbol table or debug info (TVM resolves functions through .dynsym).
            extra = {}
            if target.kind == "cuda":  # kernels compiled now: the loader needs no CUDA compiler
                from qcompile.build.cuda_fatbin import precompile_cuda_kernels

                extra["fpack_imports"] = precompile_cuda_kernels(executable, str(target.target["arch"]))
            executable.export_library(str(tmp_lib), fcompile=fcompile, options=["-s"], **extra)
        except Exception as exc:
            raise BuildError(f"exporting {library} failed: {first_line(exc)}") from exc
        manifest = Manifest(
            model=model.source.to_json(),
            inputs=list(model.inputs),
            outputs=list(model.outputs),
            target=target.to_json(),
            library={"file": library.name, "sha256": sha256_file(tmp_lib), "bytes": tmp_lib.stat().st_size},
            quantization=quantization or {"scheme": "none"},
            cpu_features=required_features(tvm_target if not target.is_gpu else tvm_target.host),
            versions=_versions(),
            build={
                "compile_seconds": round(compile_s, 2),
                "tuning": tuning,
                "conv_kernels": kernels,
                "host": platform.node(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        manifest.write(tmp_manifest)
    say(f"wrote {library} ({library.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return Artifact(library=library, manifest=manifest)


def _report_tuning(tuning: dict, target: TargetSpec, say: Progress) -> None:
    if not tuning.get("database"):
        say(f"no tuning records for target {target.name!r}: untuned kernels (run `qcompile tune` for speed)")
    elif tuning["hits"] == 0:
        # A database that matches nothing is the silent 100x slowdown: say it loudly.
        print(f"warning: tuning records in {tuning['database']} matched none of {tuning['misses']} kernels; "
              "the build is untuned (tuned for another model or quantization?)", file=sys.stderr)
    else:
        say(f"tuning records: {tuning['hits']} kernels tuned, {tuning['misses']} untuned")


def _report_kernels(counts: dict, target: TargetSpec, say: Progress) -> None:
    """Which of qcompile's conv kernels the layers run on (qcompile.passes.pack_conv), and a
    warning for int8 convs left on TVM's generic conv because the target's int8 instruction
    could saturate on their weights -- a model silently several times slower otherwise."""
    used = {kind: n for kind, n in counts.items() if n and kind != "int8_inexact"}
    if used:
        say("conv kernels: " + ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in used.items()))
    if counts.get("int8_inexact"):
        print(f"warning: {counts['int8_inexact']} int8 conv layers run on TVM's generic conv, several times "
              f"slower: their 8-bit weights could saturate {target.name}'s int8 instruction (AVX2 vpmaddubsw); "
              "quantize the float model with `--quantize int8` (7-bit weights on this target, or --reduce-range) "
              "for the fast kernel", file=sys.stderr)


def _export_compiler(target: TargetSpec):
    """``fcompile`` for export_library: the cross-compiler when the target needs one."""
    if not target.needs_cross_compile():
        return None
    compiler = target.cross_compiler
    if not compiler:
        raise ConfigError(
            f"target {target.name!r} is for {target.triple} but no cross-compiler is known; "
            "set \"cross_compiler\" in the target preset"
        )
    if shutil.which(compiler) is None:
        hint = _CROSS_INSTALL_HINT.get(compiler, f"install {compiler}")
        raise BuildError(f"cross-compiler {compiler} for target {target.name!r} is not installed: {hint}")
    from tvm.support import cc

    return cc.cross_compiler(compiler)


@contextlib.contextmanager
def _atomic_outputs(out_dir: Path, finals: list[Path]) -> Iterator[list[Path]]:
    """Yield temporary paths in ``out_dir``; rename them onto ``finals`` only on success."""
    created_dir = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create output folder {out_dir}: {exc.strerror}") from exc
    staging = Path(tempfile.mkdtemp(prefix=".qcompile-", dir=out_dir))
    temps = [staging / f.name for f in finals]
    try:
        yield temps
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_dir and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _versions() -> dict[str, str]:
    import tvm

    versions = {"qcompile": __version__, "tvm": tvm.__version__, "python": sys.version.split()[0]}
    try:
        import tvm_ffi

        versions["tvm_ffi"] = getattr(tvm_ffi, "__version__", "unknown")
    except ImportError:
        pass
    return versions
