"""Build: compile an imported (optionally quantized) model into one ``.so`` + manifest.

The library and manifest are written under temporary names and renamed into place
only when both are complete, so a failed build leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qcompile import __version__
from qcompile.errors import BuildError, ConfigError, QcompileError, first_line
from qcompile.manifest import Manifest, manifest_path, sha256_file
from qcompile.model import ImportedModel
from qcompile.stage import make_callable
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
    target: TargetSpec | str,
    out_dir: Path | str,
    name: str | None = None,
    dump_ir: Path | None = None,
    progress: Progress | None = None,
    tuning_logs: Path | str | None | bool = None,
) -> Artifact:
    """Compile ``model`` for ``target``; write ``out_dir/name.so`` and its manifest.

    The manifest's quantization section comes from ``model.quantization`` (None: float).
    Tuning records for ``target`` are applied when present: under ``tuning_logs`` if given,
    else the user's and then the packaged records (:func:`qcompile.tune.records.find_database`);
    ``tuning_logs=False`` builds untuned.
    """
    from qcompile.target import as_target

    say = progress or (lambda _msg: None)
    target = as_target(target)
    out_dir = Path(out_dir)
    if isinstance(tuning_logs, str):
        tuning_logs = Path(tuning_logs)
    name = name or model.source.name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"artifact name {name!r} is not a plain file name")
    tvm_target = target.to_tvm()
    fcompile = _export_compiler(target)
    library = out_dir / f"{name}.so"
    check_writable(out_dir)  # now, not after minutes of compiling

    started = time.perf_counter()
    say(f"compiling {model.source.name} for {target.name} ...")
    try:
        from qcompile.build.pipeline import compile_module
        from qcompile.tune.records import apply_database_passes

        tuning: dict = {}
        kernels: dict = {}
        notes: list[str] = []
        passes = [] if tuning_logs is False else apply_database_passes(target, tuning_logs or None, tuning)
        executable = compile_module(model.mod, tvm_target, dump_ir=dump_ir, tuning_passes=passes,
                                    kernel_counts=kernels, kernel_notes=notes)
    except QcompileError:
        raise
    except Exception as exc:
        raise BuildError(f"compiling {model.source.name} for {target.name} failed: {first_line(exc)}") from exc
    compile_s = time.perf_counter() - started
    _report_tuning(tuning, target, say)
    _report_kernels(kernels, target, say)
    for note in notes:
        say(note)

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
        except OSError as exc:
            raise write_error(out_dir, exc) from exc
        except Exception as exc:
            raise BuildError(f"exporting {library} failed: {first_line(exc)}") from exc
        manifest = Manifest(
            model=model.source.to_json(),
            inputs=list(model.inputs),
            outputs=list(model.outputs),
            target=target.to_json(),
            library={"file": library.name, "sha256": sha256_file(tmp_lib), "bytes": tmp_lib.stat().st_size},
            quantization=model.quantization.to_json() if model.quantization else {"scheme": "none"},
            cpu_features=required_features(tvm_target if not target.is_gpu else tvm_target.host),
            versions=_versions(),
            build={
                "compile_seconds": round(compile_s, 2),
                "tuning": tuning,
                "conv_kernels": kernels,
                **_mac_count(model),
                "host": platform.node(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        manifest.write(tmp_manifest)
    say(f"wrote {library} ({library.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return Artifact(library=library, manifest=manifest)


def _mac_count(model: ImportedModel) -> dict:
    """``{"macs": ...}``: the model's multiply-accumulates per layer and dtype
    (:mod:`qcompile.build.macs`; what ``qcompile explain`` divides by the peak), or nothing
    where the module cannot be read."""
    from qcompile.build.macs import count_macs

    try:
        return {"macs": count_macs(model.mod).to_json()}
    except Exception:  # noqa: BLE001 (an analysis for the report: never fails a build)
        return {}


def _report_tuning(tuning: dict, target: TargetSpec, say: Progress) -> None:
    if tuning.get("looked_in"):
        # Default schedules can be several times slower than tuned ones: a warning, not progress.
        print(f"warning: no tuning records for target {target.name!r} in {' or '.join(tuning['looked_in'])}; "
              "building with default schedules (`qcompile tune MODEL --target ...` writes records there)",
              file=sys.stderr)
    elif not tuning.get("database"):
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


# What to do about an output folder that cannot be written, by errno.
_WRITE_HINTS = {
    errno.ENOSPC: "free some space or give another folder with -o DIR",
    errno.EDQUOT: "free some space or give another folder with -o DIR",
    errno.EACCES: "fix its permissions or give another folder with -o DIR",
    errno.EPERM: "fix its permissions or give another folder with -o DIR",
    errno.EROFS: "its file system is mounted read-only: give another folder with -o DIR",
    errno.ENOTDIR: "a file stands where a folder is needed: give another folder with -o DIR",
    errno.EEXIST: "a file stands where a folder is needed: give another folder with -o DIR",
}


def write_error(out_dir: Path, exc: OSError) -> BuildError:
    """A BuildError for an OSError while writing the artifact: the folder (or the file outside
    it that failed, e.g. in TMPDIR), the errno text, and what to do."""
    code = errno.errorcode.get(exc.errno or 0, "")
    reason = f"{exc.strerror or exc}" + (f" ({code})" if code else "")
    hint = _WRITE_HINTS.get(exc.errno or 0, "give another folder with -o DIR")
    where = Path(str(exc.filename)) if exc.filename else None
    if where is not None and not where.resolve().is_relative_to(out_dir.resolve()) \
            and not out_dir.resolve().is_relative_to(where.resolve()):
        return BuildError(f"writing the artifact into {out_dir} failed at {where}: {reason} "
                          "(a temporary file: set TMPDIR to a folder with space)")
    return BuildError(f"cannot write to output folder {out_dir}: {reason}; {hint}")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def check_writable(out_dir: Path) -> None:
    """Fail early, with a BuildError naming ``out_dir``, when it cannot be created or written:
    create it, write and remove a probe file, and remove again the folders it created."""
    created = _missing_folders(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _probe_write(out_dir)
    except OSError as exc:
        raise write_error(out_dir, exc) from exc
    finally:
        _remove_empty(created)


def _probe_write(folder: Path) -> None:
    """Create, write and delete a small file in ``folder`` (raises OSError where it cannot)."""
    fd, probe = tempfile.mkstemp(prefix=".qcompile-probe-", dir=folder)
    try:
        os.write(fd, b"qcompile")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


@contextlib.contextmanager
def _atomic_outputs(out_dir: Path, finals: list[Path]) -> Iterator[list[Path]]:
    """Yield temporary paths in ``out_dir``; rename them onto ``finals`` only on success.
    On any failure nothing is left: no staging folder, no final file, no folder it created.
    An OSError (disk full, read-only, permissions) becomes a BuildError naming the folder."""
    created = _missing_folders(out_dir)
    staging: Path | None = None
    replaced: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".qcompile-", dir=out_dir))
        yield [staging / f.name for f in finals]
        for final in finals:
            os.replace(staging / final.name, final)
            replaced.append(final)
    except BaseException as exc:
        for final in replaced:  # a library beside a manifest of another build is worse than none
            with contextlib.suppress(OSError):
                final.unlink()
        if isinstance(exc, OSError):
            raise write_error(out_dir, exc) from exc
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)


def _versions() -> dict[str, str]:
    import tvm

    versions = {"qcompile": __version__, "tvm": tvm.__version__, "python": sys.version.split()[0]}
    try:
        import tvm_ffi

        versions["tvm_ffi"] = getattr(tvm_ffi, "__version__", "unknown")
    except ImportError:
        pass
    return versions


# ``qcompile.build(...)`` calls this package (qcompile.stage): the same as build() above.
make_callable(__name__)
