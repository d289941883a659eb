"""qcompile's error hierarchy and exit codes, in one place.

Every error a user can cause derives from :class:`QcompileError`; the CLI prints its
message on one line ("error: ...") and exits with the class's ``exit_code``, never a
traceback (unless ``--debug``).  Messages name the file, operator, option or shape at
fault and say what to do.

=====  ===========================  ==============================================
code   class                        cause
=====  ===========================  ==============================================
1      QcompileError                anything else qcompile reports
2      ConfigError                  a bad option, target or configuration value
3      ModelImportError             a model that is missing, corrupt or unsupported
4      BuildError                   compiling or exporting failed
5      RuntimeInputError            inputs of the wrong name, shape or dtype
6      ArtifactError                a built artifact missing, corrupt or mismatched
7      MissingDependencyError       an optional package or tool is not installed
8      MismatchError                ``compare --atol`` exceeded
9      CalibrationError             calibration data empty, non-finite or misshapen
10     TuningError                  tuning failed
11     RpcError                     an RPC server/tracker unreachable or failing
12     AccuracyBudgetError          no int8/float mix meets ``--accuracy-budget``
130    (KeyboardInterrupt)          interrupted with Ctrl-C
=====  ===========================  ==============================================
"""
from __future__ import annotations

import re


class QcompileError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(QcompileError, ValueError):
    """A bad option: unknown target, malformed --input-shape, conflicting flags, bad config value."""

    exit_code = 2


class ModelImportError(QcompileError):
    """A model that is missing, corrupt, unsupported or has undeterminable shapes."""

    exit_code = 3


class BuildError(QcompileError):
    """Compilation or export failed (an operator that cannot be lowered, a missing
    cross-compiler, an output folder that cannot be written)."""

    exit_code = 4


class RuntimeInputError(QcompileError):
    """Wrong input names, shapes or dtypes given to a built artifact."""

    exit_code = 5


class ArtifactError(QcompileError):
    """A built artifact that is missing, corrupt, from another version, or does not match its manifest."""

    exit_code = 6


class MissingDependencyError(QcompileError):
    """An optional tool or package is needed but not installed."""

    exit_code = 7


class MismatchError(QcompileError):
    """``qcompile compare --atol``: the artifact's outputs differ from the framework's."""

    exit_code = 8


class CalibrationError(QcompileError):
    """Calibration data that is empty, non-finite or of the wrong shape."""

    exit_code = 9


class TuningError(QcompileError):
    """Tuning failed (MetaSchedule, its workers or the measuring device)."""

    exit_code = 10


class RpcError(QcompileError):
    """An RPC server or tracker that is unreachable, refuses, times out or dies."""

    exit_code = 11


class AccuracyBudgetError(QcompileError):
    """``--accuracy-budget``: no mix of int8 and float layers meets the budget."""

    exit_code = 12


EXIT_CODES: dict[str, int] = {cls.__name__: cls.exit_code for cls in (
    QcompileError, ConfigError, ModelImportError, BuildError, RuntimeInputError, ArtifactError,
    MissingDependencyError, MismatchError, CalibrationError, TuningError, RpcError, AccuracyBudgetError)}

# Lines of TVM's error text that are not the message: traceback frames, TVMScript dumps.
_NOISE = re.compile(r"^(File \"|Traceback|\d+: |  |# from tvm|# Metadata omitted|@|class |def |R\.|T\.|return )")
_TVM_KIND = re.compile(r"^(?:tvm\.\w+\.)?(\w*Error): ")


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The message of a (possibly multi-line, traceback- or TVMScript-carrying) exception.

    TVM's errors print a C++/Python traceback, then ``XxxError: message``, sometimes followed
    by a TVMScript dump of the module ("# Metadata omitted ...").  Keep the first line that
    reads as the message: one with an error kind, else the first line that is not noise."""
    lines = [ln.rstrip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        match = _TVM_KIND.match(line.strip())
        if match:
            return line.strip()[match.end():][:limit] or match.group(1)
    for line in lines:
        if not _NOISE.match(line):
            return line.strip()[:limit]
    return (lines[0].strip() if lines else type(exc).__name__)[:limit]
