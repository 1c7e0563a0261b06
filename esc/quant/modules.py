"""Quantized drop-in replacements for the operators that ESC quantizes.

Quantization points (the paper's "activations feeding convolution, linear and LayerNorm operators"
plus the attention matmuls of transformer blocks):

* :class:`QuantLinear`, :class:`QuantConv1d`, :class:`QuantConv2d`: ``input_quantizer`` on the
  input activation, ``weight_quantizer`` on the weight (per-channel along the output axis by
  default). Parameters are shared with the float module they replace, so state-dict names and
  in-place weight edits (PTQ) carry over.
* :class:`QuantLayerNorm`: ``input_quantizer`` on its input (the residual stream of a pre-norm
  transformer) and ``output_quantizer`` on the normalised output.
* :class:`QuantMatMul`: ``a_quantizer`` and ``b_quantizer`` on both operands of a :class:`MatMul`.
  Models expose their attention products ``Q @ K^T`` and ``softmax @ V`` as :class:`MatMul`
  modules (a float model is unaffected: ``MatMul`` is just ``torch.matmul``).

A slot that its scope leaves in float holds an ``nn.Identity`` instead of a quantizer (see
:mod:`esc.quant.roles` for the role of each slot).

The quantized weight is cached while gradients are off (calibration, evaluation), keyed by the
weight's storage, version counter and the weight quantizer's scale and zero point tensors, so it is recomputed only
when the weight or its scale changes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from esc.quant.quantizer import UniformQuantizer


PRODUCTS = ("qk", "pv")


class MatMul(nn.Module):
    """``torch.matmul`` as a module, so the attention products become quantization points.

    ``product`` says which attention product it is: ``"qk"`` (scores ``Q @ K^T``) or ``"pv"``
    (softmax probabilities times ``V``); it decides the roles of its operands.
    """

    def __init__(self, product: str) -> None:
        super().__init__()
        if product not in PRODUCTS:
            raise ValueError(f"MatMul product {product!r} is not one of {PRODUCTS}")
        self.product = product

    def extra_repr(self) -> str:
        return f"product={self.product!r}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class _WeightQuantMixin:
    """Weight fake-quantization with a cache valid while autograd is off."""

    weight: nn.Parameter
    weight_quantizer: UniformQuantizer

    def _init_cache(self) -> None:
        self._wq_cache: Optional[torch.Tensor] = None
        self._wq_key: Optional[tuple] = None

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the quantized model sees it (float weight when weight quant is off)."""
        wq = self.weight_quantizer
        if not wq.enabled:
            return self.weight
        if torch.is_grad_enabled():
            return wq(self.weight)
        # The key holds the scale / zero-point tensors themselves (compared by identity), not only
        # their addresses: a freed scale's address can be reused by a new scale whose version
        # counter is again 0, which would silently return a stale quantized weight.
        key = (self.weight.data_ptr(), self.weight._version, wq.scale._version, wq.zero_point._version)
        old = self._wq_key
        if old is None or old[0] != key or old[1] is not wq.scale or old[2] is not wq.zero_point:
            self._wq_cache, self._wq_key = wq(self.weight), (key, wq.scale, wq.zero_point)
        return self._wq_cache


class QuantLinear(nn.Linear, _WeightQuantMixin):
    """``nn.Linear`` with input-activation and weight quantizers."""

    @classmethod
    def from_float(cls, module: nn.Linear, quantizers: dict[str, UniformQuantizer], weight: UniformQuantizer) -> "QuantLinear":
        """Wrap ``module``, sharing its parameters (``quantizers``: slot -> activation quantizer)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight, new.bias = module.weight, module.bias
        new.input_quantizer = quantizers.get("input", nn.Identity())
        new.weight_quantizer = weight
        new._init_cache()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


class _QuantConvMixin(_WeightQuantMixin):
    @classmethod
    def from_float(cls, module: nn.Module, quantizers: dict[str, UniformQuantizer], weight: UniformQuantizer):
        """Wrap a float convolution, sharing its parameters and hyper-parameters."""
        new = cls.__new__(cls)
        new.__dict__.update({k: v for k, v in module.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new.input_quantizer = quantizers.get("input", nn.Identity())
        new.weight_quantizer = weight
        new._init_cache()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with input-activation and weight quantizers."""


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with input-activation and weight quantizers."""


class QuantLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with input and output quantizers."""

    @classmethod
    def from_float(cls, module: nn.LayerNorm, quantizers: dict[str, UniformQuantizer], weight: None = None) -> "QuantLayerNorm":
        """Wrap ``module``, sharing its parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = module.normalized_shape, module.eps, module.elementwise_affine
        new.weight, new.bias = module.weight, module.bias
        new.input_quantizer = quantizers.get("input", nn.Identity())
        new.output_quantizer = quantizers.get("output", nn.Identity())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(super().forward(self.input_quantizer(x)))


class QuantMatMul(MatMul):
    """:class:`MatMul` with both operands quantized."""

    @classmethod
    def from_float(cls, module: MatMul, quantizers: dict[str, UniformQuantizer], weight: None = None) -> "QuantMatMul":
        """Wrap ``module`` (its ``product`` is kept)."""
        new = cls(module.product)
        new.a_quantizer = quantizers.get("a", nn.Identity())
        new.b_quantizer = quantizers.get("b", nn.Identity())
        return new

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.a_quantizer(a), self.b_quantizer(b))
