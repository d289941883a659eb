"""Bad inputs and faults through the CLI: one ``error:`` line naming the problem and what to
do, the documented exit code, no traceback (unless ``--debug``), nothing half-written."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from qcompile.cli.main import main
from qcompile.errors import ArtifactError, BuildError, ConfigError, ModelImportError
from qcompile.manifest import manifest_path


@dataclass
class Result:
    code: int
    out: str
    err: str


def qcompile(*args) -> Result:
    """``qcompile ARGS`` in this process (stdout and stderr captured)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return Result(code, out.getvalue(), err.getvalue())


def error_line(result: Result, code: int, *fragments: str) -> str:
    """Assert ``result`` failed with ``code`` and one ``error:`` line holding ``fragments``
    (progress lines ``[ 1.2s] ...``, TVM's ``[hh:mm:ss]`` log lines and warnings aside)."""
    assert result.code == code, (result.code, result.err[-3000:])
    assert "Traceback" not in result.err, result.err[-3000:]
    lines = [ln for ln in result.err.strip().splitlines() if not ln.startswith(("[", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_pt2) -> Path:
    """tiny.pt2 built through the CLI -- a plain torch.export.save file, loaded without --trust-pt2."""
    out = tmp_path_factory.mktemp("artifact")
    result = qcompile("build", tiny_pt2, "-o", out, "--quiet")
    assert result.code == 0, result.err[-3000:]
    return out / "tiny.so"


# -- 1. --debug and internal errors -------------------------------------------------------


def _corrupt_artifact(folder: Path) -> Path:
    lib = folder / "broken.so"
    lib.write_bytes(b"\x7fELF")
    manifest_path(lib).write_text("{\"format\": ")
    return lib


def test_debug_prints_traceback_and_cause_only_when_asked(tmp_path):
    lib = _corrupt_artifact(tmp_path)
    plain = qcompile("info", lib)
    error_line(plain, ArtifactError.exit_code, "broken.manifest.json is corrupt", "rebuild")
    for argv in (("--debug", "info", lib), ("info", lib, "--debug")):
        debug = qcompile(*argv)
        assert debug.code == ArtifactError.exit_code
        assert "Traceback" in debug.err and "JSONDecodeError" in debug.err  # the chained cause
        assert "direct cause" in debug.err
        assert debug.err.strip().splitlines()[-1] == error_line(plain, ArtifactError.exit_code)


def test_unexpected_exception_is_one_internal_error_line(tmp_path, monkeypatch):
    from qcompile.cli import info

    def crash(_args):
        raise KeyError("boom")

    monkeypatch.setattr(info, "run", crash)
    line = error_line(qcompile("info", tmp_path / "x.so"), 1, "internal error: KeyError: 'boom'")
    assert line.endswith("(rerun with --debug for the traceback)")
    with pytest.raises(KeyError, match="boom"):
        qcompile("--debug", "info", tmp_path / "x.so")


# -- 2. typo'd LLVM CPU or feature ----------------------------------------------------------


@pytest.mark.parametrize("target, fragments", [
    ("llvm -mcpu=cortexa72", ["-mcpu=cortexa72", "cortex-a72"]),
    ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a27", ["-mcpu=cortex-a27", "aarch64-linux-gnu", "cortex-a72"]),
    ("llvm -mcpu=cortex-a76 -mattr=+neon,+dotprd", ["'dotprd'", "aarch64-linux-gnu", "dotprod"]),
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=skylake-avx51", ["-mcpu=skylake-avx51", "skylake-avx512"]),
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=haswell -mattr=+avx512vnnni", ["'avx512vnnni'", "avx512vnni"]),
    ("llvm -mcpu=native", ["-mcpu=native", "--target native"]),
    ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["neon"]}', ["+neon"]),
])
def test_unknown_llvm_cpu_or_feature_is_refused(tmp_path, tiny_pt2, target, fragments):
    out = tmp_path / "out"
    result = qcompile("build", tiny_pt2, "--target", target, "-o", out)
    error_line(result, ConfigError.exit_code, *fragments)
    assert "compiling" not in result.err and not out.exists()


def test_presets_and_native_still_resolve():
    from qcompile.target import list_presets, resolve_target

    names = {spec.name for spec in list_presets()}
    assert {"rpi4", "rpi5", "x86-avx2", "x86-avx512"} <= names
    assert resolve_target("rpi4").target["mcpu"] == "cortex-a72"
    assert resolve_target("llvm -mcpu=cortex-a76 -mattr=+neon,+dotprod").triple == "aarch64-linux-gnu"
    assert resolve_target("native").kind == "llvm"


# -- 3. an operator the pipeline cannot lower ----------------------------------------------
# (Through the library: no model the CLI imports keeps an operator TVM cannot lower.)


def test_unlowerable_operator_is_named():
    # TVM 0.27 lowers conv2d_transpose only in NCHW.  An imported ConvTranspose stays NCHW
    # (qcompile's layout conversion keeps it in the model's layout), so the model comes as
    # TVMScript with the op in NHWC, behind a conv that the kernels phase converts.
    from tvm.script import ir as I
    from tvm.script import relax as R

    from qcompile.build.pipeline import compile_module
    from qcompile.target import resolve_target

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 8, 8, 3), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 wt: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=(1, 1), data_layout="NHWC", kernel_layout="OHWI")
                up = R.nn.conv2d_transpose(R.nn.relu(y), wt, strides=(2, 2), padding=(1, 1), output_padding=(1, 1),
                                           data_layout="NHWC")
                R.output(up)
            return up

    with pytest.raises(BuildError) as info:
        compile_module(Module, resolve_target("native").to_tvm())
    message = str(info.value)
    for fragment in ("operator relax.nn.conv2d_transpose", "data_layout=NHWC", "strides=[2, 2]",
                     "inputs float32[1, 8, 8, 4]", "no lowering for target llvm", "change the model"):
        assert fragment in message, (fragment, message)
    assert "CodeGenVM" not in message and "R.nn" not in message


def test_unlowerable_operator_in_tvmscript_names_its_variable():
    from tvm.script import ir as I
    from tvm.script import relax as R

    from qcompile.build.pipeline import compile_module
    from qcompile.target import resolve_target

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 8, 8, 4), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                upsampled = R.nn.conv2d_transpose(x, w, strides=(2, 2), data_layout="NHWC")
                R.output(upsampled)
            return upsampled

    with pytest.raises(BuildError) as info:
        compile_module(Module, resolve_target("native").to_tvm())
    message = str(info.value)
    assert "relax.nn.conv2d_transpose (bound to upsampled;" in message
    assert "data_layout=NHWC" in message and "kernel_layout=IOHW" in message


# -- 4. an output folder that cannot be written --------------------------------------------


def test_output_folder_under_a_file_fails_before_compiling(tmp_path, tiny_pt2):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    result = qcompile("build", tiny_pt2, "-o", blocker / "out")
    error_line(result, BuildError.exit_code, f"cannot write to output folder {blocker / 'out'}",
               "Not a directory", "-o DIR")
    assert "compiling" not in result.err
    assert blocker.read_text() == "not a folder" and files_under(tmp_path) == ["results.txt"]


def test_read_only_output_folder_fails_before_compiling(tmp_path, tiny_pt2, monkeypatch):
    from qcompile import build

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() != 0:  # root writes anyway: there the file system's refusal is simulated
            error_line(qcompile("build", tiny_pt2, "-o", folder), BuildError.exit_code, "Permission denied")

        def read_only(where: Path) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(where))

        monkeypatch.setattr(build, "_probe_write", read_only)
        for out in (folder, tmp_path / "new" / "out"):
            result = qcompile("build", tiny_pt2, "-o", out)
            error_line(result, BuildError.exit_code, f"cannot write to output folder {out}",
                       os.strerror(errno.EROFS), "EROFS", "read-only")
            assert "compiling" not in result.err
        assert files_under(tmp_path) == ["ro"]  # new/out was created for the probe, and removed
    finally:
        folder.chmod(0o755)


def test_disk_full_during_export_leaves_nothing(tmp_path, tiny_pt2, monkeypatch):
    from qcompile.manifest import Manifest

    def half_written(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json())[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Manifest, "write", half_written)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    for out in (existing, tmp_path / "fresh"):
        result = qcompile("build", tiny_pt2, "-o", out, "--name", "tiny")
        error_line(result, BuildError.exit_code, f"cannot write to output folder {out}",
                   os.strerror(errno.ENOSPC), "ENOSPC", "free some space")
    # no .so, manifest or staging folder; the folder the build created is gone, the user's kept
    assert files_under(tmp_path) == ["existing", "existing/keep.txt"]


# -- 5. a truncated or corrupt tuning database ---------------------------------------------


def _small_database(path: Path) -> None:
    """A one-record MetaSchedule database in ``path``."""
    import tvm
    from tvm import s_tir, te
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune.records import open_database

    a = te.placeholder((4,), name="a")
    b = te.compute((4,), lambda i: a[i] + 1.0, name="b")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    database = open_database(path)
    workload = database.commit_workload(mod)
    sch = s_tir.Schedule(mod)
    sch.get_sblock("b")
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-6], tvm.target.Target("llvm")))


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "line 1 is cut short: an interrupted write?"),
    ("garbage", "line 1, column 1: Expecting value"),
])
def test_unreadable_tuning_records_warn_and_build_untuned(tmp_path, tiny_pt2, damage, reason):
    from qcompile.target import resolve_target
    from qcompile.tune.records import database_dir

    logs = tmp_path / "logs"
    database = database_dir(resolve_target("native"), logs)
    _small_database(database)
    if damage == "truncate":  # what a killed writer leaves: the last record cut off
        broken = database / "database_tuning_record.json"
        broken.write_bytes(broken.read_bytes()[:60])
    else:
        broken = database / "database_workload.json"
        broken.write_text("not json\n")
    out = tmp_path / "out"
    result = qcompile("build", tiny_pt2, "-o", out, "--log-dir", logs)
    assert result.code == 0, result.err[-3000:]
    warnings = [ln for ln in result.err.splitlines() if ln.startswith("warning: tuning records")]
    expected = (f"warning: tuning records in {broken} are unreadable ({reason}); building without them "
                "(re-tune, or move the file aside)")
    assert warnings == [expected], result.err
    manifest = json.loads(manifest_path(out / "tiny.so").read_text())
    assert manifest["build"]["tuning"]["unreadable"] == str(broken)


# -- 6. Ctrl-C during tune -----------------------------------------------------------------


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT handled by default in the child, as in a terminal: a shell starts background jobs
    (CI steps among them) with SIGINT ignored, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_interrupted_tune_keeps_records_and_resumes(tmp_path, tiny_pt2):
    from qcompile.target import resolve_target
    from qcompile.tune.records import database_dir, open_database

    logs = tmp_path / "logs"
    database = database_dir(resolve_target("native"), logs)
    database.mkdir(parents=True)
    for name in ("database_workload.json", "database_tuning_record.json"):  # empty: no packaged records
        (database / name).write_text("")
    records = database / "database_tuning_record.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    argv = [sys.executable, "-m", "qcompile.cli.main", "tune", str(tiny_pt2), "--trials", "12",
            "--max-trials-per-task", "2", "--log-dir", str(logs)]

    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 600
    while first.poll() is None and _count_lines(records) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[1][-3000:]
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    kept = _count_lines(records)
    assert first.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: interrupted; {kept} records kept in {database}, re-run to resume"
    assert "Traceback" not in err
    assert kept >= 1 and len(open_database(database)) == kept  # MetaSchedule reads them all
    tasks = int(re.search(r"(\d+) tuning tasks", err).group(1))
    assert files_under(scratch) == []  # no candidate or staging folders left

    # The re-run seeds only the kernels without a record, then is interrupted in turn.
    second = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_ctrl_c_as_in_a_terminal)
    lines = []
    for line in second.stderr:
        lines.append(line)
        if "kernels seeded" in line:
            break
    seeded = re.search(r"(\d+) kernels seeded", "".join(lines))
    assert seeded is not None, "".join(lines)[-3000:]
    assert int(seeded.group(1)) <= tasks - kept
    second.send_signal(signal.SIGINT)
    _, rest = second.communicate(timeout=300)
    assert second.returncode in (0, 130), rest[-3000:]
    assert _count_lines(records) >= tasks  # every kernel has its record now
    assert files_under(scratch) == []


# -- 7. a manifest from a newer qcompile or another TVM ------------------------------------


def _edited_copy(artifact: Path, folder: Path, edit) -> Path:
    lib = folder / artifact.name
    shutil.copy(artifact, lib)
    manifest = json.loads(manifest_path(artifact).read_text())
    edit(manifest)
    manifest_path(lib).write_text(json.dumps(manifest))
    return lib


def test_manifest_of_a_newer_format_is_refused(artifact, tmp_path):
    lib = _edited_copy(artifact, tmp_path, lambda m: m.update(format="qcompile-manifest/2"))
    outputs = tmp_path / "outputs.npz"
    for argv in (("run", lib, "--outputs", outputs), ("info", lib)):
        error_line(qcompile(*argv), ArtifactError.exit_code, str(manifest_path(lib)),
                   "written by a newer qcompile (format 2, this one reads 1)", "upgrade qcompile or rebuild")
    assert not outputs.exists()


def test_artifact_built_with_another_tvm_is_refused(artifact, tmp_path):
    import tvm

    lib = _edited_copy(artifact, tmp_path, lambda m: m["versions"].update(tvm="0.19.0"))
    outputs = tmp_path / "outputs.npz"
    for argv in (("run", lib, "--outputs", outputs), ("info", lib)):
        error_line(qcompile(*argv), ArtifactError.exit_code, "built with TVM 0.19.0",
                   f"TVM runtime is {tvm.__version__}", "rebuild it with this TVM", "install TVM 0.19.0")
    assert not outputs.exists()


# -- 8. .pt2 files that would run code when loaded -----------------------------------------


class _Payload:
    """Unpickling this runs a shell command (what a malicious .pt2 member would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pt2_with_pickled_code_is_refused_unless_trusted(tmp_path, tiny_pt2, artifact):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(tiny_pt2) as src:
        members = {name: src.read(name) for name in src.namelist()}
    # The weights config marks the first weight as pickled; its member becomes the payload.
    config_name = next(name for name in members if name.endswith("model_weights_config.json"))
    config = json.loads(members[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    members[config_name] = json.dumps(config).encode()
    pickled = str(Path(config_name).parent / first["path_name"])
    members[pickled] = pickle.dumps(_Payload(f"touch {marker}"))
    with zipfile.ZipFile(evil, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)

    out = tmp_path / "out"
    for command in ("build", "tune"):
        result = qcompile(command, evil, "-o" if command == "build" else "--log-dir", out)
        error_line(result, ModelImportError.exit_code, str(evil), "pickled objects", "--trust-pt2", pickled)
        assert not marker.exists() and not out.exists()
    # the help says what trusting means
    help_text = qcompile("build", "--help").out
    assert "--trust-pt2" in help_text and "can run code" in " ".join(help_text.split())
    assert artifact.is_file()  # tiny.pt2 (a plain torch.export.save file) built without the flag
