"""What a calibrator sees and what every calibrator shares.

A calibrator sets the scale of each activation quantizer of a :class:`~esc.quant.model.QuantizedModel`.
It knows nothing of tasks: it receives :class:`CalibrationData`, i.e. a list of model-ready
batches (front-end features already computed and cached by the task) and a ``forward`` callable
that runs a model on one batch, plus, for ESC's default fitness, a per-sample task ``loss``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from esc.quant.model import QuantizedModel
from esc.quant.quantizer import QuantizationError, UniformQuantizer, check_finite

Forward = Callable[[nn.Module, Any], torch.Tensor]
Loss = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class CalibrationData:
    """Calibration batches and how to run a model on them.

    Attributes:
        batches: model-ready batches (a tensor, or a tuple/dict of tensors with the batch on dim 0).
        forward: ``forward(model, batch) -> outputs`` (outputs with the batch on dim 0).
        loss: ``loss(outputs, batch) -> per-sample loss [B]``: the task loss (needs labels or
            pseudo-labels in the batch); ESC's default fitness. ``None`` if the task has none.
    """

    batches: Sequence[Any]
    forward: Forward
    loss: Optional[Loss] = None

    def __post_init__(self) -> None:
        self.batches = list(self.batches)
        if not self.batches:
            raise QuantizationError("the calibration set is empty; give at least one batch (calibration.num_samples > 0)")

    @property
    def num_samples(self) -> int:
        """Number of samples over all batches."""
        return sum(batch_size(b) for b in self.batches)


def batch_size(batch: Any) -> int:
    """Size of dim 0 of the first tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch
    return batch_size(next(iter(items)))


def map_batch(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a (nested) batch (dicts, tuples and lists rebuilt; other values kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_batch(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(v, fn) for v in batch)
    return batch


def repeat_batch(batch: Any, times: int) -> Any:
    """Repeat every tensor of a (nested) batch ``times`` times along dim 0 (population evaluation)."""
    return map_batch(batch, lambda t: t.repeat(times, *([1] * (t.dim() - 1))))


def take_batch(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a (nested) batch: every tensor sliced on dim 0, other values kept."""
    return map_batch(batch, lambda t: t[:n])


@dataclass
class CalibrationResult:
    """What a calibrator reports besides the scales it sets."""

    seconds: float = 0.0
    forward_passes: int = 0  # full passes over the calibration set
    history: dict[str, list[float]] = field(default_factory=dict)  # e.g. ESC fitness curves
    timings: dict[str, float] = field(default_factory=dict)  # per-stage wall seconds (ESC: see ESCCalibrator)


class Calibrator:
    """Base class: ``calibrate(qmodel, data)`` sets every activation quantizer's scale."""

    name = "base"

    def calibrate(self, qmodel: QuantizedModel, data: CalibrationData) -> CalibrationResult:
        """Set the scales of ``qmodel``'s activation quantizers from ``data``."""
        raise NotImplementedError


class Observer:
    """Collects statistics of one quantizer's input; subclasses define what is kept."""

    def __init__(self, quantizer: UniformQuantizer) -> None:
        self.quantizer = quantizer
        self.count = 0

    def __call__(self, x: torch.Tensor) -> None:
        check_finite(x, self.quantizer.name)
        self.count += x.numel()
        self.update(x.float())

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of activations into the statistics."""
        raise NotImplementedError

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """The calibrated clip range: ``c`` (symmetric) or ``(lo, hi)`` (asymmetric)."""
        raise NotImplementedError


def require_per_tensor(quantizer: UniformQuantizer, calibrator: str) -> None:
    """Raise a clear error when ``calibrator`` (per-tensor only) is given a per-channel quantizer."""
    if quantizer.granularity != "tensor":
        raise QuantizationError(f"quantizer {quantizer.name!r}: {calibrator} supports per-tensor activation "
                                "quantizers only; use granularity='tensor' or the minmax calibrator")


class StatisticCalibrator(Calibrator):
    """Calibrators that observe FP activations once, then derive each clip range from statistics.

    All activation quantizers are disabled during observation, so every quantizer sees the
    full-precision activations of the (weight-quantized) model.
    """

    def make_observer(self, quantizer: UniformQuantizer) -> Observer:
        """A fresh observer for ``quantizer``."""
        raise NotImplementedError

    def calibrate(self, qmodel: QuantizedModel, data: CalibrationData) -> CalibrationResult:
        import time

        start = time.perf_counter()
        observers = observe(qmodel, data, self.make_observer)
        for name, obs in observers.items():
            if obs.count == 0:
                raise QuantizationError(f"quantizer {name!r} saw no activations on the calibration data; "
                                        "it is not on the forward path of the calibration batches (skip it in the model config)")
            rng = obs.clip_range()
            if isinstance(rng, tuple):
                obs.quantizer.set_clip_range(*rng)
            else:
                obs.quantizer.set_clip_range(rng)
        return CalibrationResult(seconds=time.perf_counter() - start, forward_passes=1)


def observe(qmodel: QuantizedModel, data: CalibrationData, make_observer: Callable[[UniformQuantizer], Observer]) -> dict[str, Observer]:
    """Run the calibration set once with activation quantization off, feeding one observer per quantizer."""
    quantizers = qmodel.activation_quantizers
    observers = {name: make_observer(q) for name, q in quantizers.items()}
    states = {name: q.enabled for name, q in quantizers.items()}
    try:
        for name, q in quantizers.items():
            q.observer, q.enabled = observers[name], False
        with torch.no_grad():
            for batch in data.batches:
                data.forward(qmodel, batch)
    finally:
        for name, q in quantizers.items():
            q.observer, q.enabled = None, states[name]
    return observers


class _MinObserver(Observer):
    """Running minimum of a quantizer's input."""

    def __init__(self, quantizer: UniformQuantizer) -> None:
        super().__init__(quantizer)
        self.min = float("inf")

    def update(self, x: torch.Tensor) -> None:
        self.min = min(self.min, float(x.min()))


def use_unsigned_for_nonnegative(qmodel: QuantizedModel, data: CalibrationData) -> list[str]:
    """Give every symmetric activation quantizer whose calibration input is never negative an unsigned grid.

    Softmax probabilities (the ``softmax @ V`` operand) and ReLU outputs are non-negative; a signed
    grid wastes half its levels on them (at 4 bits: 8 levels instead of 16). One FP pass over the
    calibration data records each input's minimum; quantizers with minimum >= 0 switch to
    ``[0, 2^b - 1]`` (zero point 0), before any calibrator runs, so every calibrator sees the same
    grids. Returns the names of the switched quantizers.
    """
    observers = observe(qmodel, data, _MinObserver)
    switched = [name for name, obs in observers.items()
                if obs.count and obs.min >= 0 and obs.quantizer.symmetric and obs.quantizer.signed]
    for name in switched:
        observers[name].quantizer.set_signed(False)
    return switched
