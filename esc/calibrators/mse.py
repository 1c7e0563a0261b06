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

All candidates of a chunk are evaluated as one tensor operation ``[channels, candidates, values]``
(no Python loop over candidates or channels).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from esc.calibrators.base import Observer, StatisticCalibrator
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
        xq = fake_quantize(xe, scale.unsqueeze(2), zp.unsqueeze(2), quantizer.qmin, quantizer.qmax)
        d = (xe - xq).abs_()
        d = d.square_() if p == 2.0 else d.pow_(p)
        out[:, s:s + step] = d.sum(dim=2, dtype=torch.float64) / M
    return out.cpu()


def _argmin_last(err: torch.Tensor) -> torch.Tensor:
    """Row-wise arg-min, ties resolved to the last (largest) index."""
    F = err.shape[1]
    return F - 1 - torch.argmin(torch.flip(err, [1]), dim=1)


def search_clip_fractions(x: torch.Tensor, quantizer: UniformQuantizer, lo: torch.Tensor, hi: torch.Tensor,
                          p: float = 2.0, num_coarse: int = 100, num_fine: int = 100,
                          min_fraction: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine search of the clip fraction per row of ``x`` (``[C, M]``, ranges ``lo``/``hi`` ``[C]``).

    Returns ``(fractions [C] float64, errors [C] float64)``; the clip is ``fraction * lo/hi``
    (rounded to float32, as evaluated).
    """
    if num_coarse < 2:
        raise QuantizationError(f"quantizer {quantizer.name!r}: num_coarse={num_coarse} must be >= 2")
    if not 0.0 < min_fraction < 1.0:
        raise QuantizationError(f"quantizer {quantizer.name!r}: min_fraction={min_fraction} must be in (0, 1)")
    if p <= 0:
        raise QuantizationError(f"quantizer {quantizer.name!r}: p={p} must be > 0")
    C = x.shape[0]
    coarse = torch.from_numpy(np.geomspace(min_fraction, 1.0, num_coarse)).double()
    fr = coarse.unsqueeze(0).expand(C, -1)
    err = quantization_errors(x, quantizer, *_candidate_range(fr, lo, hi), p)
    b = _argmin_last(err)
    best_f, best_e = coarse[b], err[torch.arange(C), b]
    if num_fine > 0:
        f_lo = coarse[torch.clamp(b - 1, min=0)]
        f_hi = coarse[torch.clamp(b + 1, max=num_coarse - 1)]
        t = torch.linspace(0.0, 1.0, num_fine, dtype=torch.float64) if num_fine > 1 else torch.zeros(1, dtype=torch.float64)
        fine = f_lo.unsqueeze(1) + (f_hi - f_lo).unsqueeze(1) * t.unsqueeze(0)
        err_f = quantization_errors(x, quantizer, *_candidate_range(fine, lo, hi), p)
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
             num_fine: int = 100, min_fraction: float = 1e-3):
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
    f, _ = search_clip_fractions(rows, quantizer, lo.cpu(), hi.cpu(), p, num_coarse, num_fine, min_fraction)
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
        if quantizer.granularity != "tensor":
            raise QuantizationError(f"quantizer {quantizer.name!r}: the MSE calibrator supports per-tensor activation "
                                    "quantizers only; use granularity='tensor' or the minmax calibrator")
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
        f, err = search_clip_fractions(self.values.unsqueeze(0), q, lo, hi, **self.search_kwargs)
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
            size (2**20). seed: subsampling seed (0).
    """

    name = "mse"

    def __init__(self, p: float = 2.0, num_coarse: int = 100, num_fine: int = 100, min_fraction: float = 1e-3,
                 max_samples: int = 2**20, seed: int = 0) -> None:
        if p <= 0 or num_coarse < 2 or num_fine < 0 or not 0.0 < min_fraction < 1.0 or max_samples < 1:
            raise QuantizationError(f"invalid MSECalibrator settings p={p}, num_coarse={num_coarse}, num_fine={num_fine}, "
                                    f"min_fraction={min_fraction}, max_samples={max_samples}; need p > 0, num_coarse >= 2, "
                                    "num_fine >= 0, 0 < min_fraction < 1, max_samples >= 1")
        self.p, self.num_coarse, self.num_fine, self.min_fraction = float(p), int(num_coarse), int(num_fine), float(min_fraction)
        self.max_samples, self.seed = int(max_samples), int(seed)

    def make_observer(self, quantizer: UniformQuantizer) -> MSEObserver:
        obs = MSEObserver(quantizer, self.max_samples, self.seed)
        obs.search_kwargs = dict(p=self.p, num_coarse=self.num_coarse, num_fine=self.num_fine, min_fraction=self.min_fraction)
        return obs
