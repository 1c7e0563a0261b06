"""AdaRound: learned weight rounding by layer-output reconstruction (Nagel et al., ICML 2020).

This module holds the one rounding-reconstruction implementation used by both :class:`AdaRound`
(one quantized layer per reconstruction unit) and :class:`esc.ptq.brecq.BRECQ` (one block per unit).
A *unit* is any module whose forward contains quantized layers; its rounding variables are learned
so that the unit's output, on the inputs it sees in the quantized model, matches the unit's float
output on float inputs.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import (all_quantizers, capture, capture_outputs, first_tensor, float_reference, forward_order, frozen_parameters,
                            no_fastpath, out_channels, quantized_layers, require_quantized, trace_calls)
from esc.quant.quantizer import QuantizationError, UniformQuantizer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- soft rounding
class SoftRounding(nn.Module):
    """Stand-in for a layer's weight quantizer while its rounding is learned.

    With ``s``, ``z``, ``qmin``, ``qmax`` taken from the layer's :class:`UniformQuantizer` and ``W`` the
    float weight: ``W_soft = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)`` with the rectified
    sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``. ``V`` starts where
    ``h(V) = W/s - floor(W/s)`` (so ``W_soft = W`` inside the clip range). With ``hard=True`` the
    rounding is ``floor(W/s) + 1[V >= 0]`` (i.e. ``h(V) >= 0.5``), the value baked into the weight.
    It ignores its input (always the same float weight) and is never registered in a
    ``QuantizedModel`` outside :meth:`AdaRound.reconstruct`.
    """

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> None:
        super().__init__()
        if not quantizer.is_calibrated or quantizer.population_size:
            raise QuantizationError(f"weight quantizer {quantizer.name!r} needs one calibrated scale before AdaRound "
                                    "(calibrate the weights first: esc.calibrators.weights.calibrate_weights)")
        self.enabled = True
        self.hard = False
        self.zeta, self.gamma = zeta, gamma
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        w = weight.detach()
        s, z = quantizer._broadcast(w)
        self.s, self.z = s.detach(), z.detach()
        self.scale, self.zero_point = quantizer.scale, quantizer.zero_point  # read by the layer's weight cache (reset on swap)
        self.w_floor = torch.floor(w / self.s)
        rest = (w / self.s - self.w_floor).clamp(0.0, 1.0)
        self.V = nn.Parameter(-torch.log((zeta - gamma) / (rest - gamma) - 1.0))

    def h(self) -> torch.Tensor:
        """Rectified sigmoid of ``V`` in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.V) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        up = (self.V >= 0).to(self.V.dtype) if self.hard else self.h()
        q = torch.clamp(self.w_floor + up + self.z, self.qmin, self.qmax)
        return (q - self.z) * self.s

    def regulariser(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: zero once every ``h`` is 0 or 1."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


@contextlib.contextmanager
def swapped_weight_quantizers(layers: list[nn.Module], replacements: list[nn.Module]):
    """Temporarily replace each layer's ``weight_quantizer`` (restored on exit, weight caches reset)."""
    saved = [layer.weight_quantizer for layer in layers]
    try:
        for layer, new in zip(layers, replacements):
            layer.weight_quantizer, layer._wq_key = new, None
        yield
    finally:
        for layer, old in zip(layers, saved):
            layer.weight_quantizer, layer._wq_key = old, None


@contextlib.contextmanager
def dropped_quantization(module: nn.Module, prob: float, generator: torch.Generator):
    """QDrop's random dropping inside the block: every enabled activation quantizer in ``module`` returns, per
    element, its input ``x`` with probability ``prob`` and ``Q(x)`` otherwise (a fresh mask from ``generator`` for
    each new input tensor; a shared quantizer reading the same tensor again reuses its mask). No-op for ``prob=0``."""
    if not prob:
        yield
        return
    last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(quantizer, args, out):
        x = args[0]
        seen = last.get(id(quantizer))
        if seen is not None and seen[0] is x:
            return seen[1]
        drop = torch.rand(out.shape, generator=generator).to(out.device) < prob
        mixed = torch.where(drop, x, out)
        last[id(quantizer)] = (x, mixed)
        return mixed

    handles = [q.register_forward_hook(hook) for q in all_quantizers(module) if q.enabled]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------- input cache
class IOCache:
    """A unit's recorded calls (inputs) and target outputs over the calibration set, ready to sample.

    Calls are grouped by structure and shape; inside a group, every tensor leaf whose dim 0 equals
    the target's batch size is concatenated along dim 0 (a *batched* leaf); other leaves (an
    attention mask shared by the batch, flags) must be equal within the group and are kept once.
    Minibatches are drawn from one group at a time (chosen with probability proportional to its size).
    """

    def __init__(self, calls: list[tuple[tuple, dict]], targets: list[torch.Tensor]) -> None:
        if len(calls) != len(targets) or not calls:
            raise QuantizationError(f"reconstruction cache got {len(calls)} input calls and {len(targets)} outputs; "
                                    "the unit must be called (identically) on the float and the quantized model")
        raw: list[dict[str, Any]] = []
        for call, y in zip(calls, targets):
            leaves, spec = tree_flatten(call)
            b = y.shape[0]
            batched = [isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b for v in leaves]
            sig = (spec, tuple(y.shape[1:]), tuple(
                ("b", tuple(v.shape[1:]), v.dtype) if bt else
                ("c", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("o", repr(v))
                for v, bt in zip(leaves, batched)))
            for g in raw:
                if g["sig"] == sig and all(bt or not isinstance(v, torch.Tensor) or torch.equal(v, c)
                                           for v, c, bt in zip(leaves, g["leaves"][0], batched)):
                    g["leaves"].append(leaves)
                    g["targets"].append(y)
                    break
            else:
                raw.append(dict(sig=sig, spec=spec, batched=batched, leaves=[leaves], targets=[y]))
        self.groups = []
        for g in raw:
            cols = list(zip(*g["leaves"]))
            leaves = [torch.cat(col, 0) if bt else col[0] for col, bt in zip(cols, g["batched"])]
            self.groups.append(dict(spec=g["spec"], batched=g["batched"], leaves=leaves, target=torch.cat(g["targets"], 0)))
        self.sizes = torch.tensor([g["target"].shape[0] for g in self.groups], dtype=torch.float)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def _take(self, g: dict, idx: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
        leaves = [v[idx] if bt else v for v, bt in zip(g["leaves"], g["batched"])]
        args, kwargs = tree_unflatten(leaves, g["spec"])
        return args, kwargs, g["target"][idx]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[tuple, dict, torch.Tensor]:
        """A random minibatch ``(args, kwargs, target)`` of at most ``batch_size`` samples."""
        g = self.groups[int(torch.multinomial(self.sizes, 1, generator=generator))] if len(self.groups) > 1 else self.groups[0]
        n = g["target"].shape[0]
        idx = torch.randperm(n, generator=generator)[:batch_size]
        return self._take(g, idx)

    def chunks(self, batch_size: int):
        """Every sample once, in minibatches of at most ``batch_size``."""
        for g in self.groups:
            n = g["target"].shape[0]
            for start in range(0, n, batch_size):
                yield self._take(g, torch.arange(start, min(n, start + batch_size)))


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, channels: int) -> torch.Tensor:
    """Squared error summed over the ``channels`` output channels, averaged over batch and positions:
    ``||out - target||^2 * channels / numel``."""
    return (out - target).pow(2).sum() * channels / out.numel()


# ------------------------------------------------------------------------------------ method
@dataclass
class Unit:
    """One reconstruction unit: a module and the quantized layers inside it (forward order)."""

    name: str
    module: nn.Module
    layers: list[nn.Module]


class AdaRound(PTQMethod):
    """AdaRound (Nagel et al. 2020): per-layer learned up/down rounding of the weights.

    Stage ``after``. Touches: the ``weight`` of every quantized Linear/Conv whose weight quantizer
    is enabled (replaced by its rounded value, which lies on that quantizer's grid). Scales, biases
    and activation quantizers are left unchanged (weight scales must not be recalibrated afterwards).

    Definition, per layer in forward order (:meth:`units`): with ``s``, ``z``, ``[qmin, qmax]`` of the
    layer's weight quantizer, ``W_soft = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)``,
    ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``V`` initialised so ``h(V)`` equals
    the fractional part of ``W/s``. Adam (``lr``) on ``V`` minimises
    ``L = ||f(x_q; W_soft) - f_fp(x_fp)||^2 * C / numel + reg_weight * sum(1 - |2h(V) - 1|^beta)``:
    ``f(x_q; .)`` is the layer as in the quantized model (its input quantizer on) applied to ``x_q``,
    the layer's input in the quantized model (every earlier layer already rounded, activation
    quantizers as set by the calibrator); ``f_fp(x_fp)`` is the float layer's output in the float
    model (all quantizers off, original weights); ``C`` the layer's output channels (squared error
    summed over channels, averaged over batch and positions, as in the reference code). The
    regulariser is off for the first ``warmup * iterations`` steps, then ``beta`` decays linearly from
    ``beta_start`` to ``beta_end``. Each step uses ``batch_size`` cached calibration samples. At the
    end the hard rounding ``floor(W/s) + 1[h(V) >= 0.5]`` is written into the weight, and the
    ordinary weight quantizer is checked to reproduce it exactly. ``keep_better=True`` (not in the
    paper; a guard for short CPU schedules) keeps round-to-nearest for a unit whose learned rounding
    has a higher reconstruction loss on the calibration cache (and bakes the nearest rounding).
    ``drop_prob > 0`` (default 0: off) drops activation quantization at random during the optimisation
    steps, QDrop's change (:class:`esc.ptq.brecq.QDrop`); the before/after losses are fully quantized.

    Defaults are for CPU runs on small models: ``iterations=100, lr=1e-2, batch_size=8`` (about 20 CPU
    seconds on one core for the 0.9M-parameter stand-in of ``benchmarks/ptq_timing.py``, 19 layers,
    100 clips). Paper-faithful values: ``iterations=20000`` (10000 in the BRECQ reference code),
    ``lr=1e-3``, ``batch_size=32``, ``reg_weight=0.01``, ``beta 20 -> 2``, ``warmup=0.2``,
    ``zeta=1.1``, ``gamma=-0.1``.

    Layers whose weight quantizer is disabled are left out. Samples are the dim-0 entries of the
    recorded inputs (the core's batch-on-dim-0 convention). Float targets of consecutive units are recorded in one float pass while they fit in
    ``target_cache_mb`` (estimated from the first batch); quantized inputs need one pass per unit
    (each pass ends right after the unit when it runs once per forward). ``eval_batch_size`` only
    sets the chunk size of the before/after loss evaluation. ``stats`` holds, per unit, the reconstruction loss of round-to-nearest and of the learned rounding, and ``kept_nearest``.
    """

    name = "adaround"
    stage = "after"

    def __init__(self, iterations: int = 100, lr: float = 1e-2, reg_weight: float = 0.01, beta_start: float = 20.0,
                 beta_end: float = 2.0, warmup: float = 0.2, batch_size: int = 8, seed: int = 0,
                 zeta: float = 1.1, gamma: float = -0.1, eval_batch_size: int = 128, target_cache_mb: float = 1024.0,
                 keep_better: bool = True, drop_prob: float = 0.0) -> None:
        if iterations < 1 or batch_size < 1 or not 0.0 <= warmup < 1.0 or not 0.0 <= drop_prob <= 1.0:
            raise QuantizationError(f"{type(self).__name__}: need iterations >= 1, batch_size >= 1, 0 <= warmup < 1 and "
                                    f"0 <= drop_prob <= 1 (got {iterations}, {batch_size}, {warmup}, {drop_prob})")
        self.drop_prob = drop_prob
        self.iterations, self.lr, self.reg_weight = iterations, lr, reg_weight
        self.beta_start, self.beta_end, self.warmup = beta_start, beta_end, warmup
        self.batch_size, self.seed, self.zeta, self.gamma = batch_size, seed, zeta, gamma
        self.eval_batch_size, self.target_cache_mb, self.keep_better = eval_batch_size, target_cache_mb, keep_better
        self.stats: dict[str, dict[str, float]] = {}

    # ----------------------------------------------------------------------------- units
    def units(self, qmodel: nn.Module, data: CalibrationData) -> list[Unit]:
        """One unit per quantized layer with an enabled weight quantizer, in forward order."""
        layers = quantized_layers(qmodel, need_weight_quant=True)
        return [Unit(name, layers[name], [layers[name]]) for name in forward_order(qmodel, data, layers)]

    # ----------------------------------------------------------------------------- apply
    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Learn and bake the rounding of every unit, in forward order."""
        qmodel = require_quantized(model, self.name)
        units = self.units(qmodel, data)
        if not units:
            log.warning("%s: no quantized layer with an enabled weight quantizer; nothing to do", self.name)
            return
        generator = torch.Generator().manual_seed(self.seed)
        drop_generator = torch.Generator().manual_seed(self.seed + 1)  # QDrop masks: minibatch sampling stays as without drop
        originals: dict[nn.Module, torch.Tensor] = {}
        modules = {unit.name: unit.module for unit in units}
        _, calls, nbytes = trace_calls(qmodel, data, modules)
        self.stats = {}
        was_training = qmodel.training
        qmodel.eval()
        try:
            with frozen_parameters(qmodel):
                targets: dict[str, list[torch.Tensor]] = {}
                for i, unit in enumerate(tqdm(units, desc=self.name, leave=False)):
                    if unit.name not in targets:  # float targets of the next units that fit target_cache_mb, in one pass
                        chunk = self._target_chunk(units[i:], nbytes, len(data.batches))
                        last = chunk[-1] if all(calls[u.name] == 1 for u in chunk) else None
                        with float_reference(qmodel, originals):
                            outs = capture_outputs(qmodel, data, [u.module for u in chunk], last.module if last else None)
                        targets = {u.name: o for u, o in zip(chunk, outs)}
                    self.stats[unit.name] = self.reconstruct(qmodel, data, unit, originals, generator,
                                                             calls[unit.name] == 1, targets.pop(unit.name), drop_generator)
                    log.info("%s %s: reconstruction loss %.4g (nearest) -> %.4g%s", self.name, unit.name,
                             self.stats[unit.name]["nearest"], self.stats[unit.name]["learned"],
                             " (worse: nearest kept)" if self.stats[unit.name]["kept_nearest"] else "")
        finally:
            qmodel.train(was_training)

    def _target_chunk(self, units: list[Unit], nbytes: dict[str, int], num_batches: int) -> list[Unit]:
        """The longest run of ``units`` (at least one) whose float targets fit ``target_cache_mb`` (estimated
        from the first batch)."""
        chunk, total = [], 0.0
        for unit in units:
            total += nbytes[unit.name] * num_batches / 2**20
            if chunk and total > self.target_cache_mb:
                break
            chunk.append(unit)
        return chunk

    def beta(self, step: int) -> Optional[float]:
        """The regulariser exponent at ``step`` (``None`` during warm-up: no regulariser)."""
        start = int(self.warmup * self.iterations)
        if step < start:
            return None
        rel = (step - start) / max(1, self.iterations - start)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - rel)

    def reconstruct(self, qmodel: nn.Module, data: CalibrationData, unit: Unit,
                    originals: dict[nn.Module, torch.Tensor], generator: torch.Generator, stop: bool = False,
                    targets: Optional[list[torch.Tensor]] = None,
                    drop_generator: Optional[torch.Generator] = None) -> dict[str, float]:
        """Learn the rounding of ``unit.layers`` on ``unit.module``'s output, bake it, record the float weights
        in ``originals``; returns the reconstruction loss of nearest and learned rounding on the whole cache
        and whether nearest rounding was kept (``keep_better``).
        ``stop``: the unit runs once per forward, so capture passes may end right after it; ``targets``: the
        unit's float outputs over the calibration set, if already captured; ``drop_generator``: draws the masks of
        ``drop_prob`` (QDrop) during the optimisation steps (the before/after losses are always fully quantized)."""
        if targets is None:
            with float_reference(qmodel, originals):
                _, targets = capture(qmodel, data, unit.module, outputs=True, stop=stop)
        calls, _ = capture(qmodel, data, unit.module, inputs=True, stop=stop)
        cache = IOCache(calls, targets)
        del calls, targets
        channels = out_channels(unit.layers[-1])
        if drop_generator is None:
            drop_generator = torch.Generator().manual_seed(self.seed + 1)
        softs = [SoftRounding(layer.weight_quantizer, layer.weight, self.zeta, self.gamma) for layer in unit.layers]
        with no_fastpath(unit.module):
            nearest = self._cache_loss(unit, cache, channels)
            with swapped_weight_quantizers(unit.layers, softs):
                optimiser = torch.optim.Adam([s.V for s in softs], lr=self.lr)
                with dropped_quantization(unit.module, self.drop_prob, drop_generator):
                    for step in range(self.iterations):
                        args, kwargs, target = cache.sample(self.batch_size, generator)
                        loss = reconstruction_loss(first_tensor(unit.module(*args, **kwargs)), target, channels)
                        beta = self.beta(step)
                        if beta is not None and self.reg_weight:
                            loss = loss + self.reg_weight * sum(s.regulariser(beta) for s in softs)
                        optimiser.zero_grad(set_to_none=True)
                        loss.backward()
                        optimiser.step()
                for s in softs:
                    s.hard = True
                with torch.no_grad():
                    rounded = [s(layer.weight) for s, layer in zip(softs, unit.layers)]
                learned = self._cache_loss(unit, cache, channels)
        kept_nearest = self.keep_better and learned > nearest
        if kept_nearest:  # bake round-to-nearest instead (what the weight quantizer gives the float weight)
            with torch.no_grad():
                rounded = [layer.weight_quantizer(layer.weight) for layer in unit.layers]
        for layer, w in zip(unit.layers, rounded):
            originals.setdefault(layer, layer.weight.detach().clone())
            with torch.no_grad():
                layer.weight.copy_(w)  # in place under no_grad: bumps the version, so the weight cache refreshes
                if not torch.equal(layer.weight_quantizer(layer.weight), layer.weight):
                    raise QuantizationError(f"{self.name}: the rounded weight of {layer.weight_quantizer.name!r} is not "
                                            "reproduced by its weight quantizer; was its scale changed during reconstruction?")
        return {"nearest": nearest, "learned": learned, "kept_nearest": kept_nearest}

    def _cache_loss(self, unit: Unit, cache: IOCache, channels: int) -> float:
        """Mean reconstruction loss of the unit over the whole cache (weight caches reset first)."""
        for layer in unit.layers:
            layer._wq_key = None
        total, count = 0.0, 0
        with torch.no_grad():
            for args, kwargs, target in cache.chunks(self.eval_batch_size):
                n = target.shape[0]
                total += float(reconstruction_loss(first_tensor(unit.module(*args, **kwargs)), target, channels)) * n
                count += n
        for layer in unit.layers:
            layer._wq_key = None
        return total / max(count, 1)
