"""Quantization scope: per op role, whether and how an activation is quantized.

A :class:`Scope` (one file of ``conf/scope/``) gives every role of :data:`esc.quant.roles.ROLES` a
:class:`RoleSpec` (bits, grid, calibrator) and may override single modules by glob pattern. It is
an axis of every run and part of every row's key. The named scopes:

* ``paper`` (default): the run's calibrator on Conv/Linear, head and LayerNorm inputs; max
  calibration on every other quantized op (LayerNorm outputs, attention operands), all at the
  activation bits; one quantizer per tensor.
* ``paper_a16``: ``paper`` with the attention products (Q/K operands, probabilities, V) at 16 bits.
* ``paper_log2`` / ``paper_log_sqrt2``: ``paper`` with the softmax probabilities on a log2 grid (FQ-ViT) or a
  log-sqrt(2) grid (RepQ-ViT), :class:`~esc.quant.quantizer.Log2Quantizer`.
* ``paper_hyq``: ``paper`` with HyQ's integer softmax (linear exponential, log2 output) on the softmax
  probabilities: the ``softmax`` option of that role (:mod:`esc.quant.softmax`).
* ``linear``: Conv/Linear and head inputs only.
* ``full``: the scope of the rows before scopes existed: every Conv/Linear input, LayerNorm output
  and attention operand with the run's calibrator, no LayerNorm input, each slot its own quantizer.

``float_prefix: true`` (any scope) runs a model's fixed prompt prefix (Whisper's decoder prompt
``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``) with the quantizers of its
``prefix_modules`` in float, as a deployment serving those positions from a float cache would
(PrefixQuant, Chen et al. 2024, for an LLM's prefix tokens): those quantizers are calibrated on,
and applied to, the text positions only. Approximation: the prompt positions' cached keys and
values are float, but a text step's K/V operand quantizer (scopes that quantize attention
operands) still rounds the whole cached K/V, prompt positions included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from esc.quant.quantizer import LOG_GRIDS, MAX_BITS, MIN_BITS, QuantizationError
from esc.quant.roles import ROLES, matches
from esc.quant.softmax import IntSoftmaxSpec

GRIDS = ("uniform", *LOG_GRIDS)
SOFTMAX_ROLE = "attention_probs"  # the one role whose tensor is a softmax output (the ``softmax`` option)
ACTIVATION = "activation"  # bits placeholder: the precision's activation bit width


@dataclass(frozen=True)
class RoleSpec:
    """How the tensors of one role are quantized: ``bits`` (``None``: float), ``grid`` (uniform |
    log2 | log_sqrt2) and ``calibrator`` (``None``: the run's calibrator; else a statistic calibrator's name).
    ``softmax`` (``attention_probs`` only; ``None``: the float softmax's output is rounded on ``grid``):
    HyQ's integer softmax (:mod:`esc.quant.softmax`), ``bits`` and ``calibrator`` then set the grid of
    its integer scores and ``grid`` is its output grid (uniform | log2)."""

    bits: Optional[int]
    grid: str = "uniform"
    calibrator: Optional[str] = None
    softmax: Optional[IntSoftmaxSpec] = None


@dataclass(frozen=True)
class Override:
    """Per-module exception: modules whose path matches ``pattern`` are left entirely in float
    (``skip``), or get other activation ``bits`` (``None``: float) and/or a fixed ``calibrator``."""

    pattern: str
    skip: bool = False
    bits: Any = "keep"
    calibrator: Any = "keep"


@dataclass(frozen=True)
class Scope:
    """Which activations are quantized and how (see the module docstring)."""

    name: str
    roles: dict[str, RoleSpec]
    overrides: tuple[Override, ...] = ()
    one_quantizer_per_tensor: bool = True
    float_prefix: bool = False

    def skipped(self, module: str) -> bool:
        """True when ``module`` is left entirely in float (weights included)."""
        return any(o.skip and matches(module, [o.pattern]) for o in self.overrides)

    def spec(self, module: str, role: str) -> RoleSpec:
        """The spec of slot ``role`` of ``module``, overrides applied in order."""
        spec = self.roles[role]
        for o in self.overrides:
            if matches(module, [o.pattern]):
                spec = RoleSpec(spec.bits if o.bits == "keep" else o.bits, spec.grid,
                                spec.calibrator if o.calibrator == "keep" else o.calibrator, spec.softmax)
        return spec


def _bits(value: Any, activation_bits: Optional[int], where: str) -> Optional[int]:
    if value is None or activation_bits is None:
        return None
    if value == ACTIVATION:
        return activation_bits
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise QuantizationError(f"scope {where}: bits={value!r} must be null (float), {ACTIVATION!r} or an integer in "
                                f"{MIN_BITS}..{MAX_BITS}")
    return value


def _softmax(value: Any, role: str, where: str) -> Optional[IntSoftmaxSpec]:
    """The :class:`IntSoftmaxSpec` of a role's ``softmax`` option (a mapping of its fields, or ``None``)."""
    if value is None:
        return None
    if role != SOFTMAX_ROLE:
        raise QuantizationError(f"scope {where}: the softmax option belongs to the {SOFTMAX_ROLE} role only")
    unknown = set(dict(value)) - set(IntSoftmaxSpec.__dataclass_fields__)
    if unknown:
        raise QuantizationError(f"scope {where}: unknown softmax options {sorted(unknown)}; use some of "
                                f"{sorted(IntSoftmaxSpec.__dataclass_fields__)}")
    value = dict(value)
    if "coef" in value:
        value["coef"] = tuple(float(c) for c in value["coef"])
    return IntSoftmaxSpec(**value)


def build_scope(cfg: dict, activation_bits: Optional[int]) -> Scope:
    """A :class:`Scope` from its config dict (``name``, ``roles``, ``overrides``,
    ``one_quantizer_per_tensor``), with ``"activation"`` bits resolved to ``activation_bits``
    (``None``, a weight-only precision: every activation stays float). Checks every value."""
    name = cfg.get("name", "?")
    roles_cfg = dict(cfg.get("roles") or {})
    unknown = set(roles_cfg) - set(ROLES)
    missing = set(ROLES) - set(roles_cfg)
    if unknown or missing:
        raise QuantizationError(f"scope {name!r}: unknown roles {sorted(unknown)} / missing roles {sorted(missing)}; "
                                f"a scope lists exactly {list(ROLES)}")
    roles = {}
    for role in ROLES:
        r = dict(roles_cfg[role] or {})
        grid = r.get("grid", "uniform")
        if grid not in GRIDS:
            raise QuantizationError(f"scope {name!r} role {role}: grid={grid!r} is not one of {GRIDS}")
        roles[role] = RoleSpec(_bits(r.get("bits"), activation_bits, f"{name!r} role {role}"), grid, r.get("calibrator"),
                               _softmax(r.get("softmax"), role, f"{name!r} role {role}"))
    overrides = []
    for o in cfg.get("overrides") or ():
        o = dict(o)
        if "pattern" not in o:
            raise QuantizationError(f"scope {name!r}: every override needs a 'pattern' (a glob on module paths), got {o}")
        bits = o.get("bits", "keep")
        overrides.append(Override(o["pattern"], bool(o.get("skip", False)),
                                  bits if bits == "keep" else _bits(bits, activation_bits, f"{name!r} override {o['pattern']}"),
                                  o.get("calibrator", "keep")))
    return Scope(name, roles, tuple(overrides), bool(cfg.get("one_quantizer_per_tensor", True)), bool(cfg.get("float_prefix", False)))


def full_scope(activation_bits: Optional[int]) -> Scope:
    """The ``full`` scope (every slot but LayerNorm inputs, the run's calibrator, no sharing): the
    default of :func:`esc.quant.model.quantize_model` when no scope is given."""
    roles = {role: {"bits": None if role == "layernorm_input" else ACTIVATION} for role in ROLES}
    return build_scope({"name": "full", "roles": roles, "one_quantizer_per_tensor": False}, activation_bits)
