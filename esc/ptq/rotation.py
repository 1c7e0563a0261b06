"""Rotation (QuaRot, Ashkboos et al. 2024): an orthogonal rotation of Linear inputs folded into the weights."""
from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import first_batch_outputs, outputs_match
from esc.quant.model import QuantizedModel
from esc.quant.modules import QuantLinear
from esc.quant.quantizer import QuantizationError
from esc.quant.roles import matches, register

log = logging.getLogger(__name__)

KINDS = ("hadamard", "orthogonal")


class RotatedLinear(nn.Linear):
    """``nn.Linear`` computing ``(x R) W_r^T + b`` with an orthogonal ``R`` (buffer ``rotation``, ``[in, in]``) and
    ``W_r = W R``: the function of ``x W^T + b``, with ``x R`` as the tensor its input quantizer sees. For a
    randomised Hadamard ``R = diag(s) H / sqrt(d)`` the buffer ``hadamard_diagonal`` (``R[:, 0] = s / sqrt(d)``)
    makes :func:`rotate` use the fast transform instead of the dense product."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rotation: torch.Tensor, hadamard: bool = False) -> "RotatedLinear":
        """A rotated copy of ``linear`` (a new weight parameter, so a weight tied elsewhere is left as is);
        ``hadamard``: ``rotation`` is a randomised Sylvester Hadamard matrix (see :func:`random_rotation`)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_((linear.weight.double() @ rotation.double()).to(linear.weight.dtype))
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.register_buffer("rotation", rotation.to(linear.weight))
        new.register_buffer("hadamard_diagonal", new.rotation[:, 0].clone() if hadamard else None)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rotate(x, self.rotation, self.hadamard_diagonal), self.weight, self.bias)


class QuantRotatedLinear(QuantLinear):
    """:class:`RotatedLinear` with its input quantizer on the rotated input ``x R`` and its weight quantizer on ``W R``."""

    @classmethod
    def from_float(cls, module: RotatedLinear, quantizers: dict, weight) -> "QuantRotatedLinear":
        """Wrap ``module``, sharing its parameters and rotation."""
        new = super().from_float(module, quantizers, weight)
        new.register_buffer("rotation", module.rotation)
        new.register_buffer("hadamard_diagonal", module.hadamard_diagonal)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(rotate(x, self.rotation, self.hadamard_diagonal)), self.quantized_weight(), self.bias)


register(RotatedLinear, QuantRotatedLinear, lambda m: {"input": "conv_linear_input"}, has_weight=True)


@functools.lru_cache(maxsize=None)
def hadamard(d: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``d`` (a power of two), entries +-1; built once per order and
    shared (:func:`hadamard_transform` asks for its factors on every forward), so callers must not modify it."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard(d)`` over the last dimension (``d`` a power of two) in ``d (a + b)`` multiply-adds per row
    instead of ``d^2``: Sylvester's ``H_d = H_a kron H_b`` with ``a b = d``, so with ``x`` viewed as ``[a, b]``
    the product is ``H_a X H_b`` (both factors symmetric). QuaRot runs the same products as fast Hadamard kernels."""
    d = x.shape[-1]
    a = 1 << (d.bit_length() - 1) // 2
    y = x.reshape(*x.shape[:-1], a, d // a)
    return (hadamard(a).to(x) @ y @ hadamard(d // a).to(x)).reshape(x.shape)


def rotate(x: torch.Tensor, rotation: torch.Tensor, hadamard_diagonal: torch.Tensor | None) -> torch.Tensor:
    """``x R``: the dense product, or for ``R = diag(s) H / sqrt(d)`` (``hadamard_diagonal = s / sqrt(d)``) the same
    value as :func:`hadamard_transform` of ``x * hadamard_diagonal`` (equal up to float rounding)."""
    if hadamard_diagonal is None:
        return x @ rotation
    return hadamard_transform(x * hadamard_diagonal)


def random_rotation(d: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A seeded orthogonal ``[d, d]`` matrix: ``diag(s) H / sqrt(d)`` with random signs ``s`` (``kind="hadamard"``,
    ``d`` a power of two), else the ``Q`` of a Gaussian matrix's QR with ``diag(R) > 0`` (Haar-distributed)."""
    if kind == "hadamard" and d & (d - 1) == 0:
        signs = torch.randint(0, 2, (d,), generator=generator, dtype=torch.float64) * 2 - 1
        return (signs[:, None] * hadamard(d) / math.sqrt(d)).float()
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class Rotation(PTQMethod):
    """Rotation of Linear inputs (QuaRot: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated
    LLMs", NeurIPS 2024; official code github.com/spcl/QuaRot), the part that is exact for any model here.

    Stage ``before`` (acts on the float model). Touches: every ``nn.Linear`` (exact type) whose module path
    matches ``patterns`` and none of ``exclude`` is replaced, at the same path, by a :class:`RotatedLinear`
    with ``W_r = W R`` (a new weight: a weight tied elsewhere keeps its value) that rotates its input
    online, ``y = (x R) W_r^T + b = x W^T + b``; after ``quantize_model`` its input quantizer rounds
    ``x R`` and its weight quantizer ``W R``. ``R`` is drawn per layer from a generator seeded with ``seed``:
    ``kind="hadamard"``: the randomised Hadamard ``diag(s) H / sqrt(d)`` (Sylvester ``H``, ``d`` =
    in_features a power of two, random signs ``s``); other widths, or ``kind="orthogonal"``: a
    Haar-random orthogonal matrix (QR of a Gaussian matrix). An outlier spreads over all ``d`` rotated
    channels (one of magnitude ``M`` in one channel becomes ``+-M / sqrt(d)`` in each under a Hadamard),
    so a static per-tensor range no longer has to cover outlier channels.
    The float function is unchanged up to float rounding; ``verify`` checks it (the outputs on the
    first calibration batch within ``rtol`` of their max magnitude) and refuses the model otherwise
    (a model that reads a Linear's ``weight`` outside its forward, or a fused kernel doing so).

    What this is of QuaRot: its online Hadamard transform of the down-projection input (folded into
    ``W_down``), applied at any chosen Linear (the rotation is in float, before the input quantizer,
    as QuaRot's online Hadamards run in FP16). Not done: QuaRot's rotation of the residual stream
    fused into the weights (no online cost, rotating LayerNorm inputs and outputs too) and its per-head
    rotation of values and out-projection; the residual-stream fusion is exact for RMSNorm only
    (``||x R|| = ||x||``), and a LayerNorm's mean subtraction does not commute with ``R``, so for the
    LayerNorm models here it would need every writer of the residual stream made zero-mean first
    (SliceGPT's LayerNorm-to-RMSNorm conversion), a model-specific rewrite. The rotation adds one
    float transform per rotated Linear at inference: a Hadamard one as two small matmuls
    (:func:`hadamard_transform`, ``d (a + b)`` multiply-adds per row, QuaRot's fast Hadamard transform),
    an orthogonal one as a ``d x d`` matmul.
    """

    name = "rotation"
    stage = "before"

    def __init__(self, patterns: Sequence[str] = ("*",), exclude: Sequence[str] = (), kind: str = "hadamard",
                 seed: int = 0, verify: bool = True, rtol: float = 1e-4) -> None:
        if kind not in KINDS:
            raise QuantizationError(f"Rotation: unknown kind={kind!r}; use one of {KINDS}")
        self.patterns, self.exclude, self.kind, self.seed = tuple(patterns), tuple(exclude), kind, seed
        self.verify, self.rtol = verify, rtol
        self.rotated: list[str] = []

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Replace every chosen Linear of the float ``model`` by its rotated form."""
        if isinstance(model, QuantizedModel):
            raise QuantizationError("Rotation acts on the float model before quantizers are inserted (stage='before'); "
                                    "apply it to the float model and call quantize_model afterwards")
        reference = first_batch_outputs(model, data) if self.verify else None
        generator = torch.Generator().manual_seed(self.seed)
        self.rotated = [name for name, m in model.named_modules() if type(m) is nn.Linear
                        and matches(name, self.patterns) and not matches(name, self.exclude)]
        for name in self.rotated:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            linear = getattr(owner, child)
            d = linear.in_features
            setattr(owner, child, RotatedLinear.from_linear(linear, random_rotation(d, self.kind, generator),
                                                            hadamard=self.kind == "hadamard" and d & (d - 1) == 0))
        if reference is not None and not outputs_match(reference, first_batch_outputs(model, data), self.rtol):
            raise QuantizationError("Rotation changed the float model's output: it reads a Linear's weight outside that "
                                    "Linear's forward; leave that Linear out with `exclude` (or use another ptq method)")
        log.info("%s: rotated the inputs of %d Linears (%s)", self.name, len(self.rotated), self.kind)
