"""Range observers: streaming statistics of a tensor over calibration batches.

Memory stays bounded however much data is seen: min/max, or a fixed-size histogram
whose range doubles (merging bins) when new values fall outside it.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


class MinMaxObserver:
    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, x: np.ndarray) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class PercentileObserver:
    """Clips the range to the given percentile of |x| (both tails for signed data)."""

    BINS = 2048

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.minmax = MinMaxObserver()
        self.limit = 0.0  # histogram covers [-limit, limit]
        self.hist = np.zeros(2 * self.BINS, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        self.minmax.update(x)
        amax = float(np.abs(x).max())
        if self.limit == 0.0:
            self.limit = amax if amax > 0 else 1.0
        while amax > self.limit:  # double the range: merge pairs of bins towards the centre
            half = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros_like(self.hist)
            self.hist[self.BINS // 2: self.BINS // 2 + self.BINS] = half
            self.limit *= 2.0
        counts, _ = np.histogram(x, bins=2 * self.BINS, range=(-self.limit, self.limit))
        self.hist += counts

    def range(self) -> tuple[float, float]:
        lo, hi = self.minmax.range()
        total = self.hist.sum()
        if total == 0:
            return lo, hi
        edges = np.linspace(-self.limit, self.limit, 2 * self.BINS + 1)
        cdf = np.cumsum(self.hist) / total
        tail = (100.0 - self.percentile) / 100.0
        clip_lo = float(edges[np.searchsorted(cdf, tail / 2 if lo < 0 else 0.0)])
        clip_hi = float(edges[np.searchsorted(cdf, 1.0 - (tail / 2 if lo < 0 else tail)) + 1])
        return max(lo, clip_lo), min(hi, clip_hi)


def make_observer(method: str, percentile: float):
    if method == "minmax":
        return MinMaxObserver()
    if method == "percentile":
        return PercentileObserver(percentile)
    raise ConfigError(f"unknown calibration method {method!r}")
