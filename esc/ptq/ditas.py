"""DiTAS (Dong and Zhang, WACV 2025): SmoothQuant smoothing with its alpha searched per layer, and a float
low-rank compensation of each Linear's weight quantization error."""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from esc.calibrators.base import CalibrationData
from esc.calibrators.weights import WEIGHT_CLIPS
from esc.ptq.common import first_batch_outputs, outputs_match, run_batches
from esc.ptq.smoothquant import SmoothQuant
from esc.quant.model import QuantSpec
from esc.quant.modules import QuantLinear
from esc.quant.quantizer import QuantizationError, UniformQuantizer
from esc.quant.roles import matches, register

log = logging.getLogger(__name__)


class LowRankLinear(nn.Linear):
    """``nn.Linear`` with a float low-rank branch: ``y = x W_r^T + b + (x R^T) L^T`` with ``W_r = W - L R``
    (buffers ``left`` = ``L`` ``[out, r]`` and ``right`` = ``R`` ``[r, in]``), i.e. the function of ``x W^T + b``;
    after ``quantize_model`` the weight quantizer rounds ``W_r`` and ``L R`` stays float."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, left: torch.Tensor, right: torch.Tensor) -> "LowRankLinear":
        """A copy of ``linear`` carrying ``L R`` in the branch (a new weight parameter: a weight tied elsewhere is left as is)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight - left @ right)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.register_buffer("left", left.to(linear.weight))
        new.register_buffer("right", right.to(linear.weight))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.right), self.left)


class QuantLowRankLinear(QuantLinear):
    """:class:`LowRankLinear` with its input quantizer on ``x`` and its weight quantizer on ``W_r``; the float
    branch reads the quantized input, as in the official code: ``Q(W_r) Q(x) + L (R Q(x)) + b``."""

    @classmethod
    def from_float(cls, module: LowRankLinear, quantizers: dict, weight) -> "QuantLowRankLinear":
        """Wrap ``module``, sharing its parameters and low-rank factors."""
        new = super().from_float(module, quantizers, weight)
        new.register_buffer("left", module.left)
        new.register_buffer("right", module.right)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias) + F.linear(F.linear(x, self.right), self.left)


register(LowRankLinear, QuantLowRankLinear, lambda m: {"input": "conv_linear_input"}, has_weight=True)

Spec = Union[QuantSpec, Mapping, None]


def as_spec(node: Spec) -> Optional[QuantSpec]:
    """A :class:`QuantSpec` from a precision sub-config (``bits``, ``symmetric``, ``granularity``), a spec, or ``None`` (float)."""
    if node is None or isinstance(node, QuantSpec):
        return node
    return QuantSpec(int(node["bits"]), bool(node["symmetric"]), str(node["granularity"]))


def set_clip(quantizer: UniformQuantizer, lo: torch.Tensor, hi: torch.Tensor) -> UniformQuantizer:
    """Max calibration of ``quantizer`` on a tensor with range ``[lo, hi]``: clip ``max(|lo|, |hi|)`` (symmetric) or ``[lo, hi]``."""
    if quantizer.symmetric:
        quantizer.set_clip_range(torch.maximum(lo.abs(), hi.abs()))
    else:
        quantizer.set_clip_range(lo, hi)
    return quantizer


def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation ``L R`` of ``matrix`` (truncated SVD), split as in the official code:
    ``L = U_r sqrt(S_r)`` ``[out, r]``, ``R = sqrt(S_r) V_r^T`` ``[r, in]``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


class DiTAS(SmoothQuant):
    """DiTAS (Dong and Zhang, "DiTAS: Quantizing Diffusion Transformers via Enhanced Activation Smoothing",
    WACV 2025, arXiv:2409.07756; official code github.com/DZY122/DiTAS: ``LinearQuant.py`` (``optimization``, the
    ``findscale`` branch of ``LinearQuantLoRA.forward``, ``replace_module``, ``low_rank_decomposition``), the order
    of the steps in ``QuantDiT.py``, the quantizers in ``utils_qaunt.py``).

    Stage ``before`` (acts on the float model). Touches: what :class:`~esc.ptq.smoothquant.SmoothQuant` touches
    (the ``weight``/``bias`` of each smoothed LayerNorm, the ``weight`` of its consumer Linears), then, with
    ``rank > 0`` and quantized weights, every ``nn.Linear`` (exact type) whose path matches ``patterns`` and none of
    ``exclude`` is replaced at its path by a :class:`LowRankLinear`. The float function is unchanged (``verify``
    checks both steps on the first calibration batch, relative tolerance ``rtol``).

    Definitions. (1) Temporal-aggregated smoothing (TAS). The official code records, per Linear, the channel-wise
    ``max |x_j|`` of its input over every sampling step of the diffusion trajectory and smooths with
    ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)``. Carried over to speech: the aggregation over time steps is
    the aggregation over the calibration clips, i.e. the channel-wise max over all clips and positions of each
    LayerNorm output, exactly SmoothQuant's statistic here; ``s`` is :meth:`SmoothQuant.smoothing_scales`
    (maxima clamped below at ``eps``; official ``1e-4``, which it also applies to ``s``), folded into the LayerNorm
    (``gamma /= s``, ``beta /= s``) and its consumers (``W[:, j] *= s_j``). (2) Layer-wise grid search of alpha.
    Official: ``alpha = 0.05 k, k = 0..20``; for each, the sum over the layer's first 50 recorded calls (sampling
    steps) of the mean squared error between its output with smoothed, quantized input and weight (plus the
    low-rank branch) and the float output ``x W^T + b``; the least error wins (ties: the smaller alpha). Here, per LayerNorm group: ``alpha = i / alpha_steps,
    i = 0..alpha_steps`` and ``E(alpha) = mean((Q_a(x / s) [W^_1; W^_2; ...]^T - x [W_1; W_2; ...]^T)^2)`` over
    at most ``max_rows`` rows ``x`` (clip x position, a uniform random subset seeded with ``seed``) of the float
    LayerNorm output and every output channel of the group's Linears (the biases cancel). ``Q_a``: a
    per-tensor quantizer of the run's ``activation`` precision, max-calibrated on ``x / s`` over all calibration
    rows; ``W^_i``: the weight the quantized model will use for ``W_i diag(s)``: ``q(W_i s - B_i) + B_i`` with ``q``
    a weight quantizer of the run's ``weight`` precision (per output channel), its clip set by ``weight_clip``
    (the run's ``calibration.weights``), and ``B_i`` the compensation (3) of ``W_i s`` (``B = 0`` at ``rank=0``;
    ``W^ = W s`` when weights stay float; ``Q_a`` is left out when activations do). (3) Training-free low-rank
    compensation. Official (10 iterations, rank 32): ``B_0 = 0``; ``Q_t = q(W - B_{t-1})``,
    ``B_t = L_t R_t`` the rank-``r`` truncated SVD of ``W - Q_t`` (:func:`low_rank`); the layer computes
    ``Q_T Q(x) + L_T (R_T Q(x)) + b`` with ``L, R`` in float. Here the same alternation (``iterations``, ``rank``,
    ``r = min(rank, out, in)``, ``q`` as in (2)); the layer keeps ``W - B_T`` as its weight and ``B_T`` as float
    branch, so its float function is exactly ``W`` and the pipeline's weight quantizer rounds ``W - B_T``: one more
    ``Q`` step of the same alternation (the official pairs ``Q_T = q(W - B_{T-1})`` with ``B_T``).

    Carried over from diffusion transformers to audio transformers, and what differs. DiT merges the factors of
    ``qkv`` and ``fc1`` into its adaLN modulation (the conditioning MLP that sets the non-affine LayerNorm's shift
    and scale); the audio transformers here have affine LayerNorms, so ``s`` is folded into ``gamma`` and ``beta``
    (SmoothQuant's LayerNorm -> Linear groups, hook search and revert check); q, k and v read one LayerNorm output,
    so they share one ``s`` and one searched alpha (the error of their concatenated outputs is the official fused
    ``qkv`` layer's). Not carried over: the official
    smoothing of ``proj`` (merged into the value weights) and of ``fc2`` (an online division). Order: the official
    computes the compensation first, then multiplies the already quantized ``Q`` and ``R`` by ``s`` (its deployed
    weight ``Q diag(s)`` leaves the uniform grid); here the smoothed weight is quantized (SmoothQuant's order), so
    the search recomputes the compensation for each alpha. The official quantizers are asymmetric min/max
    (activations: per tensor, dynamic, from each call's ``x / s``; weights: ``AsymQuantizer``, ``num_groups=32``); here the search uses the run's grids with
    static max-calibrated activations, and the run's own calibrator then sets the activation scales. The official
    method is data-free (it calibrates on the model's own sampled trajectories); here the task's calibration clips.
    ``weight_scale`` of the official ``s`` is the max of the quantized ``Q`` (the compensation ran first); here of
    the float weight. Cost: with ``rank > 0``, each alpha of each group runs ``iterations`` SVDs per Linear.

    ``alphas`` holds the chosen alpha per smoothed LayerNorm, ``errors`` its ``{alpha: E(alpha)}``, ``compensated``
    the paths of the Linears given a low-rank branch.
    """

    name = "ditas"
    stage = "before"

    def __init__(self, weight: Spec, activation: Spec, weight_clip: str = "minmax", alpha_steps: int = 20, rank: int = 32,
                 iterations: int = 10, patterns: Sequence[str] = ("*",), exclude: Sequence[str] = (), max_rows: int = 4096,
                 seed: int = 0, eps: float = 1e-4, verify: bool = True, rtol: float = 1e-4) -> None:
        if alpha_steps < 1 or rank < 0 or iterations < 1 or max_rows < 1 or weight_clip not in WEIGHT_CLIPS:
            raise QuantizationError(f"DiTAS: need alpha_steps >= 1, rank >= 0, iterations >= 1, max_rows >= 1 and weight_clip in "
                                    f"{sorted(WEIGHT_CLIPS)} (got {alpha_steps}, {rank}, {iterations}, {max_rows}, {weight_clip!r})")
        super().__init__(eps=eps, verify=verify, rtol=rtol)
        self.weight, self.activation = as_spec(weight), as_spec(activation)
        if self.activation is not None and self.activation.granularity != "tensor":
            raise QuantizationError(f"DiTAS: its alpha search quantizes activations per tensor; got activation granularity "
                                    f"{self.activation.granularity!r}")
        self.weight_clip, self.alpha_steps, self.rank, self.iterations = weight_clip, alpha_steps, rank, iterations
        self.patterns, self.exclude, self.max_rows, self.seed = tuple(patterns), tuple(exclude), max_rows, seed
        self.alphas: dict[str, float] = {}
        self.errors: dict[str, dict[float, float]] = {}
        self.compensated: list[str] = []
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # during apply: see record_rows

    @property
    def grid(self) -> list[float]:
        """The searched alphas ``i / alpha_steps``, ``i = 0..alpha_steps``."""
        return [i / self.alpha_steps for i in range(self.alpha_steps + 1)]

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Smooth every LayerNorm -> Linear group with its searched alpha, then give each chosen Linear its compensation."""
        self.alphas, self.errors = {}, {}
        try:
            super().apply(model, data)
        finally:
            self._rows = {}
        self.alphas = {n: a for n, a in self.alphas.items() if n in self.groups}  # a reverted group keeps its float weights
        self.errors = {n: e for n, e in self.errors.items() if n in self.groups}
        self.compensate(model, data)

    def find_groups(self, model: nn.Module, data: CalibrationData) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
        """SmoothQuant's groups and channel maxima, and the rows of each group's LayerNorm output for the search."""
        groups, act_max = super().find_groups(model, data)
        self._rows = self.record_rows(model, data, list(groups))
        return groups, act_max

    def record_rows(self, model: nn.Module, data: CalibrationData, norms: list[str]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per LayerNorm in ``norms``, over the calibration set: ``(rows, lo, hi)``, a uniform random subset of at most
        ``max_rows`` rows of its output (bottom-k of i.i.d. keys from a generator seeded with ``seed``) and the
        channel-wise min and max over all rows."""
        generator = torch.Generator().manual_seed(self.seed)
        kept: dict[str, list[torch.Tensor]] = {}

        def hook(name):
            def record(mod, args, out):
                x = out.detach().reshape(-1, out.shape[-1])
                keys = torch.rand(x.shape[0], generator=generator)
                lo, hi = x.amin(0), x.amax(0)
                if name in kept:
                    rows, old_keys, old_lo, old_hi = kept[name]
                    x, keys = torch.cat([rows, x]), torch.cat([old_keys, keys])
                    lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
                idx = keys.argsort()[:self.max_rows]
                kept[name] = [x[idx.to(x.device)], keys[idx], lo, hi]
            return record

        run_batches(model, data, handles=[model.get_submodule(n).register_forward_hook(hook(n)) for n in norms])
        return {n: (rows, lo, hi) for n, (rows, _, lo, hi) in kept.items()}

    def group_scales(self, norm_name: str, act_max: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
        """The scales at the alpha of least :meth:`output_error` on the grid (the first on ties); records it in ``alphas``."""
        rows, lo, hi = self._rows[norm_name]
        weights = [lin.weight.detach() for lin in linears]
        with torch.no_grad():
            target = rows @ torch.cat(weights).T
            errors = {alpha: self.output_error(rows, lo, hi, weights, target, self.smoothing_scales(act_max, linears, alpha))
                      for alpha in self.grid}
        best = min(errors, key=errors.__getitem__)
        self.alphas[norm_name], self.errors[norm_name] = best, errors
        log.info("%s: %s alpha %.2f (output MSE %.4g; alpha 0.5: %.4g)", self.name, norm_name, best, errors[best],
                 errors.get(0.5, float("nan")))
        return self.smoothing_scales(act_max, linears, best)

    def output_error(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, weights: list[torch.Tensor],
                     target: torch.Tensor, s: torch.Tensor) -> float:
        """``E = mean((Q_a(x / s) [W^_1; ...]^T - target)^2)`` for smoothing scales ``s`` (class docstring, (2)): ``Q_a``
        max-calibrated on the range ``[lo / s, hi / s]`` of all calibration rows, ``W^_i`` :meth:`deployed_weight` of ``W_i s``."""
        x = rows / s
        if self.activation is not None:
            x = set_clip(self.activation.build(f"{self.name}.search.input"), (lo / s).min(), (hi / s).max())(x)
        w = torch.cat([self.deployed_weight(weight * s) for weight in weights])
        return float((x @ w.T - target).pow(2).mean())

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``q(weight)``: a fresh quantizer of the run's weight precision (per output channel, as the pipeline builds it),
        its clip set on ``weight`` by ``weight_clip``."""
        q = self.weight.build(f"{self.name}.search.weight")
        clip = WEIGHT_CLIPS[self.weight_clip](q, weight)
        q.set_clip_range(*clip) if isinstance(clip, tuple) else q.set_clip_range(clip)
        return q(weight)

    def compensation(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The alternating optimisation (class docstring, (3)): ``(L_T, R_T)`` for a float ``weight``."""
        r = min(self.rank, *weight.shape)
        left, right = weight.new_zeros(weight.shape[0], r), weight.new_zeros(r, weight.shape[1])
        for _ in range(self.iterations):
            left, right = low_rank(weight - self.quantize_weight(weight - left @ right), r)
        return left, right

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the quantized model computes with for a float ``weight``: ``q(W - B) + B``, ``B = L R`` its
        :meth:`compensation` (``q(W)`` at ``rank=0``; ``W`` when weights stay float)."""
        if self.weight is None:
            return weight
        if not self.rank:
            return self.quantize_weight(weight)
        left, right = self.compensation(weight)
        b = left @ right
        return self.quantize_weight(weight - b) + b

    def compensate(self, model: nn.Module, data: CalibrationData) -> None:
        """Replace every chosen Linear by a :class:`LowRankLinear` carrying its :meth:`compensation` (``rank > 0`` and
        quantized weights only); refuse the model if its float output changes."""
        self.compensated = []
        if not self.rank or self.weight is None:
            return
        reference = first_batch_outputs(model, data) if self.verify else None
        names = [n for n, m in model.named_modules() if type(m) is nn.Linear and matches(n, self.patterns) and not matches(n, self.exclude)]
        for name in tqdm(names, desc=f"{self.name} compensation", leave=False):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            linear = getattr(owner, child)
            with torch.no_grad():
                left, right = self.compensation(linear.weight.detach())
            setattr(owner, child, LowRankLinear.from_linear(linear, left, right))
        full = [n for n in names if self.rank >= min(model.get_submodule(n).weight.shape)]
        if full:
            log.warning("%s: rank %d covers the whole weight of %d Linears (their weights act as float): %s", self.name,
                        self.rank, len(full), ", ".join(full[:5]))
        if reference is not None and not outputs_match(reference, first_batch_outputs(model, data), self.rtol):
            raise QuantizationError("DiTAS: the low-rank compensation changed the float model's output (a Linear's weight is read "
                                    "outside its forward); leave that Linear out with `exclude`")
        self.compensated = names
        log.info("%s: rank-%d compensation of %d Linears", self.name, self.rank, len(names))
