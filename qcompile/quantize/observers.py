"""Range observers: streaming statistics of a tensor over calibration batches.

Memory stays bounded however much data is seen: min/max, or a fixed-size histogram
whose range doubles (merging bin pairs) when new values fall outside it.  The histogram
methods pick the clipping range from it:

* ``percentile``: clip at a percentile of the distribution (both tails for signed data);
* ``entropy``: TensorRT's KL-divergence threshold over |x| (127 levels per side for
  signed data, 255 for non-negative data, which uint8 covers with 255 steps);
* ``mse``: the threshold minimising expected squared error (clipping + rounding noise).

Add a method by adding an entry to :data:`OBSERVERS`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class MinMaxObserver:
    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, x: np.ndarray) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class HistogramObserver:
    """A symmetric histogram over [-limit, limit] with 2 * BINS bins, plus min/max."""

    BINS = 2048

    def __init__(self, method: str, percentile: float = 99.99) -> None:
        self.method = method
        self.percentile = percentile
        self.minmax = MinMaxObserver()
        self.limit = 0.0
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
        if self.hist.sum() == 0:
            return lo, hi
        if self.method == "percentile":
            return self._percentile(lo, hi)
        if self.method == "entropy":  # uint8 spans [0, T] with 255 steps; signed data gets 127 per side
            threshold = self._entropy_threshold(127 if lo < 0 else 255)
        else:
            threshold = self._mse_threshold(lo < 0)
        return max(lo, -threshold), min(hi, threshold)

    def _percentile(self, lo: float, hi: float) -> tuple[float, float]:
        edges = np.linspace(-self.limit, self.limit, 2 * self.BINS + 1)
        cdf = np.cumsum(self.hist) / self.hist.sum()
        tail = (100.0 - self.percentile) / 100.0
        clip_lo = float(edges[np.searchsorted(cdf, tail / 2 if lo < 0 else 0.0)])
        clip_hi = float(edges[min(np.searchsorted(cdf, 1.0 - (tail / 2 if lo < 0 else tail)) + 1, len(edges) - 1)])
        return max(lo, clip_lo), min(hi, clip_hi)

    def _abs_hist(self) -> np.ndarray:
        """Histogram of |x| over [0, limit] with BINS bins."""
        return self.hist[self.BINS:] + self.hist[:self.BINS][::-1]

    def _entropy_threshold(self, levels: int = 128) -> float:
        hist = self._abs_hist().astype(np.float64)
        width = self.limit / self.BINS
        last = int(np.nonzero(hist)[0].max()) + 1
        if last <= levels:
            return last * width
        best, best_kl = last, np.inf
        for i in range(levels, last + 1, max(1, (last - levels) // 256)):
            ref = hist[:i].copy()
            ref[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
            chunks = np.array_split(hist[:i], levels)
            expanded = np.concatenate([
                np.where(c > 0, c.sum() / max(np.count_nonzero(c), 1), 0.0) for c in chunks
            ])
            p, q = ref / ref.sum(), expanded / max(expanded.sum(), 1e-12)
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best, best_kl = i, kl
        return (best + 0.5) * width

    def _mse_threshold(self, signed: bool) -> float:
        hist = self._abs_hist().astype(np.float64)
        width = self.limit / self.BINS
        centres = (np.arange(self.BINS) + 0.5) * width
        amax = centres[int(np.nonzero(hist)[0].max())] + width / 2
        steps = 255.0 if not signed else 254.0  # levels across [-T, T] (signed) or [0, T]
        best, best_err = amax, np.inf
        for threshold in np.linspace(amax * 0.2, amax, 100):
            step = (2 * threshold if signed else threshold) / steps
            clipped = np.maximum(centres - threshold, 0.0) ** 2
            err = float(np.sum(hist * (clipped + (centres <= threshold) * step * step / 12.0)))
            if err < best_err:
                best, best_err = threshold, err
        return float(best)


OBSERVERS: dict[str, Callable[[float], object]] = {
    "minmax": lambda _percentile: MinMaxObserver(),
    "percentile": lambda percentile: HistogramObserver("percentile", percentile),
    "entropy": lambda _percentile: HistogramObserver("entropy"),
    "mse": lambda _percentile: HistogramObserver("mse"),
}


def make_observer(method: str, percentile: float):
    return OBSERVERS[method](percentile)
