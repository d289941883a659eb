"""qcompile's error hierarchy.

Every error a user can cause derives from :class:`QcompileError`; the CLI prints its
message on one line ("error: ...") and exits with the class's ``exit_code``, never a
traceback.  Messages name the file, operator or option at fault and say what to do.
"""
from __future__ import annotations


class QcompileError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(QcompileError):
    """A bad option: unknown target, malformed --input-shape, conflicting flags."""

    exit_code = 2


class ModelImportError(QcompileError):
    """A model that is missing, corrupt, unsupported or has undeterminable shapes."""

    exit_code = 3


class BuildError(QcompileError):
    """Compilation or export failed (including a missing cross-compiler)."""

    exit_code = 4


class RuntimeInputError(QcompileError):
    """Wrong input names, shapes or dtypes given to a built artifact."""

    exit_code = 5


class ArtifactError(QcompileError):
    """A built artifact that is missing, corrupt, or does not match its manifest."""

    exit_code = 6


class MissingDependencyError(QcompileError):
    """An optional tool or package is needed but not installed."""

    exit_code = 7


class CalibrationError(QcompileError):
    """Calibration data that is empty, non-finite or of the wrong shape."""

    exit_code = 9


class RpcError(QcompileError):
    """An RPC server or tracker that is unreachable, refuses, times out or dies."""

    exit_code = 11


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The message part of a (possibly multi-line, traceback-carrying) exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # TVM errors carry a C++ traceback before the message; the last line is the message.
    return (lines[-1] if lines else type(exc).__name__)[:limit]
