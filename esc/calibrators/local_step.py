"""ESC's local step: per-quantizer grid search of the scale minimising its layer's output MSE."""
from __future__ import annotations

import math
from typing import Optional

import torch

from esc.calibrators.base import CalibrationData
from esc.calibrators.local_objective import LocalObjective
from esc.quant.model import QuantizedModel
from esc.quant.quantizer import QuantizationError

LOCAL_SEARCHES = ("exhaustive", "coarse_fine")


def local_grid_fractions(grid: int, min_fraction: float) -> torch.Tensor:
    """``grid`` geometric fractions from ``min_fraction`` to 1 (inclusive), ascending."""
    if grid < 1 or not 0 < min_fraction <= 1:
        raise QuantizationError(f"local grid: need local_grid >= 1 and 0 < local_min_fraction <= 1, got {grid}, {min_fraction}")
    if grid == 1:
        return torch.ones(1, dtype=torch.float64)
    return torch.logspace(math.log10(min_fraction), 0.0, grid, dtype=torch.float64)


def local_coarse_indices(grid: int, stride: int) -> torch.Tensor:
    """The coarse candidates of ``local_search="coarse_fine"``: grid indices ``0, stride, 2 stride, ...`` and
    ``grid - 1`` (the observed max), ascending."""
    if stride < 1:
        raise QuantizationError(f"local step: local_stride={stride} must be >= 1")
    return torch.tensor(sorted(set(range(0, grid, stride)) | {grid - 1}))


def local_passes(search: str = "exhaustive", samples: Optional[int] = None) -> int:
    """Passes over the calibration set :func:`local_mse_scales` makes: 1 with a row sample (``samples``),
    else 2 (``exhaustive``: max, errors) or 3 (``coarse_fine``: max, coarse errors, fine errors)."""
    return 1 if samples is not None else (2 if search == "exhaustive" else 3)


def local_mse_scales(qmodel: QuantizedModel, data: CalibrationData, grid: int = 100, min_fraction: float = 1e-3,
                     max_elements: int = 2**22, search: str = "exhaustive", stride: int = 10, refine: int = 2,
                     samples: Optional[int] = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ESC's local step: per-quantizer grid search of the scale minimising its layer's output MSE.

    For activation quantizer ``i`` with observed max ``m_i = max |x|`` over the calibration set, the
    candidates are clips ``c = f * m_i`` for the ``grid`` fractions ``f`` of
    :func:`local_grid_fractions` and scales ``s = c / qmax``. The chosen ``s_i`` minimises the mean
    over the calibration set of ``(layer(x) - layer(fake_quant(x, s)))^2`` where ``x`` is the
    quantizer's FP input (all activation quantizers off; weights quantized as currently set, in both
    terms) and ``layer`` is: the Linear/Conv module for input quantizers (bias cancels; a tensor
    shared by several Linear inputs, e.g. Q/K/V projections, goes through their stacked weights),
    the identity for LayerNorm input and output quantizers (tensor MSE), ``a @ b`` with the other
    operand in float for MatMul operand quantizers, and the identity for quantizers of any other module.
    Ties go to the smallest scale.

    ``search`` says which grid candidates are evaluated:

    * ``"exhaustive"`` (default): all ``grid`` of them.
    * ``"coarse_fine"``: the coarse indices of :func:`local_coarse_indices` (every ``stride``-th and
      the last; 11 of 100 at ``stride=10``), then every index strictly between the two coarse
      neighbours of the coarse optimum (at most ``2 (stride - 1)`` more); the chosen scale is the
      best of all evaluated (at most 29 of 100 candidates at the defaults). It equals the exhaustive
      choice whenever the error over the grid falls, then rises (one minimum, no plateaus).

    ``samples`` (``None``: all of the calibration set): evaluate the errors on a seeded uniform row
    sample (:class:`~esc.calibrators.row_sample.RowSample`, ``seed``) of at most ``samples`` elements per quantizer, kept
    during the max pass, so there is no further forward pass; rows are tokens for Linear inputs
    and tensor-MSE quantizers, samples for Conv inputs and leading (batch, head) indices for matmul
    operands (both operands kept together). The maxima, hence the candidate grid, are always exact.

    Passes over the calibration set: :func:`local_passes`. ``max_elements`` bounds the candidate
    chunk size in elements.

    Returns ``(scales [N], max_abs [N])`` in ``qmodel.activation_quantizers`` order; the model's
    scales are not changed. A quantizer that only saw zeros gets scale 1.
    """
    if search not in LOCAL_SEARCHES:
        raise QuantizationError(f"local step: unknown local_search {search!r}; use one of {LOCAL_SEARCHES}")
    if samples is not None and samples < 1:
        raise QuantizationError(f"local step: local_samples={samples} must be >= 1 (or None for all rows)")
    fractions = local_grid_fractions(grid, min_fraction)
    indices = torch.arange(grid) if search == "exhaustive" else local_coarse_indices(grid, stride)
    objective = LocalObjective(qmodel, data, samples, seed, max_elements)
    names = objective.names
    candidates = {n: (fractions * objective.maxima[n].double() / objective.quantizers[n].qmax).float()
                  for n in names if objective.maxima[n] > 0}
    errors = objective.sse({n: s[indices] for n, s in candidates.items()})
    evaluated = {n: (indices, acc.sse) for n, acc in errors.items()}
    if search == "coarse_fine":
        fine = {}
        for n, (idx, sse) in evaluated.items():
            brackets = set()
            for j in torch.argsort(sse, stable=True)[:refine].tolist():
                brackets.update(range(int(idx[max(j - 1, 0)]) + 1, int(idx[min(j + 1, len(idx) - 1)])))
            fine[n] = torch.tensor(sorted(brackets - set(idx.tolist())), dtype=torch.long)
        for n, acc in objective.sse({n: candidates[n][f] for n, f in fine.items()}).items():
            idx, order = torch.sort(torch.cat([indices, fine[n]]))
            evaluated[n] = (idx, torch.cat([evaluated[n][1], acc.sse])[order])
    scales = [candidates[n][evaluated[n][0][int(torch.argmin(evaluated[n][1]))]] if n in evaluated else torch.tensor(1.0)
              for n in names]
    return torch.stack(scales).float(), torch.stack([objective.maxima[n] for n in names])


def local_output_mse(qmodel: QuantizedModel, data: CalibrationData, scales: torch.Tensor,
                     max_elements: int = 2**22) -> torch.Tensor:
    """The local step's objective on the whole calibration set for given scales: ``[N, C]`` float64, the
    mean squared layer-output error (as defined in :func:`local_mse_scales`) of quantizer ``i`` with
    scale ``scales[i, c]`` (``scales``: ``[N, C]``, ``C >= 1``, ``qmodel.activation_quantizers``
    order). Two passes over the calibration set."""
    objective = LocalObjective(qmodel, data, max_elements=max_elements)
    if scales.dim() != 2 or scales.shape[0] != len(objective.names) or scales.shape[1] < 1:
        raise QuantizationError(f"local_output_mse: scales have shape {tuple(scales.shape)}; expected [{len(objective.names)}, C>=1]")
    errors = objective.sse({n: scales[i].float() for i, n in enumerate(objective.names)})
    return torch.stack([errors[n].mse() for n in objective.names])

