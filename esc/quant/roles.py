"""Op roles: which tensors of which operators can carry an activation quantizer.

Every quantization point is a *slot* of a quantized module (``input``, ``output``, ``a``, ``b``;
the quantizer lives at ``<module>.<slot>_quantizer``) and has one *role* from :data:`ROLES`, the
vocabulary a scope (:mod:`esc.quant.scope`) uses to decide bits, grid and calibrator:

=====================  ==============================================================================
``conv_linear_input``  input of a Conv1d / Conv2d / Linear (the paper's "activations feeding Conv, Linear")
``layernorm_input``    input of a LayerNorm: the residual stream in pre-norm transformers (the paper's
                       "activations feeding LayerNorm")
``layernorm_output``   normalised output of a LayerNorm
``attention_qk``       both operands of the attention scores ``Q @ K^T``
``attention_probs``    softmax probabilities, the first operand of ``P @ V``
``attention_v``        ``V``, the second operand of ``P @ V``
``head``               input of a module the model declares as its head (classifier, vocabulary projection)
=====================  ==============================================================================

:data:`REGISTRY` maps each float op type to its quantized counterpart and its slots' roles; a new
op type is one :func:`register` call. A model declares its head modules (glob patterns on module
paths) in its :class:`~esc.core.bundle.ModelBundle`; everything else follows from the op types.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from esc.quant.modules import MatMul, QuantConv1d, QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul

ROLES = ("conv_linear_input", "layernorm_input", "layernorm_output", "attention_qk", "attention_probs",
         "attention_v", "head")


@dataclass(frozen=True)
class OpType:
    """How one float op type is quantized: its quantized class (``from_float(module, quantizers,
    weight_quantizer)``), whether it has a weight, and ``slots(module) -> {slot: role}``."""

    quantized: type
    has_weight: bool
    slots: Callable[[nn.Module], dict[str, str]]


REGISTRY: dict[type, OpType] = {}


def register(float_type: type, quantized: type, slots: Callable[[nn.Module], dict[str, str]], has_weight: bool) -> None:
    """Declare how ``float_type`` modules are quantized (exact type match, subclasses are not included)."""
    REGISTRY[float_type] = OpType(quantized, has_weight, slots)


def _matmul_slots(module: MatMul) -> dict[str, str]:
    if module.product == "qk":
        return {"a": "attention_qk", "b": "attention_qk"}
    return {"a": "attention_probs", "b": "attention_v"}


for _t, _q in ((nn.Linear, QuantLinear), (nn.Conv1d, QuantConv1d), (nn.Conv2d, QuantConv2d)):
    register(_t, _q, lambda m: {"input": "conv_linear_input"}, has_weight=True)
register(nn.LayerNorm, QuantLayerNorm, lambda m: {"input": "layernorm_input", "output": "layernorm_output"}, has_weight=False)
register(MatMul, QuantMatMul, _matmul_slots, has_weight=False)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when module path ``name`` matches one of the glob ``patterns`` (``fnmatch``: ``*`` spans dots)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def slot_roles(name: str, module: nn.Module, head: Iterable[str] = ()) -> dict[str, str]:
    """``{slot: role}`` of a float module at path ``name`` (empty for op types not in :data:`REGISTRY`);
    the input of a module matching ``head`` has the ``head`` role."""
    op = REGISTRY.get(type(module))
    if op is None:
        return {}
    roles = op.slots(module)
    if "input" in roles and matches(name, head):
        roles = {**roles, "input": "head"}
    return roles
