"""Accuracy figures: top-k against labels, and agreement of two models' outputs.

Agreement is what ONNX Runtime's ``qdq_loss_debug`` and NNCF report for a quantized model
against its float original: SQNR in dB (``10 log10(sum ref^2 / sum (out - ref)^2)`` over all
samples), cosine similarity per sample (lowest and mean), the largest absolute difference
and, for outputs with a class axis, the share of samples whose top-1 class agrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class TopK:
    """Running top-1 / top-5 counts over rows of class scores."""

    def __init__(self) -> None:
        self.n = self.top1 = self.top5 = 0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        rows = scores.reshape(len(labels), -1)
        best = np.argsort(-rows, axis=1, kind="stable")[:, :5]
        self.n += len(labels)
        self.top1 += int(np.sum(best[:, 0] == labels))
        self.top5 += int(np.sum(np.any(best == labels[:, None], axis=1)))

    def result(self) -> tuple[float, float]:
        """(top-1 %, top-5 %)."""
        return 100.0 * self.top1 / max(self.n, 1), 100.0 * self.top5 / max(self.n, 1)


@dataclass
class Agreement:
    """Running agreement of one output with its reference, sample by sample."""

    signal: float = 0.0
    noise: float = 0.0
    max_abs_diff: float = 0.0
    cosines: list[float] = field(default_factory=list)
    top1_same: int = 0
    rows: int = 0

    def update(self, out: np.ndarray, ref: np.ndarray) -> None:
        a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output shape {list(a.shape)} differs from the reference's {list(b.shape)}")
        self.signal += float(np.sum(b * b))
        self.noise += float(np.sum((a - b) ** 2))
        self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(a - b))) if a.size else 0.0)
        self.cosines.append(cosine(a, b))
        if a.ndim >= 2 and a.shape[-1] > 1:
            rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            self.top1_same += int(np.sum(rows_a.argmax(1) == rows_b.argmax(1)))
            self.rows += len(rows_a)

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal else -math.inf

    def to_json(self) -> dict:
        out = {"sqnr_db": round(self.sqnr_db, 3) if math.isfinite(self.sqnr_db) else self.sqnr_db,
               "cosine_min": round(min(self.cosines), 6) if self.cosines else None,
               "cosine_mean": round(float(np.mean(self.cosines)), 6) if self.cosines else None,
               "max_abs_diff": self.max_abs_diff}
        if self.rows:
            out["top1_agreement"] = round(100.0 * self.top1_same / self.rows, 3)
        return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays (1.0 for two all-zero arrays)."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB."""
    agreement = Agreement()
    agreement.update(out, ref)
    return agreement.sqnr_db
