"""Streaming histogram of ``|x|`` shared by the percentile and entropy calibrators.

Definition (exact, so that results do not depend on how the calibration set is batched beyond
what is stated here):

* Bins are right-closed intervals of a fixed width ``w`` anchored at 0: bin 0 is ``[0, w]`` and
  bin ``k >= 1`` is ``(k w, (k+1) w]``. A value ``v = |x|`` falls in bin ``ceil(v / w) - 1``
  (``0`` for ``v = 0``). Right-closed bins keep the running maximum inside the last bin.
* The first batch with a non-zero maximum ``m1`` fixes ``w = m1 / num_bins`` (so it spans
  ``num_bins`` bins exactly); all-zero batches before it are counted in bin 0 once ``w`` exists.
* **Growth** (TensorRT / ModelOpt style): when a later batch has a larger maximum ``m``, the bin
  width stays fixed and bins are *appended* until ``m`` is covered (``ceil(m / w)`` bins); old counts
  are kept untouched, so the result equals the single-pass histogram of all data seen so far with
  the same edges ``0, w, 2w, ...``.
* To bound memory, if the number of bins would exceed ``max_bins`` the width is multiplied by the
  smallest integer ``k`` that makes it fit and every ``k`` consecutive bins are summed (edges stay
  aligned to 0, so the equality with a single-pass histogram on the new edges still holds exactly).

Besides the counts, the observer keeps the exact running ``min``, ``max`` (signed) and ``max |x|``.
Binning runs on the input's device; the counts are kept on the CPU in float64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from esc.calibrators.base import Observer, require_per_tensor
from esc.quant.quantizer import QuantizationError, UniformQuantizer


class HistogramObserver(Observer):
    """Histogram of ``|x|`` with fixed-width, right-closed bins that grows by appending bins.

    Args:
        quantizer: the (per-tensor) quantizer whose input is observed.
        num_bins: number of bins spanned by the first non-zero batch (default 2048).
        max_bins: upper bound on the number of bins after growth (default ``16 * num_bins``);
            exceeding it merges bins by an integer factor (see module docstring).
    """

    def __init__(self, quantizer: UniformQuantizer, num_bins: int = 2048, max_bins: Optional[int] = None) -> None:
        super().__init__(quantizer)
        require_per_tensor(quantizer, "histogram calibrators")
        if num_bins < 1:
            raise QuantizationError(f"quantizer {quantizer.name!r}: num_bins={num_bins} must be >= 1")
        self.num_bins = int(num_bins)
        self.max_bins = int(max_bins) if max_bins is not None else 16 * self.num_bins
        if self.max_bins < self.num_bins:
            raise QuantizationError(f"max_bins={self.max_bins} must be >= num_bins={self.num_bins}")
        self.hist: Optional[torch.Tensor] = None  # float64 counts
        self.width: float = 0.0
        self.pending_zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self.amax = 0.0

    # ------------------------------------------------------------------------------- update
    def update(self, x: torch.Tensor) -> None:
        """Add the batch's ``|x|`` to the histogram, appending (or merging) bins if it exceeds the range."""
        if x.numel() == 0:
            return
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        a = x.detach().abs().flatten().double()
        m = float(a.max())
        self.amax = max(self.amax, m)
        if self.hist is None:
            if m == 0.0:
                self.pending_zeros += a.numel()
                return
            self.width = m / self.num_bins
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64)
            self.hist[0] += self.pending_zeros
            self.pending_zeros = 0
        needed = self.bins_needed(m)
        if needed > self.hist.numel():
            if needed > self.max_bins:
                k = self._merge_factor(needed)
                self._merge(k)
                needed = self.bins_needed(m)
            self.hist = torch.cat([self.hist, torch.zeros(needed - self.hist.numel(), dtype=torch.float64)])
        idx = torch.clamp(torch.ceil(a / self.width) - 1, min=0, max=self.hist.numel() - 1).long()
        self.hist += torch.bincount(idx, minlength=self.hist.numel()).double().cpu()

    def bins_needed(self, value: float) -> int:
        """Number of bins of the current width needed to contain ``value`` (at least the current count)."""
        n = max(1, math.ceil(value / self.width))
        # guard against a rounding error of ceil(): the last edge must be >= value
        while n * self.width < value:
            n += 1
        return n

    def _merge_factor(self, needed: int) -> int:
        k = 2
        while math.ceil(needed / k) > self.max_bins:
            k += 1
        return k

    def _merge(self, k: int) -> None:
        """Sum every ``k`` consecutive bins (width becomes ``k * width``)."""
        n = self.hist.numel()
        padded = torch.cat([self.hist, torch.zeros((-n) % k, dtype=torch.float64)])
        self.hist = padded.view(-1, k).sum(dim=1)
        self.width *= k

    # ------------------------------------------------------------------------------ results
    @property
    def bin_edges(self) -> torch.Tensor:
        """Edges ``0, w, ..., n w`` (float64), ``n + 1`` values for ``n`` bins."""
        if self.hist is None:
            return torch.zeros(1, dtype=torch.float64)
        return torch.arange(self.hist.numel() + 1, dtype=torch.float64) * self.width

    @property
    def total(self) -> float:
        """Number of values observed."""
        return float(self.hist.sum()) if self.hist is not None else float(self.pending_zeros)

    def symmetric_to_range(self, c: float) -> tuple[float, float] | float:
        """Turn a magnitude clip ``c`` into what the quantizer takes.

        Symmetric quantizers get ``c``; asymmetric ones get ``(max(min_x, -c), min(max_x, c))``, i.e.
        ``[-c, c]`` intersected with the observed range (so a non-negative tensor gets ``[0, c]``).
        """
        if self.quantizer.symmetric:
            return torch.tensor(c, dtype=torch.float32)
        lo = max(self.min, -c) if math.isfinite(self.min) else 0.0
        hi = min(self.max, c) if math.isfinite(self.max) else 0.0
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)

    def clip_range(self):
        raise NotImplementedError("HistogramObserver is shared; the percentile/entropy observers define the clip")


def histogram_percentile(hist: torch.Tensor, width: float, percentile: float) -> float:
    """The ``percentile`` (0..100) of the values in a histogram with bins ``(k w, (k+1) w]``.

    Interpolation rule: the empirical CDF is taken piecewise linear inside every bin (values spread
    uniformly over the bin): with cumulative counts ``C_k`` at the upper edge ``(k+1) w`` and target
    ``t = percentile / 100 * N``, the first bin ``k`` with ``C_k >= t`` gives
    ``(k + (t - C_{k-1}) / h_k) * w``. ``percentile=100`` gives the upper edge of the last
    non-empty bin; ``percentile=0`` gives 0.
    """
    if not 0.0 <= percentile <= 100.0:
        raise QuantizationError(f"percentile={percentile} must be within 0..100")
    total = float(hist.sum())
    if total == 0:
        return 0.0
    cum = torch.cumsum(hist, 0)
    t = percentile * total / 100.0
    if t <= 0:
        return 0.0
    # relative slack so that a target equal to a cumulative count (up to float rounding) stops there
    k = int(torch.searchsorted(cum, torch.tensor([t * (1 - 1e-12)], dtype=cum.dtype), right=False)[0])
    k = min(k, hist.numel() - 1)
    prev = float(cum[k - 1]) if k > 0 else 0.0
    h = float(hist[k])
    frac = (t - prev) / h if h > 0 else 1.0
    return (k + min(max(frac, 0.0), 1.0)) * width
