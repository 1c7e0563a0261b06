"""Insert quantizers into any ``torch.nn.Module`` and control them as a group.

:func:`quantize_model` deep-copies a float model and swaps every ``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d``, ``nn.LayerNorm`` and :class:`~esc.quant.modules.MatMul` for its quantized
counterpart (see :mod:`esc.quant.modules` for the exact quantization points). The returned
:class:`QuantizedModel` is an ``nn.Module`` that runs the quantized network and offers switches
(weight / activation quantization on or off), the list of activation quantizers by name (the
vector of scales that ESC optimises), and :meth:`QuantizedModel.summary`, a table of every
quantizer with its bits, granularity, clip range and level utilisation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from esc.quant.modules import MatMul, QuantConv1d, QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul
from esc.quant.quantizer import UniformQuantizer


@dataclass(frozen=True)
class QuantSpec:
    """How one family of tensors (weights or activations) is quantized."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"

    def build(self, name: str, axis: int = 0) -> UniformQuantizer:
        """A fresh quantizer following this spec."""
        return UniformQuantizer(self.bits, self.symmetric, True, self.granularity, axis, name)


def _weight_minmax(quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
    """Per-channel (or per-tensor) max calibration of a weight quantizer."""
    w = weight.detach()
    if quantizer.granularity == "channel":
        flat = w.transpose(0, quantizer.axis).reshape(w.shape[quantizer.axis], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        lo, hi = w.min(), w.max()
    if quantizer.symmetric:
        quantizer.set_clip_range(torch.maximum(lo.abs(), hi.abs()))
    else:
        quantizer.set_clip_range(lo, hi)


def _no_fused_fastpath(module: nn.Module, args) -> None:
    """No-op forward pre-hook: its presence keeps torch from taking fused fast paths that skip quantizers."""


class QuantizedModel(nn.Module):
    """A float model with quantizers inserted; ``forward`` runs the wrapped network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---------------------------------------------------------------------------- quantizers
    def _quantizers(self, kind: str) -> Iterator[tuple[str, UniformQuantizer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, UniformQuantizer) and (name.endswith("weight_quantizer") == (kind == "weight")):
                yield name, module

    @property
    def activation_quantizers(self) -> dict[str, UniformQuantizer]:
        """Activation quantizers by module path, in forward-definition order (the ESC scale vector)."""
        return dict(self._quantizers("activation"))

    @property
    def weight_quantizers(self) -> dict[str, UniformQuantizer]:
        """Weight quantizers by module path."""
        return dict(self._quantizers("weight"))

    def set_quant_state(self, weights: bool | None = None, activations: bool | None = None) -> None:
        """Turn weight and/or activation quantization on or off (``None`` leaves it as is)."""
        for flag, quantizers in ((weights, self.weight_quantizers), (activations, self.activation_quantizers)):
            if flag is not None:
                for q in quantizers.values():
                    q.enabled = flag

    def calibrate_weights(self, method: str = "minmax") -> None:
        """Set every weight quantizer's scale from its weight (``minmax`` or ``mse``)."""
        for module in self.model.modules():
            wq = getattr(module, "weight_quantizer", None)
            if wq is None:
                continue
            if method == "minmax":
                _weight_minmax(wq, module.weight)
            elif method == "mse":
                from esc.calibrators.mse import mse_clip  # local import: calibrators depend on this module
                clip = mse_clip(module.weight.detach(), wq)  # c (symmetric) or (lo, hi) (asymmetric)
                wq.set_clip_range(*clip) if isinstance(clip, tuple) else wq.set_clip_range(clip)
            else:
                raise ValueError(f"unknown weight calibration {method!r}; use 'minmax' or 'mse'")

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
                for name, q in self.activation_quantizers.items()}

    def load_activation_state(self, state: dict[str, dict]) -> None:
        """Restore :meth:`activation_state` (the quantizer names must match this model's)."""
        quantizers = self.activation_quantizers
        if set(state) != set(quantizers):
            raise ValueError(f"activation state names {len(state)} quantizers, this model has {len(quantizers)}; "
                             f"missing {sorted(set(quantizers) - set(state))[:3]}, unknown {sorted(set(state) - set(quantizers))[:3]}")
        for name, q in quantizers.items():
            q.set_signed(state[name]["signed"])
            q._assign(state[name]["scale"], state[name]["zero_point"])

    # ------------------------------------------------------------------------------- listing
    def measure_level_utilisation(self, batches: Iterable, forward) -> None:
        """Run ``forward(self, batch)`` over ``batches`` counting the integer levels each quantizer hits."""
        quantizers = [*self.activation_quantizers.values(), *self.weight_quantizers.values()]
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
        """One row per quantizer: name, kind, bits, signed, granularity, clip range, level utilisation."""
        util = getattr(self, "_utilisation", {})
        rows = []
        for kind, quantizers in (("activation", self.activation_quantizers), ("weight", self.weight_quantizers)):
            for name, q in quantizers.items():
                lo, hi = q.clip_range if q.is_calibrated else (torch.tensor(float("nan")),) * 2
                rows.append(dict(name=name, kind=kind, bits=q.bits, signed=q.signed, granularity=q.granularity,
                                 clip_lo=float(lo.min()), clip_hi=float(hi.max()),
                                 level_utilisation=util.get(id(q), float("nan"))))
        return rows


def quantize_model(model: nn.Module, weight: QuantSpec | None = QuantSpec(8, True, "channel"),
                   activation: QuantSpec | None = QuantSpec(8, True, "tensor"),
                   quantize_layernorm: bool = True, quantize_matmul: bool = True,
                   skip: Iterable[str] = ()) -> QuantizedModel:
    """Return a quantized deep copy of ``model``.

    Args:
        weight: spec of the weight quantizers (``None``: weights stay float). Weights are
            calibrated here with per-channel/tensor max; call :meth:`QuantizedModel.calibrate_weights`
            to change that.
        activation: spec of the activation quantizers (``None``: activations stay float).
            Activation quantizers start uncalibrated: run a calibrator before quantized inference.
        quantize_layernorm / quantize_matmul: include LayerNorm outputs / attention matmul operands.
        skip: module paths (exact names) to leave in float, e.g. a classification head.

    Limitation: ``nn.MultiheadAttention`` runs its projections through functional kernels on the
    raw parameters, so neither its in/out projections nor its products are quantization points;
    write attention with ``nn.Linear`` and :class:`~esc.quant.modules.MatMul` (as the models here do).
    """
    model = copy.deepcopy(model)
    skip = set(skip)
    off = QuantSpec(8)  # placeholder spec for disabled quantizers (keeps one code path)

    def act(name: str) -> UniformQuantizer:
        q = (activation or off).build(name)
        q.enabled = activation is not None
        return q

    def wq(name: str, axis: int = 0) -> UniformQuantizer:
        q = (weight or off).build(name, axis)
        q.enabled = weight is not None
        return q

    swaps = []
    for name, module in model.named_modules():
        if name in skip:
            continue
        if type(module) is nn.Linear:
            swaps.append((name, QuantLinear.from_float(module, act(f"{name}.input_quantizer"), wq(f"{name}.weight_quantizer"))))
        elif type(module) in (nn.Conv1d, nn.Conv2d):
            cls = QuantConv1d if type(module) is nn.Conv1d else QuantConv2d
            swaps.append((name, cls.from_float(module, act(f"{name}.input_quantizer"), wq(f"{name}.weight_quantizer"))))
        elif type(module) is nn.LayerNorm and quantize_layernorm:
            swaps.append((name, QuantLayerNorm.from_float(module, act(f"{name}.output_quantizer"))))
        elif type(module) is MatMul and quantize_matmul:
            swaps.append((name, QuantMatMul(act(f"{name}.a_quantizer"), act(f"{name}.b_quantizer"))))
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
        qmodel.calibrate_weights("minmax")
    return qmodel.eval()
