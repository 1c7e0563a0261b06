"""RepQ-ViT (Li et al., ICCV 2023): scale reparameterisation of post-LayerNorm activations, folded into LayerNorm and Linear."""
from __future__ import annotations

import logging

import torch
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import first_batch_outputs, keep_if_outputs_match, layernorm_linear_groups
from esc.quant.model import QuantizedModel
from esc.quant.quantizer import MAX_BITS, MIN_BITS, QuantizationError

log = logging.getLogger(__name__)


class RepQViT(PTQMethod):
    """RepQ-ViT's post-LayerNorm scale reparameterisation (Li, Xiao, Yang, Gu, "RepQ-ViT: Scale Reparameterization
    for Post-Training Quantization of Vision Transformers", ICCV 2023, Sec. 4.2; official code
    github.com/zkkli/RepQ-ViT, ``classification/test_quant.py``, the "Scale reparameterization" loop).

    Stage ``before`` (acts on the float model, like SmoothQuant): the reparameterised LayerNorm output has
    channels of one common range, which the per-tensor quantizers inserted afterwards see and the run's
    calibrator then calibrates. Touches: the ``weight`` and ``bias`` of each treated ``nn.LayerNorm`` and the
    ``weight`` and ``bias`` of the Linears reading its output (a zero bias is added where one is missing, as
    the official code does). The float function is unchanged.

    Groups: every LayerNorm whose output is read only by Linears, found and checked as SmoothQuant's groups
    (:func:`esc.ptq.common.layernorm_linear_groups`; a group whose transform changes the model's float
    outputs on the first calibration batch beyond ``rtol`` of their max magnitude, a reader the hooks cannot
    see or a weight tied elsewhere, is reverted with a warning, :func:`esc.ptq.common.keep_if_outputs_match`).
    No such LayerNorm at all is an error.

    Definition per group, channel ``c`` of the LayerNorm output ``x`` (``gamma``, ``beta`` its affine, ``W``,
    ``b`` each reader's weight and bias): the channel-wise asymmetric ``bits``-bit quantization of ``x`` has
    ``s_c = max((max x_c - min x_c) / (2^bits - 1), eps)`` and integer ``z_c = round(-min x_c / s_c)``
    (min/max over all calibration clips and positions); the layer-wise targets are ``s~ = mean_c s_c``,
    ``z~ = mean_c z_c`` (not rounded, as in the official code); ``r1 = s / s~``, ``r2 = z - z~``. Then

    * LayerNorm: ``gamma' = gamma / r1``, ``beta' = (beta + s * r2) / r1``, so its output is
      ``x'_c = (x_c + s_c r2_c) / r1_c``, whose range is ``[-s~ z~, s~ (2^bits - 1 - z~)]`` for every channel
      (up to the rounding of ``z_c``, at most half a step ``s~ / 2``);
    * each reader: ``W'[:, c] = r1_c W[:, c]``, ``b' = b - W (s * r2)`` (``= b - W' (s~ r2)``), so
      ``W' x' + b' = W x + b``.

    The official code computes the same: its ``r`` is ``r1``, its ``b = act_min / r - target_min`` is
    ``-s~ r2``, then ``beta / r - b`` and ``bias + W' b``. Computed in float64, stored in the parameters' dtype. The
    inter-channel variation moves into the readers' weight columns (SmoothQuant's migration with
    ``alpha = 1``), which their per-output-channel weight quantizers then have to absorb.

    Carried over from ViTs (the official code treats each block's ``norm1 -> attn.qkv`` and
    ``norm2 -> mlp.fc1``, and Swin's ``norm -> reduction``) to audio transformers: every LayerNorm whose
    output only Linears read. In the AST (``esc.models.ast``) those are each block's ``norm1 -> attn.qkv`` and
    ``norm2 -> mlp.0``; the final ``norm`` is read through a CLS-token slice and is left as is. In Whisper
    (Hugging Face layers) the ``self_attn_layer_norm`` of each layer is read by three Linears ``q_proj``,
    ``k_proj`` (no bias: one is added) and ``v_proj``, treated as one group with one ``r1, r2`` as ViT's fused
    ``qkv``; ``final_layer_norm -> fc1`` likewise; the decoder's ``encoder_attn_layer_norm`` feeds its
    ``q_proj``. A LayerNorm outside the blocks is treated too when only Linears read it (the official code
    treats block LayerNorms only): the encoder's final ``layer_norm`` with the cross-attention ``k_proj`` and
    ``v_proj`` of every decoder layer as one group; the decoder's final ``layer_norm`` feeds ``proj_out``,
    whose weight is tied to the token embedding, so it fails the float check and is reverted.

    Deviations: the official code takes ``s_c, z_c`` from its channel-wise quantizer's own calibration (per
    channel, the clip of least MSE among the 0.999 / 0.9999 / 0.99999 quantiles, on one calibration batch);
    here they come from the per-channel min/max over the whole calibration set. It then fixes the
    layer-wise activation quantizer to ``(s~, z~)`` and recalibrates the weights; here quantizers are
    inserted after the transform and the run's calibrator sets them (max calibration of an asymmetric
    ``bits``-bit quantizer gives the step ``s~`` again), and the weights are calibrated on ``W'``. Its
    post-softmax log-sqrt(2) quantizer is the scope's ``attention_probs`` grid ``log_sqrt2``
    (``scope=paper_log_sqrt2``, :class:`esc.quant.quantizer.Log2Quantizer`); ``ptq=repq_vit`` with that
    scope is the whole method.

    ``groups`` maps each treated LayerNorm to its readers; ``reparams`` holds per treated LayerNorm
    ``s``, ``r1``, ``r2``, ``target_scale`` (``s~``) and ``target_zero_point`` (``z~``).
    """

    name = "repq_vit"
    stage = "before"

    def __init__(self, bits: int = 8, eps: float = 1e-8, verify: bool = True, rtol: float = 1e-4) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS or eps <= 0:
            raise QuantizationError(f"RepQ-ViT: need bits in {MIN_BITS}..{MAX_BITS} (the grid of the channel-wise scales) and "
                                    f"eps > 0 (the smallest per-channel scale), got bits={bits!r}, eps={eps!r}")
        self.bits, self.eps, self.verify, self.rtol = bits, eps, verify, rtol
        self.groups: dict[str, list[str]] = {}
        self.reparams: dict[str, dict[str, torch.Tensor]] = {}

    def reparameterisation(self, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, torch.Tensor]:
        """``r1``, ``r2``, ``s``, ``target_scale`` and ``target_zero_point`` (float64) from the per-channel min
        ``lo`` and max ``hi`` of a LayerNorm output (class docstring)."""
        lo, hi = lo.double(), hi.double()
        s = ((hi - lo) / (2 ** self.bits - 1)).clamp(min=self.eps)
        z = torch.round(-lo / s)
        s_t, z_t = s.mean(), z.mean()
        return {"r1": s / s_t, "r2": z - z_t, "s": s, "target_scale": s_t, "target_zero_point": z_t}

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Find the LayerNorm -> Linear groups on ``data`` and reparameterise each one."""
        if isinstance(model, QuantizedModel):
            raise QuantizationError("RepQ-ViT acts on the float model before quantizers are inserted (stage='before'); "
                                    "apply it to the float model and call quantize_model afterwards")
        groups, ranges = layernorm_linear_groups(model, data, self.name)
        if not groups:
            raise QuantizationError("RepQ-ViT found no LayerNorm whose output is read only by Linear layers on the calibration "
                                    "data, so there is nothing to reparameterise; use it with a transformer (or ptq=none)")
        reference = first_batch_outputs(model, data) if self.verify else None
        self.groups, self.reparams = {}, {}
        for norm_name, lin_names in groups.items():
            norm = model.get_submodule(norm_name)
            linears = [model.get_submodule(n) for n in lin_names]
            rep = self.reparameterisation(*ranges[norm_name])
            if not keep_if_outputs_match(model, data, reference, [norm, *linears], lambda: fold(norm, linears, rep), self.rtol):
                log.warning("%s: reparameterising %s changed the float model's output (its output has a consumer other than "
                            "%s, or a weight is tied elsewhere); reverted", self.name, norm_name, lin_names)
                continue
            self.groups[norm_name] = lin_names
            self.reparams[norm_name] = rep
        log.info("%s: reparameterised %d LayerNorm groups (%d Linears)", self.name, len(self.groups),
                 sum(len(v) for v in self.groups.values()))


def fold(norm: nn.LayerNorm, linears: list[nn.Linear], rep: dict[str, torch.Tensor]) -> None:
    """Fold ``r1, r2`` into the LayerNorm's affine and its readers' weights and biases (:class:`RepQViT`), in place;
    a missing LayerNorm or Linear bias is added as a parameter."""
    r1, shift = rep["r1"], rep["s"] * rep["r2"]
    beta = torch.zeros_like(r1) if norm.bias is None else norm.bias.double()
    new_beta = ((beta + shift) / r1).to(norm.weight)
    norm.weight.copy_((norm.weight.double() / r1).to(norm.weight))
    if norm.bias is None:
        norm.bias = nn.Parameter(new_beta)
    else:
        norm.bias.copy_(new_beta)
    for lin in linears:
        w = lin.weight.double()
        b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if lin.bias is None else lin.bias.double()
        new_bias = (b - w @ shift).to(lin.weight)
        lin.weight.copy_((w * r1).to(lin.weight))
        if lin.bias is None:
            lin.bias = nn.Parameter(new_bias)
        else:
            lin.bias.copy_(new_bias)
