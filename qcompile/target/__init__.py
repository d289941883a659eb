"""Targets: presets shipped with the package, JSON, TVMC-style strings and ``native``.

``resolve_target(spec)`` turns any of them into a :class:`TargetSpec`, the one target type
every stage takes (``TargetSpec | str`` wherever a target is asked for).
"""
from __future__ import annotations

from qcompile.target.spec import (
    TargetSpec,
    list_presets,
    parse_tvmc_string,
    presets_dir,
    resolve_target,
)

__all__ = ["TargetSpec", "as_target", "list_presets", "parse_tvmc_string", "presets_dir", "resolve_target"]


def as_target(target: "TargetSpec | str") -> TargetSpec:
    """``target`` itself, or the :class:`TargetSpec` a string names."""
    return target if isinstance(target, TargetSpec) else resolve_target(target)
