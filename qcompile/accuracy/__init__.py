"""Accuracy tools: evaluate a built library on labelled data or against a reference."""
from __future__ import annotations

from qcompile.accuracy.dataset import EvalData, load_eval_data
from qcompile.accuracy.evaluate import EvalResult, evaluate
from qcompile.accuracy.metrics import Agreement, TopK, cosine, sqnr_db

__all__ = ["Agreement", "EvalData", "EvalResult", "TopK", "cosine", "evaluate", "load_eval_data", "sqnr_db"]
