"""How long a batch takes, forecast from the batches the worker has measured.

The scheduler needs to know, before a frame starts, when its result would be persisted: the time a
batch takes grows with its pixels (t = a + c * pixels: a fixed cost per batch, dominant on a GPU,
and a cost per pixel, dominant on a CPU). The fit uses only recent batches, so it follows a model
that slows down (a busy machine, a hot GPU), and it is scaled by the p90 ratio of measured to
fitted times, so that the forecast errs on the slow side of the noise.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

KEPT = 32  # recent batches the fit uses: a few seconds of work, so it follows a slowing model
SAFE_QUANTILE = 0.9  # the forecast covers this share of recent batches' deviation from the fit


@dataclass
class BatchTime:
    """Seconds for a batch of ``pixels`` (frames' width x height summed), from measured batches."""

    kept: int = KEPT
    _samples: deque[tuple[float, float]] = field(init=False)
    _fit: tuple[float, float, float] | None = field(default=None, init=False)  # a, c, margin
    _provisional: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._samples = deque(maxlen=self.kept)

    def add(self, pixels: float, seconds: float, provisional: bool = False) -> None:
        """Measure one batch; a ``provisional`` one (the warm-up, slowed by first-pass costs) serves
        only until the first real batch replaces it."""
        if pixels <= 0 or seconds < 0:
            return
        if self._provisional:
            self._samples.clear()
        self._provisional = provisional
        self._samples.append((float(pixels), float(seconds)))
        self._fit = None

    @property
    def measured(self) -> bool:
        return bool(self._samples)

    def predict(self, pixels: float) -> float:
        """The forecast seconds for ``pixels``; 0 before anything was measured."""
        if not self._samples:
            return 0.0
        fixed, per_pixel, margin = self._fit or self._refit()
        return (fixed + per_pixel * pixels) * margin

    def _refit(self) -> tuple[float, float, float]:
        xs = [x for x, _ in self._samples]
        ys = [y for _, y in self._samples]
        n = len(xs)
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        spread = sum((x - mean_x) ** 2 for x in xs)
        fixed, per_pixel = 0.0, mean_y / mean_x
        if spread > 0:  # batches of several sizes: least squares, clamped to non-negative costs
            slope = sum((x - mean_x) * (y - mean_y) for x, y in self._samples) / spread
            intercept = mean_y - slope * mean_x
            if slope >= 0 and intercept >= 0:
                fixed, per_pixel = intercept, slope
            elif slope < 0:
                fixed, per_pixel = mean_y, 0.0
        ratios = sorted(y / (fixed + per_pixel * x) for x, y in self._samples if fixed + per_pixel * x > 0)
        margin = max(1.0, ratios[min(len(ratios) - 1, int(SAFE_QUANTILE * len(ratios)))]) if ratios else 1.0
        self._fit = (fixed, per_pixel, margin)
        return self._fit
