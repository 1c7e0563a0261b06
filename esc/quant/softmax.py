"""HyQ's integer-only softmax with a linear exponential (Kim, Lee and Kim, "HyQ: Hardware-Friendly
Post-Training Quantization for CNN-Transformer Hybrid Networks", IJCAI 2024; official code
github.com/IDSL-SeoulTech/HyQ, ``models/ptq/layers.py``, ``QIntSoftmax.int_softmax`` with
``int_exp_first_8`` / ``int_poly_8`` and ``QIntSoftmax.forward`` with ``log_round``).

Definition. The softmax input is on an integer grid of step ``S`` and shifted by its row maximum, so
every integer score is ``t <= 0``. The exponential follows I-BERT's i-exp (Kim et al., ICML 2021,
Algorithm 1) with HyQ's change, the second-order polynomial replaced by a linear one:

* ``x0 = floor(-ln2 / S)`` (the integer of ``-ln 2``), ``t <- max(t, shift * x0)``;
* ``q = floor(t / x0)`` and ``r = t - x0 q`` (so ``t S ~ -q ln2 + r S`` with ``r S`` in ``(-ln2, 0]``);
* the linear polynomial ``exp(r S) ~ a (r S + b / a)`` in integers: ``z = r + floor((b / a) / S)``
  (output scale ``a S``);
* ``E = max(floor(z 2^(shift - q)), 0)`` (output scale ``a S / 2^shift``).

The official constants: ``a, b = 0.08947606, 0.12121466`` (``int_poly_8``; the linear fit of
``exp`` on ``(-ln2, 0]`` divided by 8, a factor the normalisation cancels: only ``b / a`` reaches
the integers), ``ln2 = 0.6931``, ``shift = 30``. The probabilities are ``E / sum(E)`` along the
last dim; HyQ quantizes them with FQ-ViT's log-int-softmax (``--lis``): ``k = log_round(round(sum(E)
/ E))`` with ``log_round(v) = floor(log2 v) + [v - 2^floor(log2 v) >= 2^(floor(log2 v) - 1)]``, the
output is ``2^-k`` for ``k < 2^bits`` and 0 otherwise (``bits`` = 4 in the official config).

Float bound (``S -> 0``): on one octave the linear exponential is ``exp(r) h(r)`` with
``h(r) = a (r + b / a) e^(-r)``, whose range over ``[-ln2, 0]`` has ``max h / min h = 1.0775`` for
the official ``a, b``; every probability is then within a factor 1.0775 of the float softmax
(:func:`float_error_bound`). On a coarse grid the floors add error: ``x0 S`` is not ``-ln 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esc.quant.quantizer import QuantizationError, UniformQuantizer, fake_quantize

OUTPUT_GRIDS = ("log2", "uniform")


@dataclass(frozen=True)
class IntSoftmaxSpec:
    """HyQ's integer softmax on a softmax-probability role: the output's ``output_bits``, the linear
    exponential's ``coef`` ``(a, b)`` (``exp(r) ~ a r + b`` on ``(-ln2, 0]``), the ``ln2`` constant and
    the i-exp ``shift`` (the official values by default)."""

    output_bits: int = 4
    coef: tuple[float, float] = (0.08947606, 0.12121466)
    ln2: float = 0.6931
    shift: int = 30

    def __post_init__(self) -> None:
        a, b = self.coef
        if not (a > 0 and b > a * self.ln2 and self.ln2 > 0 and self.shift >= 1 and 1 <= self.output_bits <= 16):
            raise QuantizationError(f"int softmax: need a > 0, b > a ln2 (a positive exponential), ln2 > 0, shift >= 1 and "
                                    f"output_bits in 1..16; got coef={self.coef}, ln2={self.ln2}, shift={self.shift}, "
                                    f"output_bits={self.output_bits}")


def linear_int_exp(t: torch.Tensor, step: torch.Tensor, spec: IntSoftmaxSpec) -> torch.Tensor:
    """HyQ's integer exponential ``E`` of integer scores ``t <= 0`` on a grid of step ``step`` (module docstring)."""
    a, b = spec.coef
    x0 = torch.floor(-spec.ln2 / step)
    t = torch.maximum(t, spec.shift * x0)
    q = torch.floor(t / x0)
    z = t - x0 * q + torch.floor(b / a / step)
    return torch.clamp(torch.floor(z * torch.exp2(spec.shift - q)), min=0)


def log_int_softmax(e: torch.Tensor, bits: int) -> torch.Tensor:
    """FQ-ViT's log-int-softmax of integer exponentials ``e`` along the last dim: ``2^-k`` with
    ``k = log_round(round(sum(e) / e))`` below ``2^bits``, else 0 (module docstring)."""
    ratio = torch.round(e.sum(-1, keepdim=True) / e.clamp(min=1))
    k = torch.floor(torch.log2(ratio))
    k = k + (ratio - torch.exp2(k) >= torch.exp2(k - 1)).to(k.dtype)
    return torch.where((e > 0) & (k < 2**bits), torch.exp2(-k), torch.zeros_like(e))


def float_error_bound(spec: IntSoftmaxSpec) -> float:
    """``max h / min h`` of ``h(r) = (r + b / a) e^(-r)`` on ``[-ln2, 0]``: the factor within which the
    linear exponential keeps every probability in the float limit (module docstring)."""
    c = spec.coef[1] / spec.coef[0]
    h = [(r + c) * math.exp(-r) for r in (-spec.ln2, 0.0)]
    if -spec.ln2 < 1.0 - c < 0.0:  # the interior maximum of h, where h'(r) = (1 - r - c) e^(-r) = 0
        h.append(math.exp(c - 1.0))
    return max(h) / min(h)


def score_gaps(p: torch.Tensor) -> torch.Tensor:
    """The softmax input below its row maximum, ``max_j x_j - x_i = log(max p) - log p_i``, recovered
    exactly from probabilities ``p`` along the last dim (zeros clamp to the smallest float)."""
    logp = torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))
    return logp.amax(-1, keepdim=True) - logp


class LinearSoftmaxQuantizer(UniformQuantizer):
    """The softmax-probability quantizer of HyQ's integer softmax (scope option ``softmax`` of the
    ``attention_probs`` role).

    Models compute a float softmax and hand its probabilities ``p`` to this quantizer (the first
    operand of ``P @ V``). It recovers the integer softmax's input, the gaps ``g = max x - x`` below the
    row maximum (:func:`score_gaps`), and its calibrated uniform grid of ``bits`` (the scope's bits of
    the role) is the grid of those gaps: calibrators observe ``g``, not ``p``, so any calibrator sets the
    step ``S`` of the integer scores ``t = -round(g / S)`` (HyQ: 8-bit minmax scores). The output is
    :func:`linear_int_exp` of ``t``, normalised along the last dim and rounded on ``grid``: ``log2``
    (HyQ's log-int-softmax, :func:`log_int_softmax`) or ``uniform`` (``E / sum(E)`` on the grid
    ``k / (2^output_bits - 1)``). Gradients pass straight through to ``p``. Carried over from ViT
    attention: every attention softmax of the speech transformers (AST, Whisper's encoder and
    decoder) is a row of ``P @ V``; Whisper's causal mask gives masked keys ``p = 0``, whose gaps
    saturate the grid and whose ``E`` is (almost) 0.
    """

    def __init__(self, bits: int, grid: str, spec: IntSoftmaxSpec, name: str = "") -> None:
        super().__init__(bits, True, True, "tensor", 0, name)
        if grid not in OUTPUT_GRIDS:
            raise QuantizationError(f"quantizer {name!r}: the integer softmax's output grid {grid!r} is not one of {OUTPUT_GRIDS}")
        self.grid, self.spec = grid, spec

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_grid={self.grid}, {self.spec}"

    def _quantize_input(self, p: torch.Tensor) -> torch.Tensor:
        gaps = score_gaps(p.detach())
        if not self.enabled:
            if self.observer is not None:
                self.observer(gaps)
            return p
        return p + (super()._quantize_input(gaps) - p).detach()

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        """The integer softmax's probabilities from gaps ``x`` on the grid of ``scale`` (class docstring)."""
        t = -torch.round(fake_quantize(x, scale, zero_point, self.qmin, self.qmax) / scale)
        e = linear_int_exp(t, scale, self.spec)
        if self.grid == "log2":
            return log_int_softmax(e, self.spec.output_bits)
        levels = 2**self.spec.output_bits - 1
        return torch.round(e / e.sum(-1, keepdim=True) * levels) / levels
