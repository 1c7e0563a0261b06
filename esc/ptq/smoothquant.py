"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers from LayerNorm outputs into Linear weights."""
from __future__ import annotations

import logging
import torch
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import first_batch_outputs, outputs_match
from esc.quant.model import QuantizedModel
from esc.quant.quantizer import QuantizationError

log = logging.getLogger(__name__)


class SmoothQuant(PTQMethod):
    """Per-channel smoothing of every LayerNorm -> Linear(s) pair; the float function is unchanged.

    Stage ``before`` (acts on the float model). Touches: the ``weight`` and ``bias`` of each smoothed
    ``nn.LayerNorm`` and the ``weight`` of the Linears that read its output (no quantizer exists yet).

    Pattern search (a traced forward with hooks, no ``torch.fx``): over the calibration set, a
    forward hook records each LayerNorm output tensor and a pre-hook on every ``nn.Linear`` records
    which LayerNorm produced its input (the very same tensor object, so any reshape, transpose or
    arithmetic in between disqualifies it). A LayerNorm (affine, 1-D ``normalized_shape``) is
    smoothed with its consumer Linears when every call of each consumer reads that LayerNorm's
    output directly. Consumers the hooks cannot see (a residual add reading the LayerNorm output, a
    non-Linear layer) are caught by a check: after smoothing one LayerNorm group the model's outputs
    on the first calibration batch must match the unsmoothed ones (relative tolerance ``rtol`` of
    the output's max magnitude), otherwise that group is reverted with a warning.

    Definition per group, per input channel ``j``: ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)``
    (``x`` the LayerNorm output over all calibration data and positions; the weight max over all
    consuming Linears), both maxima clamped below at ``eps``; then ``gamma /= s``, ``beta /= s`` on the
    LayerNorm and ``W[:, j] *= s_j`` on each consumer.
    """

    name = "smoothquant"
    stage = "before"

    def __init__(self, alpha: float = 0.5, eps: float = 1e-5, verify: bool = True, rtol: float = 1e-4) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise QuantizationError(f"SmoothQuant: alpha={alpha} must lie in [0, 1]")
        self.alpha, self.eps, self.verify, self.rtol = alpha, eps, verify, rtol
        self.groups: dict[str, list[str]] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def find_groups(self, model: nn.Module, data: CalibrationData) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
        """LayerNorm name -> consumer Linear names, and the per-channel max |output| of each LayerNorm."""
        norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        live: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (norm, output); outputs kept alive for the batch
        sources: dict[str, set] = {n: set() for n in linears}
        act_max: dict[str, torch.Tensor] = {}
        handles = []

        def norm_hook(name):
            def hook(mod, args, out):
                live[id(out)] = (name, out)
                m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
                act_max[name] = torch.maximum(act_max[name], m) if name in act_max else m
            return hook

        def linear_hook(name):
            def hook(mod, args):
                hit = live.get(id(args[0]))
                sources[name].add(hit[0] if hit is not None and hit[1] is args[0] else None)
            return hook

        try:
            for n, m in norms.items():
                handles.append(m.register_forward_hook(norm_hook(n)))
            for n, m in linears.items():
                handles.append(m.register_forward_pre_hook(linear_hook(n)))
            with torch.no_grad():
                for batch in data.batches:
                    data.forward(model, batch)
                    live.clear()
        finally:
            for h in handles:
                h.remove()
        groups: dict[str, list[str]] = {}
        for lin, src in sources.items():
            if len(src) == 1 and None not in src:
                groups.setdefault(next(iter(src)), []).append(lin)
        mixed = {s for src in sources.values() if len(src) > 1 for s in src if s is not None}
        for norm in list(groups):
            m = norms[norm]
            if norm in mixed or not m.elementwise_affine or m.weight is None or len(m.normalized_shape) != 1:
                log.info("%s: %s not smoothed (non-affine, multi-dim, or its consumers also read other inputs)", self.name, norm)
                del groups[norm]
        return groups, act_max

    def smoothing_scales(self, act_max: torch.Tensor, linears: list[nn.Linear], alpha: float) -> torch.Tensor:
        """``s_j = max|x_j|^alpha / max_j|W_:,j|^(1-alpha)`` with the weight max over all ``linears``."""
        w_max = torch.stack([lin.weight.detach().abs().amax(0) for lin in linears]).amax(0)
        a = act_max.clamp(min=self.eps).to(w_max.dtype)
        return a.pow(alpha) / w_max.clamp(min=self.eps).pow(1.0 - alpha)

    def group_scales(self, norm_name: str, act_max: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
        """The smoothing scales of the group of LayerNorm ``norm_name``: :meth:`smoothing_scales` at the fixed
        ``alpha`` (:class:`esc.ptq.ditas.DiTAS` searches alpha per group here instead)."""
        return self.smoothing_scales(act_max, linears, self.alpha)

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Find the LayerNorm -> Linear groups on ``data`` and smooth each one."""
        if isinstance(model, QuantizedModel):
            raise QuantizationError(f"{type(self).__name__} acts on the float model before quantizers are inserted (stage='before'); "
                                    "apply it to the float model and call quantize_model afterwards")
        groups, act_max = self.find_groups(model, data)
        reference = first_batch_outputs(model, data) if self.verify else None
        self.groups, self.scales = {}, {}
        for norm_name, lin_names in groups.items():
            norm = model.get_submodule(norm_name)
            linears = [model.get_submodule(n) for n in lin_names]
            s = self.group_scales(norm_name, act_max[norm_name], linears)
            saved = [norm.weight.detach().clone(), None if norm.bias is None else norm.bias.detach().clone(),
                     [lin.weight.detach().clone() for lin in linears]]
            with torch.no_grad():
                norm.weight.div_(s)
                if norm.bias is not None:
                    norm.bias.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)
            if reference is not None and not outputs_match(reference, first_batch_outputs(model, data), self.rtol):
                log.warning("%s: smoothing %s changed the float model's output (its output has a consumer other than %s); reverted",
                            self.name, norm_name, lin_names)
                with torch.no_grad():
                    norm.weight.copy_(saved[0])
                    if saved[1] is not None:
                        norm.bias.copy_(saved[1])
                    for lin, w in zip(linears, saved[2]):
                        lin.weight.copy_(w)
                continue
            self.groups[norm_name], self.scales[norm_name] = lin_names, s
        log.info("%s: smoothed %d LayerNorm groups (%d Linears)", self.name, len(self.groups),
                 sum(len(v) for v in self.groups.values()))
