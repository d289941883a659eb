"""Tuning records: where they live and how a build applies them.

Records are kept in MetaSchedule's JSON database format under
``<log root>/<target label>-<hash of the target dict>/tvm-<version>/``, so a record is only
offered to builds for the same code-generation attributes (triple, mcpu, mattr) and TVM
version; the core count is not part of the key (a kernel's code does not depend on it: its
parallel loops are split over the threads of the process that runs it).  Inside a database
MetaSchedule keys each record by the structural hash of its workload.
The build reads records through this module only; it never imports the tuner.

The log root is ``--log-dir``, else ``QCOMPILE_TUNING_LOGS``, else the records shipped in
the package (``qcompile/tuning_logs``, read-only).  ``qcompile tune`` writes to
``--log-dir`` / ``QCOMPILE_TUNING_LOGS`` or ``./tuning_logs``: never into the package.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import tvm

from qcompile.errors import ConfigError, first_line
from qcompile.target import TargetSpec

# Records shipped with the package (read-only: an installed package may sit in site-packages).
PACKAGED_ROOT = Path(__file__).resolve().parent.parent / "tuning_logs"


def user_root() -> Path:
    """Where ``qcompile tune`` writes without ``--log-dir``: ``QCOMPILE_TUNING_LOGS``, else
    ``$XDG_CACHE_HOME/qcompile/tuning_logs`` (``~/.cache/qcompile/tuning_logs``)."""
    env = os.environ.get("QCOMPILE_TUNING_LOGS")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "qcompile" / "tuning_logs"


def log_root() -> Path:
    """The root a build without ``--log-dir`` reads first (:func:`user_root`)."""
    return user_root()


def has_database(path: Path) -> bool:
    return (path / "database_workload.json").is_file()


def find_database(target: TargetSpec, root: Path | None = None) -> Path | None:
    """The records a build for ``target`` applies: ``root``'s when given; otherwise the user's
    (:func:`user_root`, what ``qcompile tune`` wrote) where they exist, else the packaged ones."""
    return next((path for path in looked_in(target, root) if has_database(path)), None)


def writable_database(target: TargetSpec, root: Path | None = None) -> Path:
    """Where ``qcompile tune`` appends records for ``target``: under ``root`` or
    :func:`user_root`, never inside the package.  A new folder starts as a copy of the
    packaged records for the target, so tuning continues from them."""
    import shutil

    path = database_dir(target, root or user_root())
    installed = "site-packages" in PACKAGED_ROOT.resolve().parts or "dist-packages" in PACKAGED_ROOT.resolve().parts
    if installed and path.resolve().is_relative_to(PACKAGED_ROOT.resolve()):
        raise ConfigError(f"--log-dir {root}: the installed package's records are read-only; "
                          "give a folder of your own (builds read it with the same --log-dir)")
    packaged = database_dir(target, PACKAGED_ROOT)
    if not has_database(path) and has_database(packaged) and packaged.resolve() != path.resolve():
        path.mkdir(parents=True, exist_ok=True)
        for name in ("database_workload.json", "database_tuning_record.json"):
            if (packaged / name).is_file():
                shutil.copyfile(packaged / name, path / name)
    return path


def database_dir(target: TargetSpec, root: Path | None = None) -> Path:
    """Where records for ``target`` and this TVM version are kept."""
    # Keyed by what the code depends on (the target dict), not by how it was named:
    # `--target native` on an AVX2 2-core machine and an identical preset share records.
    key = json.dumps({"target": _codegen_attrs(target.target), "host": _codegen_attrs(target.host)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    label = f"{target.kind}-{target.target.get('mcpu', 'generic')}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40]
    return (root or user_root()) / f"{safe}-{digest}" / f"tvm-{tvm.__version__}"


def _codegen_attrs(target: dict | None) -> dict | None:
    """The target dict without what does not change the generated code (the core count)."""
    if target is None:
        return None
    return {k: v for k, v in target.items() if k != "num-cores"}


def looked_in(target: TargetSpec, root: Path | None = None) -> list[Path]:
    """The folders :func:`find_database` reads for ``target``, in order."""
    return [database_dir(target, root)] if root is not None else [
        database_dir(target, user_root()), database_dir(target, PACKAGED_ROOT)]


DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


class UnreadableDatabase(Exception):
    """A tuning database whose files TVM cannot parse (truncated, edited, another format).
    ``file`` is the file at fault (the folder when it cannot be told)."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


def locate_damage(path: Path) -> tuple[Path, str] | None:
    """The first file and line of the database in ``path`` that is not a JSON array (what a
    truncated write or an edit leaves), as ``(file, reason)``; None when every line parses."""
    for name in DATABASE_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            with open(file, encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        if not isinstance(json.loads(line), list):
                            return file, f"line {number} is not a record"
                    except json.JSONDecodeError as exc:
                        if not line.endswith("\n"):  # the last line, and incomplete
                            return file, f"line {number} is cut short: an interrupted write?"
                        return file, f"line {number}, column {exc.colno}: {exc.msg}"
        except (OSError, UnicodeDecodeError) as exc:
            return file, str(exc)
    return None


def open_database(path: Path):
    """MetaSchedule's JSONDatabase in ``path`` (created if missing); raises
    :class:`UnreadableDatabase` naming the damaged file when its records cannot be parsed."""
    from tvm.s_tir import meta_schedule as ms

    # Records of tensorized kernels name qcompile's intrinsics: they must be registered
    # before the database parses its traces.
    from qcompile.kernels import int8_dot  # noqa: F401
    path.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as exc:  # TVM parses every line at once and reports no file: find it
        damage = locate_damage(path)
        if damage is None:
            raise UnreadableDatabase(path, first_line(exc)) from exc
        file, reason = damage
        raise UnreadableDatabase(file, reason) from exc


def _warn_unreadable(what: str, reason: str) -> None:
    print(f"warning: tuning records in {what} are unreadable ({reason}); building without them "
          "(re-tune, or move the file aside)", file=sys.stderr)


def apply_database_passes(target: TargetSpec, root: Path | None, report: dict) -> list:
    """Passes for the end of the legalize phase: apply matching records, count hits/misses."""
    path = find_database(target, root)
    if path is None:
        report.update({"database": None, "hits": 0, "misses": None,
                       "looked_in": [str(p) for p in looked_in(target, root)]})
        return []
    try:
        database = open_database(path)
    except UnreadableDatabase as exc:  # records only make kernels faster: build without them
        _warn_unreadable(str(exc.file), exc.reason)
        report.update({"database": None, "hits": 0, "misses": None, "unreadable": str(exc.file)})
        return []

    @tvm.transform.module_pass(opt_level=0, name="QcompileApplyTuningRecords")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from tvm import relax, tirx

        target_obj = tvm.target.Target.current()
        hits = misses = 0
        try:
            for func in mod.functions.values():
                if not isinstance(func, tirx.PrimFunc):
                    continue
                # Workloads are keyed with global_symbol "main", as MetaSchedule extracted them.
                probe = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
                found = database.query_schedule(probe, target_obj, workload_name="main")
                hits, misses = (hits + 1, misses) if found is not None else (hits, misses + 1)
            with target_obj, database:
                applied = relax.transform.MetaScheduleApplyDatabase()(mod)
        except Exception as exc:  # noqa: BLE001 -- a record whose trace no longer replays
            _warn_unreadable(str(path), f"replaying them failed: {first_line(exc)}")
            report.update({"database": None, "hits": 0, "misses": None, "unreadable": str(path)})
            return mod
        report.update({"database": str(path), "hits": hits, "misses": misses})
        return applied

    return [apply]


def extract_tasks(model, target: TargetSpec) -> list:
    """The kernels a build of ``model`` (an ImportedModel) for ``target`` looks up in the
    records: MetaSchedule's tasks from the fused TIR of the build's legalize phase, where
    ``qcompile tune`` extracts them and the build applies the records."""
    from tvm.s_tir import meta_schedule as ms

    from qcompile.build.pipeline import phases_through, run_phases

    tvm_target = target.to_tvm()
    mod = run_phases(model.mod, tvm_target, phases=phases_through("legalize"))
    return ms.relax_integration.extract_tasks(mod, tvm_target)


def compact_workloads(file: Path) -> None:
    """Rewrite a ``database_workload.json`` with each workload's IR JSON unindented.

    Each line is ``[structural hash, base64(8-byte little-endian length + IR JSON)]``; TVM
    writes that JSON indented (most of the file is spaces).  Whitespace changes neither the
    IR it loads nor the hash records are matched by."""
    import base64
    import struct

    lines = []
    for line in file.read_text().splitlines():
        key, blob = json.loads(line)
        raw = base64.b64decode(blob)
        (size,) = struct.unpack("<Q", raw[:8])
        ir = json.dumps(json.loads(raw[8:8 + size]), separators=(",", ":")).encode()
        lines.append(json.dumps([key, base64.b64encode(struct.pack("<Q", len(ir)) + ir).decode()]))
    file.write_text("\n".join(lines) + "\n")


def rewrite_database(path: Path, records) -> int:
    """Replace the database in ``path`` by ``records`` (TuningRecords, read before the files
    are replaced), its workload file compacted; returns how many were written."""
    import shutil
    import tempfile

    from tvm.s_tir import meta_schedule as ms

    records = list(records)
    with tempfile.TemporaryDirectory() as tmp:
        new = open_database(Path(tmp))
        for record in records:
            new.commit_tuning_record(ms.database.TuningRecord(
                record.trace, new.commit_workload(record.workload.mod), record.run_secs, record.target,
                record.args_info))
        compact_workloads(Path(tmp) / DATABASE_FILES[0])
        for name in DATABASE_FILES:
            shutil.copyfile(Path(tmp) / name, path / name)
    return len(records)


def prune(path: Path, workloads, top: int = 3, extra_records=()) -> tuple[int, int]:
    """Rewrite the database in ``path`` to hold ``extra_records`` and the ``top`` fastest
    successful records of each of ``workloads`` (IRModules, e.g. the ``dispatched[0]`` of
    :func:`extract_tasks`' tasks); records of any other workload are dropped.  Returns
    ``(records kept from the database, records it held before)``."""
    database = open_database(path)
    before = len(database)
    kept = []
    for mod in workloads:
        if database.has_workload(mod):
            kept.extend(database.get_top_k(database.commit_workload(mod), top))
    rewrite_database(path, list(extra_records) + kept)
    return len(kept), before
