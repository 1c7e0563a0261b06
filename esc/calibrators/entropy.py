"""Entropy (KL-divergence) calibration, the TensorRT method."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from esc.calibrators.base import StatisticCalibrator
from esc.calibrators.histogram import HistogramObserver
from esc.quant.quantizer import QuantizationError, UniformQuantizer


def smooth_distribution(p: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    """The standard KL smoothing (MXNet / TVM ``_smooth_distribution``), row-wise on ``[C, n]``.

    Inside ``valid`` (the first ``i`` entries of each row): every zero entry gets ``+eps`` and every
    non-zero entry ``-eps * n_zeros / n_nonzeros``, so the row sum is unchanged. Rows without a
    non-zero entry, or where smoothing would make an entry non-positive, are returned as NaN rows
    (the caller scores them ``inf``, where MXNet raises).
    """
    zero = (p == 0) & valid
    nonzero = (p != 0) & valid
    n0 = zero.sum(dim=1, keepdim=True).double()
    n1 = nonzero.sum(dim=1, keepdim=True).double()
    eps1 = eps * n0 / n1.clamp(min=1)
    out = p + eps * zero.double() - eps1 * nonzero.double()
    bad = (n1 == 0).squeeze(1) | ((out <= 0) & valid).any(dim=1)
    out[bad] = float("nan")
    return out


def kl_divergences(hist: torch.Tensor, num_levels: int, candidates: torch.Tensor, eps: float = 1e-4,
                   q_source: str = "sliced", chunk_elems: int = 1 << 20) -> torch.Tensor:
    """KL(P_i || Q_i) for every candidate cut ``i`` (number of kept bins), vectorised over candidates.

    For a cut ``i`` (bins ``0..i-1`` kept):

    * ``P_i = hist[:i]`` with the outlier mass ``sum(hist[i:])`` added to ``P_i[i-1]``;
    * the kept bins are merged into ``num_levels`` levels, bin ``j`` going to level
      ``floor(j * num_levels / i)`` (equal-width levels over ``[0, i w]``); level sums are taken from
      ``hist[:i]`` *without* the outliers (``q_source="sliced"``, as TensorRT / ModelOpt / MXNet /
      TVM do) or from ``P_i`` itself, outliers included (``q_source="reference"``); each level's sum is spread evenly over the bins of that level where ``P_i`` is
      non-zero, giving ``Q_i`` (zero where ``P_i`` is zero);
    * both are normalised and ``KL = sum P log(P / Q)`` (``inf`` where ``Q = 0 < P``), as
      ModelOpt / pytorch-quantization compute it with ``scipy.stats.entropy`` (``eps = 0``); with
      ``eps > 0`` both are first smoothed with :func:`smooth_distribution` (MXNet / TVM), and
      candidates whose smoothing fails score ``inf``.
    """
    if q_source not in ("sliced", "reference"):
        raise QuantizationError(f"q_source={q_source!r}: use 'sliced' (TensorRT) or 'reference'")
    from_sliced = q_source == "sliced"
    hist = hist.double()
    n = hist.numel()
    total_right = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # total_right[j] = sum(hist[j:])
    total_right = torch.cat([total_right, torch.zeros(1, dtype=torch.float64)])
    out = torch.empty(candidates.numel(), dtype=torch.float64)
    j = torch.arange(n)
    rows = max(1, chunk_elems // max(n, 1))
    for start in range(0, candidates.numel(), rows):
        cand = candidates[start:start + rows].long()
        c = cand.numel()
        width = int(cand.max())
        jj = j[:width]
        valid = jj.unsqueeze(0) < cand.unsqueeze(1)  # [c, width]
        sliced = hist[:width].unsqueeze(0).expand(c, width) * valid
        p = sliced.clone()
        p[torch.arange(c), cand - 1] += total_right[cand]
        level = torch.div(jj.unsqueeze(0) * num_levels, cand.unsqueeze(1), rounding_mode="floor")
        level = torch.where(valid, level, torch.full_like(level, num_levels))  # dump column for j >= i
        p_nonzero = (p != 0) & valid
        sums = torch.zeros(c, num_levels + 1, dtype=torch.float64).scatter_add_(1, level, sliced if from_sliced else p)
        counts = torch.zeros(c, num_levels + 1, dtype=torch.float64).scatter_add_(1, level, p_nonzero.double())
        avg = sums / counts.clamp(min=1)
        q = torch.gather(avg, 1, level) * p_nonzero
        ps, qs = (smooth_distribution(p, valid, eps), smooth_distribution(q, valid, eps)) if eps > 0 else (p, q)
        ps = ps / ps.sum(dim=1, keepdim=True)
        qs = qs / qs.sum(dim=1, keepdim=True)
        terms = torch.where(valid & (ps > 0), ps * torch.log(ps / qs), torch.zeros_like(ps))
        kl = terms.sum(dim=1)
        kl = torch.where(torch.isnan(kl), torch.full_like(kl, math.inf), kl)
        out[start:start + c] = kl
    return out


class EntropyObserver(HistogramObserver):
    """Histogram of ``|x|`` whose clip minimises the TensorRT KL divergence."""

    def __init__(self, quantizer: UniformQuantizer, num_bins: int, start_bin: int, stride: int, eps: float,
                 num_levels: Optional[int], max_bins: Optional[int], q_source: str = "sliced", zero_bin: str = "tensorrt") -> None:
        super().__init__(quantizer, num_bins, max_bins)
        self.q_source, self.zero_bin = q_source, zero_bin
        self.start_bin, self.stride, self.eps, self.num_levels_override = start_bin, stride, eps, num_levels
        self.divergences: Optional[torch.Tensor] = None

    @property
    def num_levels(self) -> int:
        """Levels of the magnitude grid: the quantizer's non-negative levels ``qmax + 1``.

        Symmetric signed: ``2^(bits-1)`` (128 at 8 bits, TensorRT's value); symmetric unsigned: ``2^bits``.
        Asymmetric: ``2^bits`` when the observed tensor is non-negative, else ``2^(bits-1)``.
        """
        if self.num_levels_override is not None:
            return int(self.num_levels_override)
        q = self.quantizer
        if q.symmetric:
            return q.qmax + 1
        return 2 ** q.bits if self.min >= 0 else 2 ** (q.bits - 1)

    def clip_range(self):
        """``c = i* w`` (the upper edge of the last kept bin, TensorRT's ``bin_edges[i]`` convention)."""
        if self.hist is None:
            return self.symmetric_to_range(0.0)
        n = self.hist.numel()
        start = min(self.start_bin, n)
        candidates = torch.arange(start, n + 1, self.stride)
        self.candidates = candidates
        hist = self.hist.clone()
        if self.zero_bin == "tensorrt" and n > 1:
            hist[0] = hist[1]  # TensorRT / ModelOpt: the spike of exact zeros (ReLU, padding) is ignored
        self.divergences = kl_divergences(hist, self.num_levels, candidates, self.eps, self.q_source)
        if not torch.isfinite(self.divergences).any():
            best = n  # no scorable cut: keep the full range
        else:
            div = self.divergences.numpy()
            last = len(div) - 1 - int(np.argmin(div[::-1]))  # ties -> the largest cut (ModelOpt)
            best = int(candidates[last])
        return self.symmetric_to_range(min(best * self.width, self.amax))


class EntropyCalibrator(StatisticCalibrator):
    """TensorRT entropy calibration: clip where KL(P || Q) between the clipped and quantized histograms is smallest.

    Definition (NVIDIA ModelOpt / pytorch-quantization ``_compute_amax_entropy``, the TensorRT
    entropy calibrator): one FP pass fills a :class:`~esc.calibrators.histogram.HistogramObserver`
    of ``|x|`` (``num_bins`` bins of width ``w = max(first batch) / num_bins``, grown by appending
    bins); bin 0 is replaced by bin 1 (``zero_bin="tensorrt"``: the spike of exact zeros from ReLU,
    padding or softmax does not pull the clip down; ``"keep"``: the histogram as observed). For
    every cut ``i`` in ``range(start_bin, n_bins + 1, stride)`` the divergence of
    :func:`kl_divergences` is computed with ``num_levels`` = the quantizer's non-negative levels
    (``qmax + 1``, i.e. ``2^(bits - 1 + unsigned)``: 128 at INT8, 256 on an unsigned INT8 grid, 8 at
    INT4 signed) and smoothing ``eps`` (0: none, as ModelOpt); the
    arg-min (ties: largest cut) gives ``c = i w`` (TensorRT's edge convention ``bin_edges[i]``),
    capped at the exact ``max |x|``. Symmetric quantizers get ``[-c, c]``, asymmetric ones ``[-c, c]``
    intersected with the observed range. Per-tensor quantizers only.

    ``start_bin`` is the smallest cut considered. The TensorRT default 128 (of 2048 bins) forbids
    clipping below 128/2048 = 6.25% of the (first batch's) max: harmless at 8 bits, but at 4 bits
    on wide-range speech activations the best clip is often far below that, so lower ``start_bin``
    (it must stay >= ``num_levels`` for the merge to be meaningful) when studying INT4.

    Known property of the method, reproduced as is: when a tensor has no mass near 0 (e.g. a
    softmax over few keys), a cut that keeps a single non-empty bin makes ``P`` and ``Q`` the same
    one-bin distribution (KL ~ 0), so the clip can land far below the bulk of the data.

    Args:
        num_bins: histogram bins (2048). start_bin: first cut (128). stride: step between cuts (1).
        eps: KL smoothing constant (0: none, ModelOpt; 1e-4: MXNet / TVM). num_levels: override the number of levels (None: from
            the quantizer). max_bins: cap on bins after growth (default ``16 * num_bins``).
        q_source: ``"sliced"`` (default, TensorRT: ``Q`` from the kept bins without the clipped
            mass) or ``"reference"`` (``Q`` merged from ``P``, clipped mass included).
        zero_bin: ``"tensorrt"`` (default: ``bins[0] = bins[1]``) or ``"keep"`` (the rows made
            before this option existed).
    """

    name = "entropy"

    def __init__(self, num_bins: int = 2048, start_bin: int = 128, stride: int = 1, eps: float = 0.0,
                 num_levels: Optional[int] = None, max_bins: Optional[int] = None, q_source: str = "sliced",
                 zero_bin: str = "tensorrt") -> None:
        if not 1 <= start_bin <= num_bins:
            raise QuantizationError(f"start_bin={start_bin} must be within 1..num_bins={num_bins}")
        if stride < 1:
            raise QuantizationError(f"stride={stride} must be >= 1")
        self.num_bins, self.start_bin, self.stride, self.eps = int(num_bins), int(start_bin), int(stride), float(eps)
        if q_source not in ("sliced", "reference"):
            raise QuantizationError(f"q_source={q_source!r}: use 'sliced' (TensorRT) or 'reference'")
        if zero_bin not in ("tensorrt", "keep"):
            raise QuantizationError(f"zero_bin={zero_bin!r}: use 'tensorrt' (bins[0] = bins[1]) or 'keep'")
        if eps < 0:
            raise QuantizationError(f"eps={eps} must be >= 0 (0: no smoothing, as ModelOpt)")
        self.num_levels, self.max_bins, self.q_source, self.zero_bin = num_levels, max_bins, q_source, zero_bin

    def make_observer(self, quantizer: UniformQuantizer) -> EntropyObserver:
        return EntropyObserver(quantizer, self.num_bins, self.start_bin, self.stride, self.eps, self.num_levels, self.max_bins,
                              self.q_source, self.zero_bin)
