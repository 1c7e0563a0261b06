"""Percentile calibration: clip at a percentile of ``|x|`` read from a streaming histogram."""
from __future__ import annotations

from esc.calibrators.base import StatisticCalibrator
from esc.calibrators.histogram import HistogramObserver, histogram_percentile
from esc.quant.quantizer import QuantizationError, UniformQuantizer


class PercentileObserver(HistogramObserver):
    """Histogram of ``|x|`` whose clip is a percentile of it."""

    def __init__(self, quantizer: UniformQuantizer, percentile: float, num_bins: int = 2048, max_bins: int | None = None) -> None:
        super().__init__(quantizer, num_bins, max_bins)
        self.percentile = percentile

    def clip_range(self):
        """``c`` = the percentile of ``|x|`` (capped at the exact ``max |x|``); see :func:`histogram_percentile`."""
        if self.hist is None:
            return self.symmetric_to_range(0.0)
        c = min(histogram_percentile(self.hist, self.width, self.percentile), self.amax)
        return self.symmetric_to_range(c)


class PercentileCalibrator(StatisticCalibrator):
    """Clip each activation at the ``percentile``-th percentile of ``|x|`` over the calibration set.

    Definition: one FP pass fills a :class:`~esc.calibrators.histogram.HistogramObserver` of ``|x|``
    per quantizer (``num_bins`` fixed-width bins over the first batch's range, grown by appending
    bins of the same width). The clip ``c`` is the percentile of that histogram with the CDF taken
    linear inside each bin (:func:`~esc.calibrators.histogram.histogram_percentile`), capped at the
    exact observed ``max |x|``; its error versus the exact sample percentile is at most one bin
    width. Symmetric quantizers get ``[-c, c]``; asymmetric ones get ``[-c, c]`` intersected with
    the observed ``[min, max]``. Per-tensor quantizers only.

    Args:
        percentile: in (0, 100]; 99.99 by default.
        num_bins: histogram bins spanned by the first batch (2048).
        max_bins: cap on bins after growth (default ``16 * num_bins``).
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048, max_bins: int | None = None) -> None:
        if not 0.0 < percentile <= 100.0:
            raise QuantizationError(f"percentile={percentile} must be in (0, 100]")
        self.percentile = float(percentile)
        self.num_bins = int(num_bins)
        self.max_bins = max_bins

    def make_observer(self, quantizer: UniformQuantizer) -> PercentileObserver:
        return PercentileObserver(quantizer, self.percentile, self.num_bins, self.max_bins)
