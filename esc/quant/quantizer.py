"""Uniform fake quantizer: the single primitive every other part of ``esc`` builds on.

A :class:`UniformQuantizer` maps a float tensor ``x`` to ``s * (clamp(round(x / s) + z, qmin, qmax) - z)``
(scale ``s``, integer zero point ``z``) and passes gradients straight through the rounding
(straight-through estimator), so PTQ methods can optimise through it.

Its state is explicit and inspectable: ``bits``, ``symmetric``, ``signed``, ``granularity``
(``"tensor"`` or ``"channel"`` along ``axis``), ``scale`` and ``zero_point`` buffers, and the derived
``clip_range``. An optional *population* of scales (a leading dimension ``P`` on ``scale``) lets one
forward pass evaluate ``P`` candidate scale vectors at once: the input batch is then the
calibration batch repeated ``P`` times along dim 0 and slice ``p`` is quantized with scale ``p``.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import nn

from esc.core.errors import UserError

GRANULARITIES = ("tensor", "channel")
#: Logarithmic grids of :class:`Log2Quantizer`: name -> levels per octave (the base is ``2^(1/k)``).
LOG_GRIDS = {"log2": 1, "log_sqrt2": 2}
MIN_BITS, MAX_BITS = 2, 16


class QuantizationError(UserError):
    """Raised for invalid quantizer settings or unusable calibration data."""


def integer_range(bits: int, signed: bool, symmetric: bool) -> tuple[int, int]:
    """Return ``(qmin, qmax)`` of the integer grid.

    Signed symmetric grids are restricted to ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the "narrow" range,
    so that ``-clip`` and ``+clip`` are both representable); signed asymmetric grids use the full
    ``[-2^(b-1), 2^(b-1) - 1]``; unsigned grids use ``[0, 2^b - 1]``.
    """
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizationError(f"bits={bits!r} is outside {MIN_BITS}..{MAX_BITS}; choose an integer bit width in that range")
    if not signed:
        return 0, 2**bits - 1
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even), with an identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` with broadcastable ``scale`` and ``zero_point`` (``None``: 0).

    Gradients flow to ``x`` through the rounding (STE) where ``round(x / s) + z`` lies in
    ``[qmin, qmax]`` (bounds included), and to ``scale``
    (as in LSQ), which reconstruction-based PTQ methods use. When no gradient is needed (autograd
    off, or neither ``x`` nor ``scale`` requires grad) the same values are computed in place on one
    buffer (calibration and evaluation speed): ``round(x / s)`` then add ``z``, clamp, subtract
    ``z`` and multiply by ``s``, in the same order as the autograd path, so results are identical.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                              or (zero_point is not None and zero_point.requires_grad))
    if needs_grad:
        zp = 0.0 if zero_point is None else zero_point
        q = round_ste(x / scale) + zp
        # STE clip: gradient 1 where the rounded level lies in [qmin, qmax] *inclusive* (torch.clamp's
        # own gradient is 0 at the bounds, which silenced every value rounding to qmin/qmax)
        inside = (q >= qmin) & (q <= qmax)
        q = torch.where(inside, q, q.detach().clamp(qmin, qmax))
        return (q - zp) * scale
    q = torch.div(x, scale)
    q.round_()
    if zero_point is None:
        return q.clamp_(qmin, qmax).mul_(scale)
    return q.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


class UniformQuantizer(nn.Module):
    """Uniform affine quantizer with explicit scale/zero-point state.

    Args:
        bits: bit width, 2..16.
        symmetric: symmetric (zero point 0, clip range ``[-c, c]``) or asymmetric (``[lo, hi]``).
        signed: signed integer grid; unsigned grids only make sense for non-negative tensors
            or asymmetric quantization.
        granularity: ``"tensor"`` (one scale) or ``"channel"`` (one scale per slice along ``axis``).
        axis: channel axis for per-channel quantization.
        name: the quantizer's name in its model (used in every error message).

    Modes: ``enabled=False`` passes ``x`` through unchanged. ``observer`` (a callable) sees every
    input before quantization; calibrators use it to collect statistics. A ``shared`` quantizer
    (one tensor read by several quantized slots, see :meth:`esc.quant.model.QuantizedModel.share_quantizers`)
    returns its last output again when the same tensor (or that output) comes back, so the tensor
    is rounded and observed once.
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, signed: bool = True,
                 granularity: str = "tensor", axis: int = 0, name: str = "") -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise QuantizationError(f"quantizer {name!r}: unknown granularity {granularity!r}; use one of {GRANULARITIES}")
        self.name = name
        self.bits = bits
        self.symmetric = symmetric
        self.signed = signed
        self.granularity = granularity
        self.axis = axis
        self.qmin, self.qmax = integer_range(bits, signed, symmetric)
        self.enabled = True
        self.observer: Optional[Callable[[torch.Tensor], None]] = None
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self._level_counts: Optional[torch.Tensor] = None
        self.grid = "uniform"  # the grid's name (a scope's ``grid``; :class:`Log2Quantizer` has logarithmic ones)
        self.role = ""  # its op role (esc.quant.roles) when inserted by a scope
        self.calibrator: Optional[str] = None  # a fixed calibrator for it (None: the run's calibrator)
        self.shared = False  # True when several slots read the same tensor through this quantizer
        self._memo: Optional[tuple] = None

    # ----------------------------------------------------------------------------------- state
    @property
    def is_calibrated(self) -> bool:
        """True once a scale has been set."""
        return self.scale.numel() > 0

    @property
    def population_size(self) -> int:
        """Number of candidate scale vectors held at once (0 when a single scale is set)."""
        base_dim = 0 if self.granularity == "tensor" else 1
        return self.scale.shape[0] if self.scale.dim() > base_dim else 0

    def set_clip_range(self, lo: torch.Tensor | float, hi: torch.Tensor | float | None = None) -> None:
        """Set scale and zero point from a clip range.

        Symmetric quantizers take ``hi`` (or ``lo`` alone) as the clip magnitude ``c`` and use
        ``s = c / qmax``. Asymmetric quantizers map ``[lo, hi]`` (widened to contain 0) onto
        ``[qmin, qmax]``. Degenerate ranges (all-zero tensors) get a tiny positive scale.
        """
        if self.symmetric:
            c = torch.as_tensor(hi if hi is not None else lo, dtype=torch.float32).abs()
            self.set_scale(c / self.qmax)
            return
        lo_t = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
        hi_t = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
        scale = torch.clamp((hi_t - lo_t) / (self.qmax - self.qmin), min=torch.finfo(torch.float32).tiny)
        zero_point = torch.clamp(torch.round(self.qmin - lo_t / scale), self.qmin, self.qmax)
        self._assign(scale, zero_point)

    def set_scale(self, scale: torch.Tensor | float) -> None:
        """Set the scale directly (symmetric quantizers; zero point 0).

        ``scale`` may carry a leading population dimension (see module docstring).
        """
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if not torch.isfinite(scale).all():
            raise QuantizationError(f"quantizer {self.name!r}: non-finite scale; its calibration data holds NaN/Inf or is empty")
        if (scale < 0).any():
            raise QuantizationError(f"quantizer {self.name!r}: negative scale {scale.min().item():g}")
        scale = torch.clamp(scale, min=torch.finfo(torch.float32).tiny)
        self._assign(scale, torch.zeros_like(scale))

    def _assign(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        device = self.scale.device
        self.scale = scale.detach().to(device)
        self.zero_point = zero_point.detach().to(device)

    def set_signed(self, signed: bool) -> None:
        """Switch between a signed and an unsigned integer grid (clears the scale: recalibrate after).

        A symmetric unsigned grid ``[0, 2^b - 1]`` (zero point 0) doubles the resolution of
        non-negative tensors such as softmax probabilities, which a signed grid would give only
        ``2^(b-1)`` levels.
        """
        self.signed = bool(signed)
        self.qmin, self.qmax = integer_range(self.bits, self.signed, self.symmetric)
        self._assign(torch.empty(0), torch.empty(0))

    @property
    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The representable float range ``(lo, hi)`` implied by scale and zero point."""
        self._require_calibrated()
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, bits={self.bits}, symmetric={self.symmetric}, signed={self.signed}, "
                f"granularity={self.granularity}, enabled={self.enabled}")

    # --------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared:
            memo = self._memo
            out = memo[1]() if memo is not None else None
            if out is not None and ((x is memo[0]() and x._version == memo[2]) or (x is out and x._version == memo[3])):
                return out
        out = self._quantize_input(x)
        if self.shared:  # the same tensor reaching this quantizer again (another consumer) is rounded once
            self._memo = (weakref.ref(x), weakref.ref(out), x._version, out._version)
        return out

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x.detach())
        if not self.enabled:
            return x
        self._require_calibrated()
        pop = self.population_size
        if pop:
            if self.granularity != "tensor":
                raise QuantizationError(f"quantizer {self.name!r}: population scales need per-tensor granularity")
            if x.shape[0] % pop:
                raise QuantizationError(f"quantizer {self.name!r}: batch {x.shape[0]} is not a multiple of the population {pop}")
            shape = (pop, -1) + (1,) * (x.dim() - 1)
            xs = x.reshape(pop, x.shape[0] // pop, *x.shape[1:])
            zp = None if self.symmetric else self.zero_point.view(shape)  # symmetric: zero point is 0
            return self.fake_quantize(xs, self.scale.view(shape), zp).reshape(x.shape)
        scale, zero_point = self._broadcast(x)
        if self._level_counts is not None:
            self._count_levels(x, scale, zero_point)
        return self.fake_quantize(x, scale, None if self.symmetric else zero_point)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        """Quantize-dequantize ``x`` on this quantizer's grid (uniform: :func:`fake_quantize`)."""
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax)

    def levels(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """The integer level of each value of ``x`` (for level utilisation)."""
        return torch.clamp(torch.round(x.detach() / scale) + zero_point, self.qmin, self.qmax).long()

    def _broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.granularity == "tensor" or self.scale.dim() == 0:
            return self.scale, self.zero_point
        axis = self.axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        return self.scale.view(shape), self.zero_point.view(shape)

    def _require_calibrated(self) -> None:
        if not self.is_calibrated:
            raise QuantizationError(f"quantizer {self.name!r} has no scale yet; run a calibrator (or disable it) before quantized inference")

    # ----------------------------------------------------------------------- level utilisation
    def track_levels(self, on: bool = True) -> None:
        """Start (or stop) counting how often each integer level is hit in forward passes."""
        self._level_counts = torch.zeros(self.qmax - self.qmin + 1, dtype=torch.long) if on else None

    def _count_levels(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        q = self.levels(x, scale, zero_point) - self.qmin
        self._level_counts += torch.bincount(q.flatten().cpu(), minlength=self._level_counts.numel())

    @property
    def level_utilisation(self) -> float:
        """Fraction of the ``2^bits`` integer levels hit at least once while tracking (NaN if never tracked)."""
        if self._level_counts is None or self._level_counts.sum() == 0:
            return float("nan")
        return float((self._level_counts > 0).float().mean())


class Log2Quantizer(UniformQuantizer):
    """Logarithmic quantizer for non-negative tensors such as softmax probabilities: a log2 grid (FQ-ViT, Lin et
    al., IJCAI 2022, its ``Log2Quantizer``) or a log-sqrt(2) grid (RepQ-ViT, Li et al., ICCV 2023, its
    ``LogSqrt2Quantizer`` in ``classification/quant/quantizer.py`` of github.com/zkkli/RepQ-ViT).

    Definition: with scale ``s`` (the clip, i.e. the largest representable value), ``b`` bits and ``k`` levels per
    octave (:data:`LOG_GRIDS`: ``k = 1`` for ``grid="log2"``, ``k = 2`` for ``grid="log_sqrt2"``, the base being
    ``2^(1/k)``), ``q = round(-k log2(x / s))`` (i.e. ``round(-log_base(x / s))``); values with ``q >= 2^b`` (and
    exact zeros) map to 0, the others to ``s * 2^(-max(q, 0) / k)``. Levels are powers of the base below ``s``,
    so a probability row keeps its small entries that a uniform 8-bit grid (step ``s / 255``) rounds to zero;
    the log-sqrt(2) grid has twice the resolution over half the range. RepQ-ViT's inference form writes a
    log-sqrt(2) level as ``s * 2^(-ceil(q/2)) * (sqrt(2) if q is odd else 1)``, a bit shift and a constant
    factor per parity (its "reparameterisation to log2"); the values are the same, so fake quantization
    computes them directly. Gradients pass straight through. Calibrators set ``s`` from the clip (max
    calibration gives ``s = max x``); a negative input is an error.
    """

    def __init__(self, bits: int = 8, name: str = "", grid: str = "log2") -> None:
        super().__init__(bits, True, False, "tensor", 0, name)
        if grid not in LOG_GRIDS:
            raise QuantizationError(f"quantizer {name!r}: unknown logarithmic grid {grid!r}; use one of {sorted(LOG_GRIDS)}")
        self.grid = grid
        self.levels_per_octave = LOG_GRIDS[grid]

    def set_clip_range(self, lo: torch.Tensor | float, hi: torch.Tensor | float | None = None) -> None:
        """Set the scale to the clip ``hi`` (or ``lo`` alone)."""
        self.set_scale(torch.as_tensor(hi if hi is not None else lo, dtype=torch.float32).abs())

    def set_signed(self, signed: bool) -> None:
        """A log2 grid is unsigned; asking for a signed one is an error."""
        if signed:
            raise QuantizationError(f"quantizer {self.name!r}: a log2 grid is for non-negative tensors only")

    @property
    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_calibrated()
        return torch.zeros_like(self.scale), self.scale

    def _exponents(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``round(-k log2(x / s))`` (``k = 1``: exactly ``round(-log2(x / s))``)."""
        return torch.round(-torch.log2(x.detach() / scale) * self.levels_per_octave)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        if bool((x < 0).any()):
            raise QuantizationError(f"quantizer {self.name!r}: the {self.grid} grid got negative inputs; use it for probabilities only")
        q = self._exponents(x, scale)
        out = torch.where(q >= 2**self.bits, torch.zeros_like(x), scale * torch.exp2(-q.clamp(min=0) / self.levels_per_octave))
        return x + (out - x).detach()

    def levels(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        return self._exponents(x, scale).clamp(0, self.qmax).nan_to_num(self.qmax).long()


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise a clear error if an observed activation holds NaN or Inf."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise QuantizationError(
            f"quantizer {name!r} observed {bad} NaN/Inf activation values; check the model's FP32 output "
            "on the calibration data (bad audio, a missing normalisation) before calibrating")
