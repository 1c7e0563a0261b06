"""Insert quantizers into any ``torch.nn.Module`` and control them as a group.

:func:`quantize_model` deep-copies a float model and swaps every module whose type is in the role
registry (:mod:`esc.quant.roles`: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.LayerNorm``,
:class:`~esc.quant.modules.MatMul`) for its quantized counterpart, with an activation quantizer
on each slot its :class:`~esc.quant.scope.Scope` quantizes. The returned :class:`QuantizedModel`
is an ``nn.Module`` that runs the quantized network and offers switches (:meth:`QuantizedModel.quant_state`),
the activation quantizers by name (the vector of scales that ESC optimises, optionally restricted
to one calibrator's share with :meth:`QuantizedModel.selecting`), one quantizer per tensor
(:meth:`QuantizedModel.share_quantizers`), and :meth:`QuantizedModel.summary`, a table of every
quantizer with its role, bits, granularity, clip range and level utilisation.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from esc.quant.modules import QuantLayerNorm, QuantLinear
from esc.quant.quantizer import LOG_GRIDS, Log2Quantizer, UniformQuantizer
from esc.quant.roles import REGISTRY, slot_roles
from esc.quant.scope import Scope, full_scope
from esc.quant.softmax import LinearSoftmaxQuantizer


@dataclass(frozen=True)
class QuantSpec:
    """How one family of tensors (weights or activations) is quantized."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"

    def build(self, name: str, axis: int = 0) -> UniformQuantizer:
        """A fresh quantizer following this spec."""
        return UniformQuantizer(self.bits, self.symmetric, True, self.granularity, axis, name)


def weight_max_clip(quantizer: UniformQuantizer, weight: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Max calibration of a weight: ``max |w|`` (symmetric) or ``(min w, max w)`` per output channel
    (per-channel quantizers) or over the whole tensor."""
    w = weight.detach()
    if quantizer.granularity == "channel":
        flat = w.transpose(0, quantizer.axis).reshape(w.shape[quantizer.axis], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        lo, hi = w.min(), w.max()
    return torch.maximum(lo.abs(), hi.abs()) if quantizer.symmetric else (lo, hi)


def _no_fused_fastpath(module: nn.Module, args) -> None:
    """No-op forward pre-hook: its presence keeps torch from taking fused fast paths that skip quantizers."""


class QuantizedModel(nn.Module):
    """A float model with quantizers inserted; ``forward`` runs the wrapped network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._selection: Optional[frozenset[str]] = None
        self.prefix_quantizers: list[str] = []  # quantizers kept float on a fixed prompt prefix (see prefix_in_float)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---------------------------------------------------------------------------- quantizers
    def _quantizers(self, kind: str) -> Iterator[tuple[str, UniformQuantizer]]:
        for name, module in self.model.named_modules():  # a shared quantizer is listed once
            if isinstance(module, UniformQuantizer) and (name.endswith("weight_quantizer") == (kind == "weight")):
                yield (module.name or name), module

    @property
    def all_activation_quantizers(self) -> dict[str, UniformQuantizer]:
        """Every activation quantizer by name, in forward-definition order."""
        return dict(self._quantizers("activation"))

    @property
    def activation_quantizers(self) -> dict[str, UniformQuantizer]:
        """The activation quantizers a calibrator works on (the ESC scale vector): all of them, or
        the ones chosen with :meth:`selecting`."""
        quantizers = self.all_activation_quantizers
        if self._selection is None:
            return quantizers
        return {n: q for n, q in quantizers.items() if n in self._selection}

    @contextlib.contextmanager
    def selecting(self, names: Iterable[str]):
        """Restrict :attr:`activation_quantizers` to ``names`` inside the block (the other quantizers
        keep their state), so a calibrator sets only its share of a scope."""
        previous, self._selection = self._selection, frozenset(names)
        try:
            yield self
        finally:
            self._selection = previous

    @property
    def weight_quantizers(self) -> dict[str, UniformQuantizer]:
        """Weight quantizers by module path."""
        return dict(self._quantizers("weight"))

    def set_quant_state(self, weights: bool | None = None, activations: bool | None = None) -> None:
        """Turn weight and/or activation quantization on or off (``None`` leaves it as is)."""
        for flag, quantizers in ((weights, self.weight_quantizers), (activations, self.all_activation_quantizers)):
            if flag is not None:
                for q in quantizers.values():
                    q.enabled = flag

    @contextlib.contextmanager
    def quant_state(self, weights: bool | None = None, activations: bool | None = None,
                    observers: Optional[dict[str, Optional[Callable]]] = None):
        """Inside the block: weight / activation quantization on or off (``None``: unchanged) and
        ``observers`` (name -> callable, or ``None`` to detach one) set on those activation quantizers; on exit every
        quantizer's ``enabled`` flag and observer are restored, also after an exception."""
        quantizers = {**self.all_activation_quantizers, **self.weight_quantizers}
        saved = {n: (q.enabled, q.observer) for n, q in quantizers.items()}
        try:
            self.set_quant_state(weights, activations)
            for name, fn in (observers or {}).items():
                quantizers[name].observer = fn
            yield self
        finally:
            for n, (enabled, observer) in saved.items():
                quantizers[n].enabled, quantizers[n].observer = enabled, observer

    @contextlib.contextmanager
    def prefix_in_float(self):
        """Inside the block the :attr:`prefix_quantizers` neither quantize nor observe: a task runs a
        model's fixed prompt prefix (Whisper's decoder prompt) in it, so those quantizers are
        calibrated on, and applied to, the other positions only (the PrefixQuant idea)."""
        quantizers = self.all_activation_quantizers
        with self.quant_state(observers=dict.fromkeys(self.prefix_quantizers)):  # restores flags and observers
            for n in self.prefix_quantizers:
                quantizers[n].enabled = False
            yield self

    def share_quantizers(self, run: Callable[[], None]) -> list[list[str]]:
        """One quantizer per tensor: slots that read the very same tensor share one quantizer.

        ``run()`` runs one forward pass (a small calibration batch); with activation quantization
        off, each quantizer's first input is identified by its storage, offset, shape and stride.
        Quantizers that saw the same tensor (a LayerNorm output and the inputs of the Q/K/V
        projections it feeds) become one: the member with the most bits (then one set by the run's
        calibrator, then the first) is kept in every slot, takes the run's calibrator if any
        member had it, and is marked ``shared``. Returns the merged groups (kept name first).
        """
        quantizers = self.all_activation_quantizers
        first: dict[str, tuple] = {}
        alive = []  # holds the traced tensors so no storage is reused during the pass

        def observer(name: str) -> Callable[[torch.Tensor], None]:
            def see(x: torch.Tensor) -> None:
                if name not in first:
                    alive.append(x)
                    first[name] = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)
            return see

        with self.quant_state(activations=False, observers={n: observer(n) for n in quantizers}), torch.no_grad():
            run()
        by_tensor: dict[tuple, list[str]] = {}
        for name in quantizers:
            if name in first:
                by_tensor.setdefault(first[name], []).append(name)
        groups = []
        for names in (g for g in by_tensor.values() if len(g) > 1):
            order = sorted(names, key=lambda n: (-quantizers[n].bits, quantizers[n].calibrator is not None, names.index(n)))
            keep = quantizers[order[0]]
            if any(quantizers[n].calibrator is None for n in names):
                keep.calibrator = None
            keep.shared = True
            for n in order[1:]:
                parent, _, attr = n.rpartition(".")
                setattr(self.model.get_submodule(parent), attr, keep)
            groups.append(order)
        self._shared = {g[0]: g[1:] for g in groups}
        return groups

    def calibrate_weights(self, clip: Callable[[UniformQuantizer, torch.Tensor], torch.Tensor | tuple] = weight_max_clip) -> None:
        """Set every weight quantizer's clip range to ``clip(quantizer, weight)`` (``c`` or ``(lo, hi)``;
        default per-channel max; :func:`esc.calibrators.weights.calibrate_weights` names the methods)."""
        for module in self.model.modules():
            wq = getattr(module, "weight_quantizer", None)
            if wq is not None:
                c = clip(wq, module.weight.detach())
                wq.set_clip_range(*c) if isinstance(c, tuple) else wq.set_clip_range(c)

    def activation_scales(self) -> torch.Tensor:
        """The current activation scales as one vector (per-tensor quantizers)."""
        return torch.stack([q.scale.reshape(()) for q in self.activation_quantizers.values()])

    def set_activation_scales(self, scales: torch.Tensor) -> None:
        """Set all activation scales from a vector ``[N]`` or a population ``[P, N]``."""
        quantizers = list(self.activation_quantizers.values())
        if scales.shape[-1] != len(quantizers):
            raise ValueError(f"got {scales.shape[-1]} scales for {len(quantizers)} activation quantizers")
        for i, q in enumerate(quantizers):
            q.set_scale(scales[..., i])

    def activation_state(self) -> dict[str, dict]:
        """Everything calibration set on the activation quantizers: per name, grid sign, scale, zero point."""
        return {name: {"signed": q.signed, "scale": q.scale.detach().cpu().clone(), "zero_point": q.zero_point.detach().cpu().clone()}
                for name, q in self.all_activation_quantizers.items()}

    def load_activation_state(self, state: dict[str, dict]) -> None:
        """Restore :meth:`activation_state` (the quantizer names must match this model's)."""
        quantizers = self.all_activation_quantizers
        if set(state) != set(quantizers):
            raise ValueError(f"activation state names {len(state)} quantizers, this model has {len(quantizers)}; "
                             f"missing {sorted(set(quantizers) - set(state))[:3]}, unknown {sorted(set(state) - set(quantizers))[:3]}")
        for name, q in quantizers.items():
            q.set_signed(state[name]["signed"])
            q._assign(state[name]["scale"], state[name]["zero_point"])

    # ------------------------------------------------------------------------------- listing
    def measure_level_utilisation(self, batches: Iterable, forward) -> None:
        """Run ``forward(self, batch)`` over ``batches`` counting the integer levels each quantizer hits."""
        quantizers = [*self.all_activation_quantizers.values(), *self.weight_quantizers.values()]
        for q in quantizers:
            q.track_levels(True)
        with torch.no_grad():
            for batch in batches:
                forward(self, batch)
            for module in self.model.modules():  # weights: count once on the weight itself
                if getattr(module, "weight_quantizer", None) is not None and module.weight_quantizer.enabled:
                    module.weight_quantizer.track_levels(True)
                    module.weight_quantizer(module.weight)
        self._utilisation = {id(q): q.level_utilisation for q in quantizers}
        for q in quantizers:
            q.track_levels(False)

    def summary(self) -> list[dict]:
        """One row per quantizer: name, kind, role, bits, grid, signed, granularity, calibrator (``None``:
        the run's), the slots it shares, clip range, level utilisation."""
        util = getattr(self, "_utilisation", {})
        shared = getattr(self, "_shared", {})
        rows = []
        for kind, quantizers in (("activation", self.all_activation_quantizers), ("weight", self.weight_quantizers)):
            for name, q in quantizers.items():
                lo, hi = q.clip_range if q.is_calibrated else (torch.tensor(float("nan")),) * 2
                rows.append(dict(name=name, kind=kind, role=q.role or "weight", bits=q.bits,
                                 grid=q.grid, signed=q.signed,
                                 granularity=q.granularity, calibrator=q.calibrator, shares=shared.get(name, []),
                                 clip_lo=float(lo.min()), clip_hi=float(hi.max()),
                                 level_utilisation=util.get(id(q), float("nan"))))
        return rows


def quantize_model(model: nn.Module, weight: QuantSpec | None = QuantSpec(8, True, "channel"),
                   activation: QuantSpec | None = QuantSpec(8, True, "tensor"), scope: Scope | None = None,
                   head: Iterable[str] = ()) -> QuantizedModel:
    """Return a quantized deep copy of ``model``.

    Args:
        weight: spec of the weight quantizers (``None``: weights stay float). Weights are
            calibrated here with per-channel/tensor max; call
            :func:`esc.calibrators.weights.calibrate_weights` to change that.
        activation: sign mode and granularity of the activation quantizers, and the bit width a
            scope's ``"activation"`` bits stand for (``None``: activations stay float).
            Activation quantizers start uncalibrated: run a calibrator before quantized inference.
        scope: which slots get an activation quantizer, with which bits, grid and calibrator
            (:mod:`esc.quant.scope`; ``None``: :func:`~esc.quant.scope.full_scope`). Call
            :meth:`QuantizedModel.share_quantizers` afterwards for one quantizer per tensor.
        head: glob patterns of the model's head modules (their input has the ``head`` role).

    Limitation: ``nn.MultiheadAttention`` runs its projections through functional kernels on the
    raw parameters, so neither its in/out projections nor its products are quantization points;
    write attention with ``nn.Linear`` and :class:`~esc.quant.modules.MatMul` (as the models here do).
    """
    model = copy.deepcopy(model)
    scope = scope or full_scope(activation.bits if activation is not None else None)
    base = activation or QuantSpec(8)
    off = QuantSpec(8)  # placeholder spec for disabled weight quantizers (keeps one code path)

    def act(module: str, slot: str, role: str) -> UniformQuantizer | None:
        spec = scope.spec(module, role)
        if spec.bits is None or activation is None:
            return None
        name = f"{module}.{slot}_quantizer"
        if spec.softmax is not None:
            q = LinearSoftmaxQuantizer(spec.bits, spec.grid, spec.softmax, name)
        elif spec.grid in LOG_GRIDS:
            q = Log2Quantizer(spec.bits, name, spec.grid)
        else:
            q = UniformQuantizer(spec.bits, base.symmetric, True, base.granularity, 0, name)
        q.role, q.calibrator = role, spec.calibrator
        return q

    swaps = []
    for name, module in model.named_modules():
        op = REGISTRY.get(type(module))
        if op is None or scope.skipped(name):
            continue
        slots = {slot: q for slot, role in slot_roles(name, module, head).items() if (q := act(name, slot, role)) is not None}
        if not slots and not (op.has_weight and weight is not None):
            continue
        wq = None
        if op.has_weight:
            wq = (weight or off).build(f"{name}.weight_quantizer")
            wq.enabled = weight is not None
        swaps.append((name, op.quantized.from_float(module, slots, wq)))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for module in model.modules():
        # nn.TransformerEncoderLayer's eval-mode fast path (no grad, no hooks) calls a fused kernel on
        # the raw weights, silently bypassing every quantizer inside it; any hook disables that path.
        if isinstance(module, nn.TransformerEncoderLayer) and any(
                isinstance(m, (QuantLinear, QuantLayerNorm)) for m in module.modules()):
            module.register_forward_pre_hook(_no_fused_fastpath)
    qmodel = QuantizedModel(model)
    if weight is not None:
        qmodel.calibrate_weights()
    return qmodel.eval()
