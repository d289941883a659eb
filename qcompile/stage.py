"""Stage packages that are also the API's one-call functions.

``qcompile.quantize`` and ``qcompile.tune`` are both a subpackage (``from qcompile.quantize
import ...``) and a function (``qcompile.quantize(model, data, config)``).  A module attribute
cannot be both, so the package module itself is made callable: calling it calls the
function of the same name in :mod:`qcompile.api`.
"""
from __future__ import annotations

import importlib
import sys
import types


class StageModule(types.ModuleType):
    """A package whose call runs ``qcompile.api.<its name>``."""

    def __call__(self, *args, **kwargs):
        api = importlib.import_module("qcompile.api")
        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Turn the (already imported) module ``module_name`` into a :class:`StageModule`."""
    sys.modules[module_name].__class__ = StageModule
