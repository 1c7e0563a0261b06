"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers from LayerNorm outputs into Linear weights."""
from __future__ import annotations

import logging
import torch
from torch import nn
from tqdm.auto import tqdm

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import first_batch_outputs, keep_if_outputs_match, layernorm_linear_groups
from esc.quant.model import QuantizedModel
from esc.quant.quantizer import QuantizationError

log = logging.getLogger(__name__)


class SmoothQuant(PTQMethod):
    """Per-channel smoothing of every LayerNorm -> Linear(s) pair; the float function is unchanged.

    Stage ``before`` (acts on the float model). Touches: the ``weight`` and ``bias`` of each smoothed
    ``nn.LayerNorm`` and the ``weight`` of the Linears that read its output (no quantizer exists yet).

    Pattern search (:func:`esc.ptq.common.layernorm_linear_groups`, a traced forward with hooks, no
    ``torch.fx``): over the calibration set, a forward hook records each LayerNorm output tensor and a
    pre-hook on every ``nn.Linear`` records which LayerNorm produced its input (the very same tensor
    object, so any reshape, transpose or arithmetic in between disqualifies it). A LayerNorm (affine,
    1-D ``normalized_shape``) is smoothed with its consumer Linears when every call of each consumer
    reads that LayerNorm's output directly. Consumers the hooks cannot see (a residual add reading the
    LayerNorm output, a non-Linear layer) are caught by a check (:func:`esc.ptq.common.keep_if_outputs_match`):
    after smoothing one LayerNorm group the model's outputs on the first calibration batch must match
    the unsmoothed ones (relative tolerance ``rtol`` of the output's max magnitude), otherwise that
    group is reverted with a warning.

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
        """LayerNorm name -> consumer Linear names (:func:`~esc.ptq.common.layernorm_linear_groups`), and the
        per-channel max |output| of each LayerNorm."""
        groups, ranges = layernorm_linear_groups(model, data, self.name)
        return groups, {n: torch.maximum(-lo, hi) for n, (lo, hi) in ranges.items()}

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
        for norm_name, lin_names in tqdm(groups.items(), desc=self.name, leave=False):
            norm = model.get_submodule(norm_name)
            linears = [model.get_submodule(n) for n in lin_names]
            s = self.group_scales(norm_name, act_max[norm_name], linears)

            def smooth(norm=norm, linears=linears, s=s):
                norm.weight.div_(s)
                if norm.bias is not None:
                    norm.bias.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)

            if not keep_if_outputs_match(model, data, reference, [norm, *linears], smooth, self.rtol):
                log.warning("%s: smoothing %s changed the float model's output (its output has a consumer other than %s); reverted",
                            self.name, norm_name, lin_names)
                continue
            self.groups[norm_name], self.scales[norm_name] = lin_names, s
        log.info("%s: smoothed %d LayerNorm groups (%d Linears)", self.name, len(self.groups),
                 sum(len(v) for v in self.groups.values()))
