"""MSE calibration: the clip that minimises the quantizer's own reconstruction error.

The search (shared by activations and weights, see :func:`search_clip_fractions`):

* candidates are fractions ``f`` of the observed range: a *coarse* geometric grid of ``num_coarse``
  fractions from ``min_fraction`` to 1 (``numpy.geomspace``), then a *fine* linear grid of
  ``num_fine`` fractions between the coarse neighbours of the coarse optimum (both ends included);
* symmetric quantizers: candidate clip ``c = f * max|x|``, scale ``c / qmax``;
* asymmetric quantizers: the observed range ``[lo, hi]`` (widened to contain 0, as the quantizer
  does) is shrunk **towards zero** by the same fraction, ``[f lo, f hi]``, and mapped onto the
  integer grid exactly as :meth:`UniformQuantizer.set_clip_range` does (rounded zero point). A
  shrink about the range centre was rejected: after widening to contain 0 it cannot clip the top of
  a non-negative tensor below half its max;
* the score of a candidate is ``mean |x - Q(x)|^p`` with ``Q`` the quantizer's own fake-quant
  (same ``qmin``/``qmax``, round-half-to-even), accumulated in float64; the arg-min over coarse and
  fine candidates wins (ties: the larger clip).

Evaluation is vectorised over channels and candidates (no Python loop over either). For ``p = 2``
(and at most 1024 levels) :class:`SortedL2Errors` scores a candidate from per-row sorted values and
prefix sums in ``O(levels log M)``; otherwise every chunk of candidates is one element-wise tensor
operation ``[channels, candidates, values]`` (:func:`quantization_errors`). Both give the same
errors up to float rounding (tested).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from esc.calibrators.base import Observer, StatisticCalibrator, require_per_tensor
from esc.quant.quantizer import QuantizationError, UniformQuantizer, fake_quantize

log = logging.getLogger(__name__)

_TINY = torch.finfo(torch.float32).tiny


def _quant_params(q: UniformQuantizer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that ``q.set_clip_range`` would set for clip ``hi`` (symmetric) or ``[lo, hi]``."""
    if q.symmetric:
        scale = torch.clamp(hi.abs() / q.qmax, min=_TINY)
        return scale, torch.zeros_like(scale)
    lo_t, hi_t = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi_t - lo_t) / (q.qmax - q.qmin), min=_TINY)
    zero_point = torch.clamp(torch.round(q.qmin - lo_t / scale), q.qmin, q.qmax)
    return scale, zero_point


def _candidate_range(fractions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ranges ``(f lo, f hi)`` in float32 for fractions ``[C, F]`` (float64) and ranges ``[C]``."""
    return ((fractions * lo.double().unsqueeze(1)).float(), (fractions * hi.double().unsqueeze(1)).float())


@torch.no_grad()
def quantization_errors(x: torch.Tensor, quantizer: UniformQuantizer, lo: torch.Tensor, hi: torch.Tensor,
                        p: float = 2.0, chunk_elems: int = 1 << 23) -> torch.Tensor:
    """``mean_j |x[c, j] - Q(x[c, j])|^p`` for clip ranges ``lo, hi`` of shape ``[C, F]`` and ``x`` of shape ``[C, M]``.

    ``Q`` uses ``quantizer``'s grid with the scale/zero point of each candidate range (``lo`` is
    ignored for symmetric quantizers). Returns float64 ``[C, F]``. Chunked over candidates so that
    one chunk holds at most ``chunk_elems`` values.
    """
    x = x.float()
    C, M = x.shape
    F = lo.shape[1]
    out = torch.empty(C, F, dtype=torch.float64, device=x.device)
    step = max(1, chunk_elems // max(C * M, 1))
    xe = x.unsqueeze(1)  # [C, 1, M]
    for s in range(0, F, step):
        scale, zp = _quant_params(quantizer, lo[:, s:s + step].to(x.device), hi[:, s:s + step].to(x.device))
        zp = None if quantizer.symmetric else zp.unsqueeze(2)  # symmetric: zero point 0, as the quantizer does
        xq = fake_quantize(xe, scale.unsqueeze(2), zp, quantizer.qmin, quantizer.qmax)
        d = xq.sub_(xe).abs_()
        d = d.square_() if p == 2.0 else d.pow_(p)
        out[:, s:s + step] = d.sum(dim=2, dtype=torch.float64) / M
    return out.cpu()


class SortedL2Errors:
    """Exact-in-float64 ``mean (x - Q(x))^2`` for many candidate ranges from sorted values and prefix sums.

    Every input value goes to the integer level whose decision interval contains it: levels
    ``k = qmin..qmax`` dequantize to ``v_k = (k - z) s`` and the boundary between ``k`` and ``k+1``
    is ``(k - z + 1/2) s`` (values beyond the clip range fall in the end levels, which is exactly
    the clamp). With ``x`` sorted per row and prefix sums ``S1 = cumsum(x)``, ``S2 = cumsum(x^2)``
    (float64), the error of a level is ``S2 - 2 v S1 + n v^2`` over its slice, so a candidate costs
    ``O(levels * log M)`` instead of ``O(M)``. It differs from the element-wise fake-quant only for
    values within one float32 ulp of a decision boundary (and by float64 rounding), and is used for
    ``p = 2`` with at most ``max_levels`` levels (catastrophic cancellation grows with the level
    index); :func:`quantization_errors` is the element-wise reference.
    """

    def __init__(self, x: torch.Tensor, quantizer: UniformQuantizer, chunk_elems: int = 1 << 22) -> None:
        self.q = quantizer
        xs = torch.sort(x.double(), dim=1).values
        zero = torch.zeros(xs.shape[0], 1, dtype=torch.float64, device=xs.device)
        self.xs = xs.contiguous()
        self.s1 = torch.cat([zero, torch.cumsum(xs, 1)], 1)
        self.s2 = torch.cat([zero, torch.cumsum(xs * xs, 1)], 1)
        self.chunk_elems = chunk_elems

    @torch.no_grad()
    def __call__(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        q, xs = self.q, self.xs
        C, M = xs.shape
        F = lo.shape[1]
        L = q.qmax - q.qmin + 1
        k = torch.arange(q.qmin, q.qmax + 1, dtype=torch.float64, device=xs.device)  # [L]
        out = torch.empty(C, F, dtype=torch.float64)
        step = max(1, self.chunk_elems // max(C * L, 1))
        for s in range(0, F, step):
            scale, zp = _quant_params(q, lo[:, s:s + step].to(xs.device), hi[:, s:s + step].to(xs.device))
            f = scale.shape[1]
            scale, zp = scale.double().unsqueeze(2), zp.double().unsqueeze(2)  # [C, f, 1]
            v = (k - zp) * scale  # [C, f, L] dequantized levels
            bounds = (k[:-1] - zp + 0.5) * scale  # [C, f, L-1] decision boundaries
            idx = torch.searchsorted(xs, bounds.reshape(C, -1), side="left").reshape(C, f, L - 1)
            full = torch.full((C, f, 1), M, dtype=idx.dtype, device=idx.device)
            ends = torch.cat([idx, full], 2)
            starts = torch.cat([torch.zeros_like(full), idx], 2)
            g = lambda t, i: torch.gather(t, 1, i.reshape(C, -1)).reshape(C, f, L)  # noqa: E731
            n = (ends - starts).double()
            s1 = g(self.s1, ends) - g(self.s1, starts)
            s2 = g(self.s2, ends) - g(self.s2, starts)
            err = (s2 - 2 * v * s1 + n * v * v).sum(2) / M
            out[:, s:s + f] = err.clamp(min=0).cpu()
        return out


def _evaluator(x: torch.Tensor, quantizer: UniformQuantizer, p: float, method: str, max_levels: int = 1024):
    """``(lo, hi) -> errors [C, F]``: the sorted-prefix L2 evaluator or the element-wise one."""
    if method not in ("auto", "sorted", "dense"):
        raise QuantizationError(f"quantizer {quantizer.name!r}: unknown MSE evaluation method {method!r}; use auto|sorted|dense")
    levels = quantizer.qmax - quantizer.qmin + 1
    if method == "sorted" and p != 2.0:
        raise QuantizationError(f"quantizer {quantizer.name!r}: the sorted evaluator needs p=2 (got p={p}); use method='dense'")
    if method == "sorted" or (method == "auto" and p == 2.0 and levels <= max_levels):
        return SortedL2Errors(x, quantizer)
    return lambda lo, hi: quantization_errors(x, quantizer, lo, hi, p)


def _argmin_last(err: torch.Tensor) -> torch.Tensor:
    """Row-wise arg-min, ties resolved to the last (largest) index."""
    F = err.shape[1]
    return F - 1 - torch.argmin(torch.flip(err, [1]), dim=1)


def search_clip_fractions(x: torch.Tensor, quantizer: UniformQuantizer, lo: torch.Tensor, hi: torch.Tensor,
                          p: float = 2.0, num_coarse: int = 100, num_fine: int = 100,
                          min_fraction: float = 1e-3, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine search of the clip fraction per row of ``x`` (``[C, M]``, ranges ``lo``/``hi`` ``[C]``).

    ``method``: ``"dense"`` evaluates every candidate element-wise with the quantizer's own
    fake-quant (:func:`quantization_errors`); ``"sorted"`` uses :class:`SortedL2Errors` (p = 2
    only, same values up to float rounding, ~100x faster on CPU); ``"auto"`` picks ``sorted`` for
    p = 2 and at most 1024 levels. Returns ``(fractions [C] float64, errors [C] float64)``; the
    clip is ``fraction * lo/hi`` (rounded to float32, as evaluated).
    """
    if num_coarse < 2:
        raise QuantizationError(f"quantizer {quantizer.name!r}: num_coarse={num_coarse} must be >= 2")
    if not 0.0 < min_fraction < 1.0:
        raise QuantizationError(f"quantizer {quantizer.name!r}: min_fraction={min_fraction} must be in (0, 1)")
    if p <= 0:
        raise QuantizationError(f"quantizer {quantizer.name!r}: p={p} must be > 0")
    C = x.shape[0]
    evaluate = _evaluator(x, quantizer, p, method)
    coarse = torch.from_numpy(np.geomspace(min_fraction, 1.0, num_coarse)).double()
    fr = coarse.unsqueeze(0).expand(C, -1)
    err = evaluate(*_candidate_range(fr, lo, hi))
    b = _argmin_last(err)
    best_f, best_e = coarse[b], err[torch.arange(C), b]
    if num_fine > 0:
        f_lo = coarse[torch.clamp(b - 1, min=0)]
        f_hi = coarse[torch.clamp(b + 1, max=num_coarse - 1)]
        t = torch.linspace(0.0, 1.0, num_fine, dtype=torch.float64) if num_fine > 1 else torch.zeros(1, dtype=torch.float64)
        fine = f_lo.unsqueeze(1) + (f_hi - f_lo).unsqueeze(1) * t.unsqueeze(0)
        err_f = evaluate(*_candidate_range(fine, lo, hi))
        allf = torch.cat([best_f.unsqueeze(1), fine], dim=1)
        alle = torch.cat([best_e.unsqueeze(1), err_f], dim=1)
        # sort candidates by fraction so that ties go to the larger clip
        order = torch.argsort(allf, dim=1, stable=True)
        allf, alle = torch.gather(allf, 1, order), torch.gather(alle, 1, order)
        k = _argmin_last(alle)
        best_f, best_e = allf[torch.arange(C), k], alle[torch.arange(C), k]
    return best_f, best_e


def _as_rows(tensor: torch.Tensor, quantizer: UniformQuantizer) -> torch.Tensor:
    if quantizer.granularity == "channel":
        axis = quantizer.axis % tensor.dim()
        return tensor.detach().transpose(0, axis).reshape(tensor.shape[axis], -1)
    return tensor.detach().reshape(1, -1)


def mse_clip(tensor: torch.Tensor, quantizer: UniformQuantizer, p: float = 2.0, num_coarse: int = 100,
             num_fine: int = 100, min_fraction: float = 1e-3, method: str = "auto"):
    """MSE-optimal clip of ``tensor`` for ``quantizer`` (per channel along ``quantizer.axis`` if per-channel).

    Returns what :meth:`UniformQuantizer.set_clip_range` takes: ``c`` (symmetric; shape ``[]`` or
    ``[C]``) or ``(lo, hi)`` (asymmetric). The search is described in the module docstring; the
    ranges are the exact per-row ``max |x|`` (symmetric) or ``[min(x, 0), max(x, 0)]`` (asymmetric).
    """
    if not torch.isfinite(tensor).all():
        raise QuantizationError(f"quantizer {quantizer.name!r}: tensor holds NaN/Inf; cannot search an MSE clip")
    rows = _as_rows(tensor, quantizer).float()
    if rows.shape[1] == 0:
        raise QuantizationError(f"quantizer {quantizer.name!r}: empty tensor; cannot search an MSE clip")
    if quantizer.symmetric:
        hi = rows.abs().max(dim=1).values
        lo = -hi
    else:
        lo, hi = torch.clamp(rows.min(dim=1).values, max=0.0), torch.clamp(rows.max(dim=1).values, min=0.0)
    f, _ = search_clip_fractions(rows, quantizer, lo.cpu(), hi.cpu(), p, num_coarse, num_fine, min_fraction, method)
    lo_c, hi_c = _candidate_range(f.unsqueeze(1), lo.cpu(), hi.cpu())
    lo_c, hi_c = lo_c.squeeze(1), hi_c.squeeze(1)
    if quantizer.granularity != "channel":
        lo_c, hi_c = lo_c.reshape(()), hi_c.reshape(())
    return hi_c if quantizer.symmetric else (lo_c, hi_c)


class MSEObserver(Observer):
    """Exact range plus a uniform random subsample of at most ``max_samples`` activation values.

    Subsampling is bottom-k sampling: every observed value gets an i.i.d. uniform key from a CPU
    ``torch.Generator`` seeded with ``seed``, and the ``max_samples`` values with the smallest keys
    are kept. This is a uniform sample without replacement of all values seen, deterministic for a
    given seed and batch order (and independent of the device).
    """

    def __init__(self, quantizer: UniformQuantizer, max_samples: int, seed: int) -> None:
        super().__init__(quantizer)
        require_per_tensor(quantizer, "the MSE calibrator")
        if max_samples < 1:
            raise QuantizationError(f"max_samples={max_samples} must be >= 1")
        self.max_samples = int(max_samples)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.values: Optional[torch.Tensor] = None
        self.keys: Optional[torch.Tensor] = None
        self.min, self.max = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().flatten().float().cpu()
        if v.numel() == 0:
            return
        self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))
        keys = torch.rand(v.numel(), generator=self.gen)
        if self.values is not None and self.values.numel() >= self.max_samples:
            keep = keys < self.keys.max()  # only values that can enter the bottom-k
            v, keys = v[keep], keys[keep]
        if self.values is not None:
            v, keys = torch.cat([self.values, v]), torch.cat([self.keys, keys])
        if v.numel() > self.max_samples:
            idx = torch.topk(keys, self.max_samples, largest=False, sorted=False).indices
            idx = torch.sort(idx).values  # keep the sample in stream order
            v, keys = v[idx], keys[idx]
        self.values, self.keys = v, keys

    def clip_range(self):
        q = self.quantizer
        lo, hi = torch.tensor([min(self.min, 0.0)]), torch.tensor([max(self.max, 0.0)])
        if q.symmetric:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        # the search runs where the quantizer lives (GPU when the model is there)
        device = q.scale.device
        f, err = search_clip_fractions(self.values.to(device).unsqueeze(0), q, lo, hi, **self.search_kwargs)
        lo_c, hi_c = _candidate_range(f.unsqueeze(1), lo, hi)
        log.debug("%s: MSE clip fraction %.4g (error %.4g)", q.name, float(f[0]), float(err[0]))
        return hi_c.reshape(()) if q.symmetric else (lo_c.reshape(()), hi_c.reshape(()))


class MSECalibrator(StatisticCalibrator):
    """MSE calibration: per activation, the clip minimising ``mean |x - Q_c(x)|^p`` of the quantizer's own fake-quant.

    Definition: one FP pass; each quantizer's observer keeps the exact range and a uniform random
    subsample of at most ``max_samples`` values (bottom-k sampling, seeded by ``seed``: deterministic;
    a 2048-bin histogram could not resolve clips near ``max / 1000``). The clip is searched over
    fractions of the exact range: ``num_coarse`` geometric fractions in ``[min_fraction, 1]``, then
    ``num_fine`` linear fractions between the coarse optimum's neighbours; the error is evaluated on
    the subsample (see :mod:`esc.calibrators.mse` for the asymmetric rule and tie-breaking).
    Per-tensor quantizers only.

    Args:
        p: error norm exponent (2.0: MSE). num_coarse / num_fine: grid sizes (100 / 100).
        min_fraction: smallest clip as a fraction of ``max |x|`` (1e-3). max_samples: subsample
            size (2**20). seed: subsampling seed (0). method: error evaluation, ``auto`` |
            ``sorted`` | ``dense`` (see :func:`search_clip_fractions`; same result up to rounding).
    """

    name = "mse"

    def __init__(self, p: float = 2.0, num_coarse: int = 100, num_fine: int = 100, min_fraction: float = 1e-3,
                 max_samples: int = 2**20, seed: int = 0, method: str = "auto") -> None:
        if p <= 0 or num_coarse < 2 or num_fine < 0 or not 0.0 < min_fraction < 1.0 or max_samples < 1:
            raise QuantizationError(f"invalid MSECalibrator settings p={p}, num_coarse={num_coarse}, num_fine={num_fine}, "
                                    f"min_fraction={min_fraction}, max_samples={max_samples}; need p > 0, num_coarse >= 2, "
                                    "num_fine >= 0, 0 < min_fraction < 1, max_samples >= 1")
        self.p, self.num_coarse, self.num_fine, self.min_fraction = float(p), int(num_coarse), int(num_fine), float(min_fraction)
        self.max_samples, self.seed, self.method = int(max_samples), int(seed), method

    def make_observer(self, quantizer: UniformQuantizer) -> MSEObserver:
        obs = MSEObserver(quantizer, self.max_samples, self.seed)
        obs.search_kwargs = dict(p=self.p, num_coarse=self.num_coarse, num_fine=self.num_fine, min_fraction=self.min_fraction,
                                 method=self.method)
        return obs
