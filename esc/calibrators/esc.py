"""ESC: evolution-strategy calibration of all activation scales at once (the paper's method).

See :class:`ESCCalibrator` for the exact definition and :mod:`esc.calibrators.fitness` for the
fitness kinds.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esc.calibrators.base import CalibrationData, CalibrationResult, Calibrator
from esc.calibrators.fitness import FITNESS_KINDS, FitnessEvaluator
from esc.calibrators.mse import MSECalibrator
from esc.core.files import load_plain, save_checkpoint
from esc.quant.model import QuantizedModel
from esc.quant.modules import QuantConv1d, QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul
from esc.quant.quantizer import QuantizationError, UniformQuantizer, check_finite

log = logging.getLogger(__name__)

BACKENDS = ("evotorch", "pycma")
FINALS = ("mean", "best")
INITS = ("output_mse", "tensor_mse")


# ------------------------------------------------------------------------------------ local step
def local_grid_fractions(grid: int, min_fraction: float) -> torch.Tensor:
    """``grid`` geometric fractions from ``min_fraction`` to 1 (inclusive), ascending."""
    if grid < 1 or not 0 < min_fraction <= 1:
        raise QuantizationError(f"local grid: need local_grid >= 1 and 0 < local_min_fraction <= 1, got {grid}, {min_fraction}")
    if grid == 1:
        return torch.ones(1, dtype=torch.float64)
    return torch.logspace(math.log10(min_fraction), 0.0, grid, dtype=torch.float64)


def _candidate_diffs(x: torch.Tensor, scales: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``fake_quant(x, s_g) - x`` for every candidate scale ``s_g``: ``[G, *x.shape]`` (symmetric, zero point 0)."""
    s = scales.view(-1, *([1] * x.dim()))
    q = torch.div(x.unsqueeze(0), s)
    q.round_().clamp_(qmin, qmax).mul_(s)
    return q.sub_(x)


LOCAL_SEARCHES = ("exhaustive", "coarse_fine")


class _LocalErrors:
    """Accumulates, for one quantizer, the summed squared layer-output error of each candidate scale in ``scales``.

    ``layer(diff)`` maps the input error ``fake_quant(x) - x`` (``[G, *x.shape]``) to the output
    error of the layer (the layer is linear in the quantized operand, bias excluded), so
    ``layer(diff)`` equals ``out(quantized input) - out(FP input)`` (or, for Linear layers with more
    outputs than inputs, a map with the same per-candidate squared norm and ``numel_ratio`` times
    fewer elements; see :func:`_input_layer`).
    """

    def __init__(self, quantizer: UniformQuantizer, scales: torch.Tensor, max_elements: int) -> None:
        self.quantizer = quantizer
        self.scales = scales
        self.sse = torch.zeros(len(scales), dtype=torch.float64)
        self.count = 0
        self.max_elements = max_elements

    def add(self, x: torch.Tensor, layer: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Fold one FP input ``x`` of the quantizer into the error sums (``layer=None``: tensor MSE)."""
        x = x.detach().float()
        g_total = len(self.scales)
        chunk = 1  # the first candidate alone tells the output size; then chunks of <= max_elements elements
        start = 0
        while start < g_total:
            n = min(chunk, g_total - start)
            diff = _candidate_diffs(x, self.scales[start:start + n].to(x.device), self.quantizer.qmin, self.quantizer.qmax)
            err = layer(diff) if layer is not None else diff
            if start == 0:
                per = err[0].numel()
                self.count += round(per * getattr(layer, "numel_ratio", 1.0))
                chunk = max(1, self.max_elements // max(1, x.numel(), per))
            # float32 sum of squares per candidate (one pass), accumulated over batches in float64
            self.sse[start:start + n] += torch.linalg.vector_norm(err.reshape(n, -1), dim=1).double().square().cpu()
            start += n

    def mse(self) -> torch.Tensor:
        """Mean squared layer-output error of every candidate ``[G]`` (float64)."""
        return self.sse / max(self.count, 1)


class _RowSample:
    """A seeded uniform sample, without replacement, of at most ``k`` rows of a stream of tensors.

    :meth:`add` offers the rows (dim 0) of tensors that share dim 0 and are kept or dropped together
    (the two operands of a matmul). Bottom-k sampling: every offered row gets an i.i.d. uniform
    float64 key from a CPU ``torch.Generator`` seeded with ``seed``, and the ``k`` rows with the
    smallest keys are kept (copies, in stream order), so the sample is deterministic for a seed and
    batch order and does not depend on the device. ``k`` is set by the first batch:
    ``max(1, samples // numel(one row of tensors[0]))``, i.e. at most ``samples`` elements of the
    first tensor, and at least one row.
    """

    def __init__(self, samples: int, seed: int) -> None:
        self.samples = samples
        self.gen = torch.Generator().manual_seed(seed)
        self.k: Optional[int] = None
        self.threshold = math.inf  # a row whose key is not below it cannot enter the sample
        self.keys: list[torch.Tensor] = []
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def add(self, *tensors: torch.Tensor) -> None:
        n = tensors[0].shape[0]
        if n == 0:
            return
        if self.k is None:
            self.k = max(1, self.samples // max(1, tensors[0][0].numel()))
        keys = torch.rand(n, generator=self.gen, dtype=torch.float64)
        idx = torch.nonzero(keys < self.threshold).squeeze(1)
        if len(idx) == 0:
            return
        self.keys.append(keys[idx])
        self.rows.append(tuple(t.detach().float().index_select(0, idx.to(t.device)) for t in tensors))
        if sum(len(k) for k in self.keys) >= self.k:
            kth = torch.cat(self.keys).kthvalue(self.k).values
            chunks = [(k <= kth, k, rows) for k, rows in zip(self.keys, self.rows)]
            self.keys = [k[m] for m, k, _ in chunks if m.any()]
            self.rows = [tuple(t[m.to(t.device)] for t in rows) for m, _, rows in chunks if m.any()]
            self.threshold = float(kth)

    def groups(self) -> list[tuple[torch.Tensor, ...]]:
        """The kept rows, concatenated in stream order per row shape (one group unless the shapes vary)."""
        by_shape: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
        for rows in self.rows:
            by_shape.setdefault(tuple(t.shape[1:] for t in rows), []).append(rows)
        return [tuple(torch.cat(parts) for parts in zip(*chunks)) for chunks in by_shape.values()]


def _owner_map(qmodel: QuantizedModel) -> dict[int, list[tuple[str, torch.nn.Module]]]:
    """``id(quantizer) -> [(slot kind, module), ...]`` for activation quantizers inside known quantized
    modules (a shared quantizer has one entry per slot it fills)."""
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for module in qmodel.model.modules():
        if isinstance(module, (QuantLinear, QuantConv1d, QuantConv2d)):
            slots = [("input", module.input_quantizer)]
        elif isinstance(module, QuantLayerNorm):
            slots = [("tensor", module.input_quantizer), ("tensor", module.output_quantizer)]
        elif isinstance(module, QuantMatMul):
            slots = [("matmul_a", module.a_quantizer), ("matmul_b", module.b_quantizer)]
        else:
            continue
        for kind, q in slots:
            owners.setdefault(id(q), []).append((kind, module))
    return owners


def _layer_role(entries: list[tuple[str, torch.nn.Module]]) -> tuple[str, object]:
    """The error the local step measures for a quantizer filling the slots ``entries``: through its
    consumer layer(s) (``input``: Linear inputs sharing one tensor are stacked into one map), through
    its one attention product (``matmul_a`` / ``matmul_b``), or of the tensor itself."""
    inputs = [m for kind, m in entries if kind == "input"]
    if inputs and (len(inputs) == 1 or all(isinstance(m, QuantLinear) for m in inputs)):
        return "input", inputs
    if len(entries) == 1 and entries[0][0].startswith("matmul"):
        return entries[0]
    return "tensor", None


class _LinearError:
    """``d -> d @ M^T`` with ``||d @ M^T|| = ||d @ W^T||`` per row: ``M = W`` or, when ``W`` ([out, in])
    has more rows than columns, the ``[in, in]`` factor ``R`` of ``W = QR`` (``W^T W = R^T R``), which
    is ``out / in`` times cheaper; ``numel_ratio`` restores the true output element count."""

    def __init__(self, weight: torch.Tensor) -> None:
        out_features, in_features = weight.shape
        if out_features > in_features:
            self.matrix = torch.linalg.qr(weight.detach().double(), mode="r").R.float()
            self.numel_ratio = out_features / in_features
        else:
            self.matrix, self.numel_ratio = weight.detach(), 1.0

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        return F.linear(d, self.matrix)


def _input_layer(modules: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bias-free linear map of the consumer Linear/Conv module(s) on ``[G, B, ...]`` input errors
    (weights as now quantized; several Linear consumers of one tensor: their weights stacked)."""
    with torch.no_grad():
        weights = [m.quantized_weight().detach().float() for m in modules]
    if isinstance(modules[0], QuantLinear):
        return _LinearError(torch.cat(weights, dim=0))
    module, weight = modules[0], weights[0]

    def conv(d: torch.Tensor) -> torch.Tensor:
        out = module._conv_forward(d.reshape(-1, *d.shape[2:]), weight, None)
        return out.reshape(d.shape[0], d.shape[1], *out.shape[1:])
    return conv


def _sample_rows(role: str, module: object, x: torch.Tensor) -> torch.Tensor:
    """The independent rows of a quantizer's FP input for :class:`_RowSample`: tokens ``[-1, in]`` for
    Linear inputs and for tensor-MSE quantizers (the last dim), samples (dim 0) for Conv inputs."""
    if role == "input" and not isinstance(module[0], QuantLinear):
        return x
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def _matmul_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matmul operands ``[..., M, K]`` and ``[..., K, N]`` as ``[L, M, K]`` and ``[L, K, N]`` (leading dims
    broadcast and flattened): row ``l`` of the product depends on row ``l`` of each operand only."""
    if a.dim() < 2 or b.dim() < 2:
        raise QuantizationError("local step: a row sample of matmul operands needs operands with >= 2 dims; "
                                "use local_samples=None")
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return (a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:]),
            b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:]))


def _error_operand(role: str, layer: Optional[Callable], tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, Optional[Callable]]:
    """``(x, map)`` for :meth:`_LocalErrors.add`: the quantized operand and the linear map of its error
    (``tensors``: the quantizer's input, or a matmul's two operands)."""
    if role == "matmul_a":
        a, b = tensors
        return a, lambda d: torch.matmul(d, b)
    if role == "matmul_b":
        a, b = tensors
        return b, lambda d: torch.matmul(a, d)
    return tensors[0], layer


class _LocalObjective:
    """The local step's objective, the per-quantizer layer-output error of candidate scales (see
    :func:`local_mse_scales` for its definition).

    Construction runs one pass over the calibration set (all activation quantizers off) that
    records ``maxima`` (``max |x|`` of every quantizer's FP input) and, with ``samples`` set, a
    :class:`_RowSample` of at most ``samples`` elements of what each quantizer's error needs (its
    input; both operands of a matmul, one sample per matmul). :meth:`sse` then sums the errors of
    candidate scales: with ``samples=None`` in one more pass over the whole calibration set, with
    ``samples`` on the kept rows (no forward pass). Computed once and shared by every call: the
    maxima, the row samples and each consumer layer's error map (its quantized weight, QR-reduced).
    """

    def __init__(self, qmodel: QuantizedModel, data: CalibrationData, samples: Optional[int] = None, seed: int = 0,
                 max_elements: int = 2**22) -> None:
        self.data, self.max_elements = data, max_elements
        self.quantizers = qmodel.activation_quantizers
        self.names = list(self.quantizers)
        self._qmodel = qmodel
        owners = _owner_map(qmodel)
        self.roles = {name: _layer_role(owners.get(id(q), [])) for name, q in self.quantizers.items()}
        self.layers = {name: _input_layer(module) for name, (role, module) in self.roles.items() if role == "input"}
        self.maxima = {name: torch.zeros((), dtype=torch.float32) for name in self.names}
        seen = {name: 0 for name in self.names}
        samplers = {} if samples is None else {self._key(name): _RowSample(samples, seed) for name in self.names}

        def observer(name: str) -> Callable[[torch.Tensor], None]:
            role, module = self.roles[name]
            sampler = None if role.startswith("matmul") else samplers.get(name)

            def observe(x: torch.Tensor) -> None:
                check_finite(x, name)
                seen[name] += x.numel()
                if x.numel():
                    self.maxima[name] = torch.maximum(self.maxima[name], x.abs().max().float().cpu())
                if sampler is not None:
                    sampler.add(_sample_rows(role, module, x))
            return observe

        matmuls = {id(m): m for role, m in self.roles.values() if role.startswith("matmul")} if samples is not None else {}
        self._pass({name: observer(name) for name in self.names},
                   [(m, lambda a, b, s=samplers[key]: s.add(*_matmul_rows(a, b))) for key, m in matmuls.items()])
        for name in self.names:
            if seen[name] == 0:
                raise QuantizationError(f"quantizer {name!r} saw no activations on the calibration data; it is not on the "
                                        "forward path of the calibration batches (skip it in the model config)")
        self.captured = None if samples is None else {key: s.groups() for key, s in samplers.items()}

    def _key(self, name: str) -> object:
        """Whose row sample a quantizer's error uses: its own, or its matmul's (shared by both operands)."""
        role, module = self.roles[name]
        return id(module) if role.startswith("matmul") else name

    def _pass(self, observers: dict[str, Callable], hooks: list[tuple[torch.nn.Module, Callable]]) -> None:
        """One FP pass over the calibration set: ``observers[name](x)`` sees quantizer ``name``'s input,
        ``fn(a, b)`` of each ``(matmul module, fn)`` in ``hooks`` its operands (float32, detached)."""
        states = {name: q.enabled for name, q in self.quantizers.items()}

        def pre_hook(fn: Callable) -> Callable:
            return lambda module, args: fn(args[0].detach().float(), args[1].detach().float())
        handles = [m.register_forward_pre_hook(pre_hook(fn)) for m, fn in hooks]
        try:
            for name, q in self.quantizers.items():
                q.observer, q.enabled = observers.get(name), False
            with torch.no_grad():
                for batch in self.data.batches:
                    self.data.forward(self._qmodel, batch)
        finally:
            for h in handles:
                h.remove()
            for name, q in self.quantizers.items():
                q.observer, q.enabled = None, states[name]

    def sse(self, scales: dict[str, torch.Tensor]) -> dict[str, _LocalErrors]:
        """The accumulated errors of the candidate scales ``scales[name]`` (``[G]`` float32) of each named
        quantizer (names with no candidates are left out)."""
        errors = {name: _LocalErrors(self.quantizers[name], s, self.max_elements) for name, s in scales.items() if len(s)}
        if self.captured is not None:
            for name, acc in errors.items():
                for tensors in self.captured[self._key(name)]:
                    acc.add(*_error_operand(self.roles[name][0], self.layers.get(name), tensors))
            return errors
        observers: dict[str, Callable] = {}
        matmuls: dict[int, tuple[torch.nn.Module, list]] = {}
        for name, acc in errors.items():
            role, module = self.roles[name]
            if role.startswith("matmul"):
                matmuls.setdefault(id(module), (module, []))[1].append((role, acc))
            else:
                observers[name] = (lambda acc, layer: lambda x: acc.add(x, layer))(acc, self.layers.get(name))

        def matmul_fn(entries: list) -> Callable:
            def fn(a: torch.Tensor, b: torch.Tensor) -> None:
                for role, acc in entries:
                    acc.add(*_error_operand(role, None, (a, b)))
            return fn
        if errors:
            self._pass(observers, [(m, matmul_fn(entries)) for m, entries in matmuls.values()])
        return errors


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
    sample (:class:`_RowSample`, ``seed``) of at most ``samples`` elements per quantizer, kept
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
    objective = _LocalObjective(qmodel, data, samples, seed, max_elements)
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
    objective = _LocalObjective(qmodel, data, max_elements=max_elements)
    if scales.dim() != 2 or scales.shape[0] != len(objective.names) or scales.shape[1] < 1:
        raise QuantizationError(f"local_output_mse: scales have shape {tuple(scales.shape)}; expected [{len(objective.names)}, C>=1]")
    errors = objective.sse({n: scales[i].float() for i, n in enumerate(objective.names)})
    return torch.stack([errors[n].mse() for n in objective.names])


# ----------------------------------------------------------------------------------- calibrator
class ESCCalibrator(Calibrator):
    """Evolution-strategy calibration (ESC): local per-layer MSE scales, then CMA-ES on all scales.

    Exact definition:

    1. **Local step** (:func:`local_mse_scales`): each activation quantizer ``i`` gets the scale
       ``s_i`` minimising the MSE between its layer's output with the FP input and with that input
       quantized (weights as currently quantized in both, so only the input quantization is
       measured). Layer: the module itself for Linear/Conv input quantizers; the tensor itself
       (tensor MSE) for LayerNorm output quantizers; the matmul with the other operand in float
       for MatMul operand quantizers. Grid: ``local_grid`` geometric fractions of the observed
       ``max |x|`` from ``local_min_fraction`` to 1 (clip ``c = f * max|x|``, ``s = c / qmax``).
       Two passes over the calibration set (max, then errors of all candidates batched).
       Cheaper options (not the default, so existing results stay reproducible; see
       :func:`local_mse_scales`): ``local_search="coarse_fine"`` evaluates every ``local_stride``-th
       grid candidate, then the grid between the coarse neighbours of the ``local_refine`` best
       (at most 47 of 100 candidates at the defaults 10 and 2), and ``local_samples`` evaluates
       the errors on a seeded (``seed``) row sample of at most that many elements per quantizer,
       kept in the max pass (one pass over the calibration set in all).
       ``init="tensor_mse"`` starts instead from the :class:`~esc.calibrators.mse.MSECalibrator`
       scales (MSE of the quantized activation tensor itself, its default grid), for comparison.
    2. **Global step**: CMA-ES over ``theta`` in ``R^N`` (``N`` = number of activation quantizers)
       with ``scales = s_local * exp(clip(theta, -theta_bound, theta_bound))``, starting at
       ``theta = 0`` with step size ``sigma0``, population ``popsize`` (``None``: CMA-ES default
       ``4 + floor(3 ln N)``), for ``generations`` generations (``separable``: diagonal covariance).
       ``backend="evotorch"`` uses ``evotorch.algorithms.CMAES`` on a vectorized, seeded
       ``evotorch.Problem`` (``num_actors``: that many Ray actors split each population's fitness
       evaluation; every actor holds its own copy of the quantized model and the calibration data, so
       actors scale the evaluation over cores or GPUs, not the model size a device can hold; same
       result as in process for a seed; ``None`` = in process); ``backend="pycma"`` uses ``cma.CMAEvolutionStrategy``
       (seed ``seed + 1``, since pycma treats 0 as "random"; stopping criteria are ignored so
       exactly ``generations`` generations run) as a cross-check.
    3. **Fitness** (:mod:`esc.calibrators.fitness`) of a population: one batched forward pass over
       the calibration set with the quantizers holding ``[P]`` scales (``batched=False``: one pass
       per candidate, same values); ``fitness="task"``: mean per-sample task loss; ``"kl"``: mean
       ``KL(softmax FP logits || softmax quantized logits)`` over the last dim; ``"mse"``: MSE to
       the FP outputs. FP outputs (every quantizer off) are computed once and cached.
       ``max_batch`` bounds the samples per forward by splitting the population into chunks;
       ``max_batch="auto"`` times chunk sizes on the first generation and keeps the fastest per
       candidate, never slower than one by one on that probe (``history["population_chunk"]``;
       see :class:`~esc.calibrators.fitness.FitnessEvaluator`).
    4. **Result**: ``final="mean"``: the mean of the final search distribution (the paper);
       ``"best"``: the best sample seen in any generation. **Guard**: if the result's fitness is
       worse than the local start's, the local scales are kept (and a warning is logged).

    ``generations=0`` is the local step alone. ``monitor`` (a callable returning e.g. the test
    metric of the model as currently set; the runner wires it to the task when
    ``calibration.monitor_every > 0``) is called on the mean solution at generation 1 and every
    ``monitor_every`` generations: ``history`` then holds ``monitor_generation``,
    ``monitor_fitness`` (calibration fitness of the mean) and ``monitor_metric``. Monitoring costs
    test evaluations; their time is excluded from ``seconds`` (the calibration cost).

    ``CalibrationResult.history``: ``best`` and ``mean`` population fitness and ``sigma`` per
    generation (length ``generations``), ``local_fitness``, ``search_fitness`` (fitness of the
    search result before the guard), ``final_fitness`` (of the scales set) and ``kept_local``
    (1.0 if the guard fired), each a one-element list; with ``max_batch="auto"`` also
    ``population_chunk`` (the chosen candidates per forward). ``forward_passes`` counts full passes
    over the calibration set: the local step's (:func:`local_passes`: 2 by default, 1 with
    ``local_samples``, 3 for ``coarse_fine`` without) + 1 (FP reference, kl/mse only) + one per
    evaluated candidate (a batched pass of ``P`` candidates counts ``P``). Deterministic under
    ``seed`` (with ``max_batch="auto"``, see its caveat on batch-size-dependent rounding).

    **Interruption**: with ``state_path`` set (the runner sets it next to the calibration cache),
    the local scales and every generation's population fitness are saved there (after the local
    step and every ``save_every`` generations); a killed run started again with the same settings
    replays the saved generations without forward passes and ends exactly as an uninterrupted run
    (:meth:`_load_state`). The file is deleted when the search ends.

    ESC needs symmetric per-tensor activation quantizers (a scale per quantizer, zero point 0).
    After ``calibrate``, ``timings`` holds wall seconds: ``local`` (local step), ``fitness`` (all
    fitness evaluations), ``forward`` (the model forwards inside them), ``search_overhead``
    (everything else: FP reference pass, CMA-ES, bookkeeping; with Ray actors also the population
    evaluations, which the actors' own evaluator copies time) and ``total``;
    ``CalibrationResult.timings`` (recorded in the result row) adds ``generations_run`` (generations
    evaluated in this process: fewer after a resume), ``popsize``, ``seconds_per_generation`` (the
    search loop's wall time over ``generations_run``) and ``fp32_pass`` (one FP32 forward over the
    calibration set, timed after the search), so ``seconds_per_generation / (popsize * fp32_pass)``
    is ESC's cost per generation in units of the forward passes it needs.
    """

    name = "esc"

    def __init__(self, generations: int = 100, popsize: Optional[int] = None, sigma0: float = 0.1,
                 fitness: str = "task", final: str = "mean", backend: str = "evotorch", separable: bool = False,
                 local_grid: int = 100, local_min_fraction: float = 1e-3, batched: bool = True, seed: int = 0,
                 num_actors: Optional[int | str] = None, max_batch: Optional[int | str] = None, theta_bound: float = 10.0,
                 local_max_elements: int = 2**22, progress: bool = True, monitor_every: int = 0,
                 monitor: Optional[Callable[[], float]] = None, init: str = "output_mse",
                 state_path: Optional[str | Path] = None, save_every: int = 10, local_search: str = "exhaustive",
                 local_stride: int = 10, local_refine: int = 2, local_samples: Optional[int] = None) -> None:
        if fitness not in FITNESS_KINDS:
            raise QuantizationError(f"ESC: unknown fitness {fitness!r}; use one of {FITNESS_KINDS}")
        if final not in FINALS:
            raise QuantizationError(f"ESC: unknown final {final!r}; use one of {FINALS}")
        if init not in INITS:
            raise QuantizationError(f"ESC: unknown init {init!r}; use one of {INITS}")
        if backend not in BACKENDS:
            raise QuantizationError(f"ESC: unknown backend {backend!r}; use one of {BACKENDS}")
        if generations < 0:
            raise QuantizationError(f"ESC: generations={generations} must be >= 0")
        if popsize is not None and popsize < 2:
            raise QuantizationError(f"ESC: popsize={popsize} must be >= 2 (or None for the CMA-ES default)")
        if sigma0 <= 0:
            raise QuantizationError(f"ESC: sigma0={sigma0} must be > 0")
        if local_search not in LOCAL_SEARCHES:
            raise QuantizationError(f"ESC: unknown local_search {local_search!r}; use one of {LOCAL_SEARCHES}")
        self.local_search, self.local_stride, self.local_refine = local_search, int(local_stride), int(local_refine)
        self.local_samples = None if local_samples is None else int(local_samples)
        self.generations, self.popsize, self.sigma0 = generations, popsize, sigma0
        self.fitness, self.final, self.backend, self.separable = fitness, final, backend, separable
        self.local_grid, self.local_min_fraction = local_grid, local_min_fraction
        self.batched, self.seed, self.num_actors, self.max_batch = batched, seed, num_actors, max_batch
        self.theta_bound, self.local_max_elements, self.progress = theta_bound, local_max_elements, progress
        self.monitor_every, self.monitor, self.init = int(monitor_every), monitor, init
        if save_every < 1:
            raise QuantizationError(f"ESC: save_every={save_every} must be >= 1")
        self.state_path, self.save_every = (Path(state_path) if state_path else None), int(save_every)
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------------------------- helpers
    @property
    def remote(self) -> bool:
        """Whether Ray actors evaluate the populations (``num_actors`` set, evotorch backend)."""
        return self.backend == "evotorch" and self.num_actors not in (None, 0)

    @staticmethod
    def default_popsize(n: int) -> int:
        """CMA-ES default population ``4 + floor(3 ln n)``."""
        return 4 + int(math.floor(3 * math.log(max(n, 1))))

    def _check(self, qmodel: QuantizedModel) -> None:
        quantizers = qmodel.activation_quantizers
        if not quantizers:
            raise QuantizationError("ESC: the model has no activation quantizers; quantize it with an activation spec first")
        for name, q in quantizers.items():
            if not q.symmetric or q.granularity != "tensor":
                raise QuantizationError(f"ESC: quantizer {name!r} is {'asymmetric' if not q.symmetric else q.granularity}; "
                                        "ESC calibrates symmetric per-tensor activation scales (use QuantSpec(bits, True, 'tensor'))")

    def _local_scales(self, qmodel: QuantizedModel, data: CalibrationData) -> torch.Tensor:
        """The start of the search: per-layer output-MSE scales, or the tensor-MSE calibrator's (``init``)."""
        if self.init == "tensor_mse":
            MSECalibrator().calibrate(qmodel, data)
            return qmodel.activation_scales().float()
        return local_mse_scales(qmodel, data, self.local_grid, self.local_min_fraction, self.local_max_elements,
                                self.local_search, self.local_stride, self.local_refine, self.local_samples, self.seed)[0]

    def _scales(self, s_local: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if isinstance(theta, torch.Tensor) and type(theta) is not torch.Tensor:
            theta = theta.as_subclass(torch.Tensor)  # evotorch hands over read-only tensor subclasses
        theta = torch.as_tensor(theta, dtype=torch.float32).clamp(-self.theta_bound, self.theta_bound)
        return s_local * torch.exp(theta)

    # ------------------------------------------------------------------------------- calibrate
    def calibrate(self, qmodel: QuantizedModel, data: CalibrationData) -> CalibrationResult:
        """Run the local step, then CMA-ES; set the final scales on ``qmodel``."""
        if self.backend == "evotorch":
            import evotorch.algorithms  # noqa: F401  (first import takes seconds: not part of the timings)
        start = time.perf_counter()
        self._check(qmodel)
        saved = self._load_state(len(qmodel.activation_quantizers))
        if saved is None:
            s_local = self._local_scales(qmodel, data)
            t_local = time.perf_counter() - start
        else:
            s_local, t_local = saved["s_local"], float(saved["t_local"])
            log.info("ESC: resuming from %s (local step and %d generations saved)", self.state_path, len(saved["fitness"]))
        n = len(s_local)
        popsize = self.popsize or self.default_popsize(n)
        evaluator = FitnessEvaluator(qmodel, data, self.fitness, self.batched, self.max_batch)
        local_fit = float(evaluator(s_local)[0])
        if not math.isfinite(local_fit):  # a NaN candidate scores inf (CMA-ES discards it), but not the start
            raise QuantizationError(f"ESC: the {self.fitness} fitness of the local start is {local_fit} on the calibration "
                                    "data; check that the FP32 model's outputs and the task loss are finite there")
        fitness_log: list[torch.Tensor] = []  # every generation's population fitness: the search state (see _load_state)
        replay = list(saved["fitness"]) if saved else []
        self._save_state(s_local, t_local, fitness_log)
        log.info("ESC: %d activation quantizers, local step %.2fs, local fitness (%s) %.6g; CMA-ES (%s) popsize %d, "
                 "%d generations, sigma0 %g", n, t_local, self.fitness, local_fit, self.backend, popsize,
                 self.generations, self.sigma0)

        def objective(theta: torch.Tensor) -> torch.Tensor:
            fit = replay.pop(0) if replay else evaluator(self._scales(s_local, theta))
            fitness_log.append(fit.detach().double().cpu().clone())
            if not replay and len(fitness_log) % self.save_every == 0:
                self._save_state(s_local, t_local, fitness_log)
            return fit.to(torch.float64)

        history: dict[str, list[float]] = {"best": [], "mean": [], "sigma": []}
        best_theta, best_fit = torch.zeros(n), local_fit
        center, self._monitor_seconds = None, 0.0
        run = self._run_evotorch if self.backend == "evotorch" else self._run_pycma
        t_search = time.perf_counter()
        try:  # on any error, leave the model with the local scales rather than a population
            for gen, (pop_theta, pop_fit, sigma, center) in enumerate(run(objective, n, popsize), start=1):
                history["best"].append(float(pop_fit.min()))
                history["mean"].append(float(pop_fit.mean()))
                history["sigma"].append(float(sigma))
                i = int(torch.argmin(pop_fit))
                if float(pop_fit[i]) < best_fit:
                    best_theta, best_fit = pop_theta[i].clone(), float(pop_fit[i])
                if self.monitor is not None and self.monitor_every and (gen % self.monitor_every == 0 or gen == 1):
                    self._record_monitor(qmodel, evaluator, s_local, center(), gen, history)
            t_search = time.perf_counter() - t_search - self._monitor_seconds
            if center is None:  # generations=0: the local step alone
                final_theta, search_fit = best_theta, local_fit
            elif self.final == "mean":
                final_theta = center()
                search_fit = float(evaluator(self._scales(s_local, final_theta))[0])
            else:
                final_theta, search_fit = best_theta, best_fit
        except BaseException:
            qmodel.set_activation_scales(s_local)
            raise
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)  # the finished calibration is cached by the caller
        kept_local = search_fit > local_fit
        if kept_local:
            log.warning("ESC: the search result's fitness %.6g is worse than the local start's %.6g; keeping the local scales",
                        search_fit, local_fit)
            final_scales, final_fit = s_local, local_fit
        else:
            final_scales, final_fit = self._scales(s_local, final_theta), search_fit
        qmodel.set_activation_scales(final_scales)
        seconds = time.perf_counter() - start - self._monitor_seconds
        self.timings = dict(local=t_local, fitness=evaluator.seconds, forward=evaluator.forward_seconds, total=seconds,
                            search_overhead=seconds - t_local - evaluator.seconds)
        run_here = self.generations - (len(saved["fitness"]) if saved else 0)  # generations evaluated in this process
        row_timings = dict(self.timings, generations_run=float(run_here), popsize=float(popsize),
                           seconds_per_generation=t_search / run_here if run_here else 0.0,
                           fp32_pass=self._fp32_pass_seconds(qmodel, data))
        remote = popsize * len(history["best"]) if self.remote else 0  # counted by the actors' evaluator copies
        remote += popsize * len(saved["fitness"]) if saved else 0  # evaluated before the interruption
        local = local_passes(self.local_search, self.local_samples) if self.init == "output_mse" else 2
        passes = local + (1 if evaluator.reference is not None else 0) + evaluator.evaluations + remote
        history.update(local_fitness=[local_fit], search_fitness=[search_fit], final_fitness=[final_fit],
                       kept_local=[float(kept_local)])
        if evaluator.chunk is not None:
            history["population_chunk"] = [float(evaluator.chunk)]
        log.info("ESC: fitness %.6g -> %.6g in %.1fs (%d candidate evaluations)", local_fit, final_fit, seconds,
                 evaluator.evaluations)
        return CalibrationResult(seconds=seconds, forward_passes=passes, history=history, timings=row_timings)

    @staticmethod
    def _fp32_pass_seconds(qmodel: QuantizedModel, data: CalibrationData) -> float:
        """Wall seconds of one FP32 forward over the calibration set (quantizers off): the unit in which
        a generation's cost is judged (``seconds_per_generation / (popsize * fp32_pass)``)."""
        with qmodel.quant_state(weights=False, activations=False), torch.no_grad():
            start = time.perf_counter()
            for batch in data.batches:
                data.forward(qmodel, batch)
            return time.perf_counter() - start

    def _save_state(self, s_local: torch.Tensor, t_local: float, fitness_log: list[torch.Tensor]) -> None:
        """Write the search state to ``state_path`` (atomically): the local scales, the local step's
        seconds and the population fitness of every generation so far."""
        if self.state_path is None:
            return
        save_checkpoint({"s_local": s_local.detach().cpu(), "t_local": float(t_local), "fitness": list(fitness_log),
                         "settings": self._state_settings()}, self.state_path)

    def _state_settings(self) -> dict:
        """What a saved search state must match; the cheaper local-step options count only when set, so
        that states saved before they existed stay valid."""
        settings = {"generations": self.generations, "popsize": self.popsize, "sigma0": self.sigma0, "fitness": self.fitness,
                    "backend": self.backend, "separable": self.separable, "seed": self.seed, "init": self.init,
                    "local_grid": self.local_grid, "local_min_fraction": self.local_min_fraction}
        if self.local_search != "exhaustive" or self.local_samples is not None:
            settings.update(local_search=self.local_search, local_stride=self.local_stride, local_refine=self.local_refine,
                            local_samples=self.local_samples)
        return settings

    def _load_state(self, n: int) -> Optional[dict]:
        """The saved search state of an interrupted run with these settings, or ``None``.

        Resuming replays the search: CMA-ES is deterministic under ``seed``, so asking again yields
        the same populations, and the saved fitness values answer them without a forward pass until
        the saved generations run out; from there the search continues live, and ends exactly as
        an uninterrupted run would. A state from other settings or another model is ignored.
        """
        if self.state_path is None or not self.state_path.is_file():
            return None
        state = load_plain(self.state_path, "delete it to restart the ESC search")
        if state.get("settings") != self._state_settings() or len(state["s_local"]) != n:
            log.warning("ESC: ignoring %s (saved by a run with other settings)", self.state_path)
            return None
        return state

    def _record_monitor(self, qmodel: QuantizedModel, evaluator, s_local: torch.Tensor, theta: torch.Tensor,
                        generation: int, history: dict[str, list[float]]) -> None:
        """Record the calibration fitness and the ``monitor()`` value (e.g. the test metric) of the current mean."""
        start = time.perf_counter()
        counters = evaluator.evaluations, evaluator.seconds, evaluator.forward_seconds
        scales = self._scales(s_local, theta)
        fitness = float(evaluator(scales)[0])
        evaluator.evaluations, evaluator.seconds, evaluator.forward_seconds = counters  # monitoring is not calibration cost
        qmodel.set_activation_scales(scales)
        history.setdefault("monitor_generation", []).append(float(generation))
        history.setdefault("monitor_fitness", []).append(fitness)
        history.setdefault("monitor_metric", []).append(float(self.monitor()))
        self._monitor_seconds += time.perf_counter() - start

    # --------------------------------------------------------------------------------- backends
    def _bar(self):
        return tqdm(range(self.generations), desc=f"ESC ({self.backend})", disable=not self.progress, leave=False)

    def _run_evotorch(self, objective, n: int, popsize: int):
        """Yield ``(theta [P, N], fitness [P], sigma, center_fn)`` per generation with evotorch's CMAES."""
        from evotorch import Problem
        from evotorch.algorithms import CMAES

        problem = Problem("min", objective, solution_length=n, initial_bounds=(-self.sigma0, self.sigma0),
                          vectorized=True, seed=None if self.remote else self.seed, num_actors=self.num_actors,
                          dtype=torch.float32, eval_dtype=torch.float64, device="cpu", store_solution_stats=False)
        if self.remote:  # evotorch 0.6.1's actors call a missing Problem.seed() on a seeded Problem: start them unseeded,
            problem.all_remote_problems()  # now, then seed the main copy (the only one that samples)
            problem.manual_seed(self.seed)
        with warnings.catch_warnings():  # evotorch copy-constructs its own weight tensor (harmless UserWarning)
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            searcher = CMAES(problem, stdev_init=self.sigma0, popsize=popsize, center_init=[0.0] * n,
                             separable=self.separable)
        center = lambda: searcher.m.detach().clone().float()  # noqa: E731
        for _ in self._bar():
            searcher.step()
            pop = searcher.population
            yield pop.values.detach().clone(), pop.evals[:, 0].detach().clone(), float(searcher.sigma), center

    def _run_pycma(self, objective, n: int, popsize: int):
        """Yield ``(theta [P, N], fitness [P], sigma, center_fn)`` per generation with pycma."""
        import cma

        opts = {"popsize": popsize, "seed": self.seed + 1, "verbose": -9, "verb_disp": 0, "verb_log": 0,
                "CMA_diagonal": bool(self.separable), "maxiter": max(self.generations, 1), "tolfun": 0, "tolx": 0,
                "tolfunhist": 0, "tolstagnation": 10**9, "tolflatfitness": 10**9}
        es = cma.CMAEvolutionStrategy(np.zeros(n), self.sigma0, opts)
        center = lambda: torch.as_tensor(np.asarray(es.mean), dtype=torch.float32)  # noqa: E731
        for _ in self._bar():
            xs = es.ask()
            theta = torch.as_tensor(np.asarray(xs), dtype=torch.float32)
            fit = objective(theta)
            es.tell(xs, fit.double().tolist())
            yield theta, fit, float(es.sigma), center
