"""Tune: MetaSchedule (XGBoost cost model) over a model's kernels; records reused at build.

``tune(model, target, trials)`` is the stage's entry point (:mod:`.search`); calling the
package, ``qcompile.tune(model, target, trials)``, runs :func:`qcompile.api.tune`;
:mod:`.records` is what builds read, :mod:`.seeding` and :mod:`.workers` what the search
runs.  The search is imported on first use, so a build reading records never loads it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qcompile.stage import make_callable
from qcompile.tune.records import database_dir, log_root, open_database

if TYPE_CHECKING:
    from qcompile.tune.search import TuneResult, tune, tune_tasks

__all__ = ["TuneResult", "database_dir", "log_root", "open_database", "tune", "tune_tasks"]


def __getattr__(name: str):
    if name in ("TuneResult", "tune", "tune_tasks"):
        from qcompile.tune import search

        return getattr(search, name)
    raise AttributeError(f"module 'qcompile.tune' has no attribute {name!r}")


make_callable(__name__)
