"""Attention products of transformers models as quantization points: the ``esc_matmul`` attention function.

Attention products ``Q K^T`` and ``softmax V`` run through :class:`esc.quant.modules.MatMul`
modules (``qk_matmul``, ``pv_matmul`` on every attention block) via a registered transformers
attention function, so :func:`esc.quant.model.quantize_model` quantizes them: ``"esc_matmul"``
for Whisper (:func:`add_matmul_modules`), ``"esc_matmul_hub"`` (the same function after folding a
``position_bias`` into the mask) for the other hub models (:func:`enable_matmul_attention`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from esc.quant.modules import MatMul

ATTN_IMPLEMENTATION = "esc_matmul"
MATMUL_ATTENTION = "esc_matmul_hub"  # registered attention implementation (see enable_matmul_attention)


def esc_matmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                         dropout: float = 0.0, **kwargs):
    """transformers' eager attention with both products through the module's ``MatMul`` modules.

    ``query``/``key``/``value`` are ``[B, heads, T, head_dim]``; returns ``([B, T, heads, head_dim], weights)``.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    qk = getattr(module, "qk_matmul", None)
    pv = getattr(module, "pv_matmul", None)
    qk = torch.matmul if qk is None else qk
    pv = torch.matmul if pv is None else pv
    scores = qk(query, key.transpose(2, 3))
    if scaling != 1.0:
        scores = scores * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = pv(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, esc_matmul_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)


def add_matmul_modules(model: nn.Module) -> nn.Module:
    """Give every ``WhisperAttention`` ``qk_matmul``/``pv_matmul`` modules and switch to the ``esc_matmul`` attention."""
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    _register_attention()
    for module in model.modules():
        if isinstance(module, WhisperAttention):
            module.qk_matmul, module.pv_matmul = MatMul("qk"), MatMul("pv")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def enable_matmul_attention(hf_model: nn.Module, attention_classes: Sequence[type]) -> nn.Module:
    """Give each attention module ``qk_matmul``/``pv_matmul`` :class:`MatMul` modules and switch the
    model to :data:`MATMUL_ATTENTION`: the offline Whisper's ``esc_matmul`` attention function
    (:func:`esc_matmul_attention`; the products become quantization points),
    with a ``position_bias`` (relative positions) folded into the additive mask first."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    def with_bias(module, query, key, value, attention_mask, position_bias=None, **kwargs):
        if position_bias is not None:
            attention_mask = position_bias if attention_mask is None else attention_mask + position_bias
        return esc_matmul_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(MATMUL_ATTENTION, with_bias)
    ALL_MASK_ATTENTION_FUNCTIONS.register(MATMUL_ATTENTION, eager_mask)
    for module in hf_model.modules():
        if isinstance(module, tuple(attention_classes)):
            module.qk_matmul, module.pv_matmul = MatMul("qk"), MatMul("pv")
    hf_model.set_attn_implementation(MATMUL_ATTENTION)
    return hf_model
