"""Max calibration: the clip range is the observed range of the activation."""
from __future__ import annotations

import torch

from esc.calibrators.base import Observer, StatisticCalibrator
from esc.quant.quantizer import UniformQuantizer


class MinMaxObserver(Observer):
    """Running ``max |x|`` (symmetric) or running ``min`` / ``max`` (asymmetric).

    Per-channel quantizers keep one statistic per slice along the quantizer's ``axis`` (reduced
    over every other dimension, batch included).
    """

    def __init__(self, quantizer: UniformQuantizer) -> None:
        super().__init__(quantizer)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        q = self.quantizer
        if q.granularity == "channel":
            axis = q.axis % x.dim()
            flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        else:
            lo, hi = x.min(), x.max()
        lo, hi = lo.detach().cpu(), hi.detach().cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def clip_range(self):
        """``max(|min|, |max|)`` for symmetric quantizers, ``(min, max)`` otherwise."""
        if self.quantizer.symmetric:
            return torch.maximum(self.lo.abs(), self.hi.abs())
        return self.lo, self.hi


class MinMaxCalibrator(StatisticCalibrator):
    """Max calibration ("Max" in the paper's tables).

    Definition: one FP pass over the calibration set; symmetric quantizers get ``c = max |x|``
    (scale ``c / qmax``), asymmetric quantizers get ``[min x, max x]`` (widened to contain 0 by the
    quantizer). Per-tensor or per-channel (along the quantizer's ``axis``). No parameters.
    """

    name = "minmax"

    def make_observer(self, quantizer: UniformQuantizer) -> MinMaxObserver:
        return MinMaxObserver(quantizer)
