"""Fitness of candidate activation-scale vectors: what ESC's global step minimises.

A *candidate* is one vector of activation scales ``[N]`` (one per activation quantizer of a
:class:`~esc.quant.model.QuantizedModel`, in ``qmodel.activation_quantizers`` order). Its fitness
is a mean over the calibration samples of a per-sample error of the quantized model's outputs
(lower is better). Kinds (:data:`FITNESS_KINDS`):

* ``"task"``: the per-sample task loss ``data.loss(outputs, batch)``, averaged over samples.
* ``"kl"``: ``KL(softmax(fp) || softmax(quantized))`` over the last dim of the outputs (logits),
  averaged over every other position of a sample (e.g. frames), then over samples.
* ``"mse"``: squared error to the FP outputs, averaged over the elements of a sample, then over
  samples (= the tensor MSE when all samples have the same shape).

"FP outputs" are those of the model with *every* quantizer (weights and activations) disabled,
i.e. the float model; they are computed once per :class:`FitnessEvaluator` and cached.

:class:`FitnessEvaluator` evaluates a population ``[P, N]`` of candidates either in ONE batched
pass over the calibration set (each batch repeated ``P`` times along dim 0 and the quantizers
holding ``[P]`` scales; see :mod:`esc.quant.quantizer`) or candidate by candidate
(``batched=False``, for models that cannot batch); both give the same values up to float rounding.
``max_batch`` splits the population into chunks of candidates, one forward per chunk and
calibration batch; ``max_batch="auto"`` picks the chunk size by timing the first population
(:func:`probe_chunks`, :func:`choose_chunk`).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from esc.calibrators.base import CalibrationData, batch_size, repeat_batch
from esc.quant.model import QuantizedModel
from esc.quant.quantizer import QuantizationError

log = logging.getLogger(__name__)

FITNESS_KINDS = ("task", "kl", "mse")
AUTO = "auto"


def probe_chunks(pop: int) -> list[int]:
    """How ``max_batch="auto"`` splits its first population of ``pop`` candidates: consecutive chunks of
    ``1, 2, 4, ...`` candidates, each capped by the candidates left (15 -> 1, 2, 4, 8; 6 -> 1, 2, 3)."""
    sizes, size = [], 1
    while sum(sizes) < pop:
        sizes.append(min(size, pop - sum(sizes)))
        size *= 2
    return sizes


def choose_chunk(measured: dict[int, tuple[float, int]]) -> int:
    """The chunk size (candidates per forward) with the least measured seconds per candidate.

    ``measured[c] = (seconds, candidates)`` summed over the chunks of size ``c`` that were timed;
    ties go to the smaller size. It must hold ``c = 1`` (as :func:`probe_chunks` always does), so
    the choice is never slower per candidate than one by one on the measured probe.
    """
    if 1 not in measured:
        raise QuantizationError("choose_chunk: the probe must time one-by-one evaluation (chunk size 1)")
    return min(measured, key=lambda c: (measured[c][0] / measured[c][1], c))


def _as_tensor(outputs: Any, kind: str) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise QuantizationError(f"fitness={kind!r} needs the forward to return one tensor (logits/features), got "
                                f"{type(outputs).__name__}; make data.forward return a tensor or use fitness='task'")
    return outputs


def kl_per_sample(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) || softmax(outputs))`` over the last dim, mean over other non-batch dims.

    ``outputs`` is ``[P, B, ...]`` (or ``[B, ...]``), ``reference`` is ``[B, ...]`` (broadcast over
    ``P``). Returns ``[P, B]`` (or ``[B]``).
    """
    log_q = F.log_softmax(outputs.float(), dim=-1)
    log_p = F.log_softmax(reference.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    lead = outputs.dim() - reference.dim() + 1  # 2 with a population dim, 1 without
    return kl.reshape(*kl.shape[:lead], -1).mean(-1)


def mse_per_sample(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared error to ``reference`` per sample: ``[P, B, ...]`` vs ``[B, ...]`` -> ``[P, B]``."""
    err = (outputs.float() - reference.float()).pow(2)
    lead = outputs.dim() - reference.dim() + 1
    return err.reshape(*err.shape[:lead], -1).mean(-1)


class FitnessEvaluator:
    """Callable: ``evaluator(scales [P, N]) -> fitness [P]`` (float64, lower is better).

    Args:
        qmodel: the quantized model whose activation scales are evaluated (its weight quantizers
            and enabled flags are used as they are).
        data: calibration data; ``data.loss`` is required for ``kind="task"``.
        kind: one of :data:`FITNESS_KINDS`.
        batched: one pass over the calibration set for the whole population (True) or one pass
            per candidate (False).
        max_batch: largest number of samples in one forward (population chunk size times
            calibration batch size); the population is split into chunks to respect it
            (``None``: no limit, the whole population in one forward per calibration batch).
            ``"auto"``: the first call with ``P >= 2`` candidates is the probe: it evaluates them in
            the consecutive chunks of :func:`probe_chunks` (one by one first), timing each chunk's
            forwards (not the one-off repeat of the calibration batches), and every later call uses
            the chunk size of :func:`choose_chunk` (``chunk``). The fitness of a candidate is what a
            fixed chunk size gives; kernels whose rounding depends on the batch size (e.g. CPU
            Conv2d) make that differ from one by one in the last bits, so results then depend on
            the chosen size (recorded in ``chunk``).
        clock: the timer of the ``"auto"`` probe (tests inject fake timings).

    Attributes:
        evaluations: candidates evaluated so far (each one is a full pass over the calibration set).
        forward_calls: model forward calls made so far (including the reference pass).
        seconds: wall time spent in evaluations so far (excluding the reference pass).
        forward_seconds: the part of ``seconds`` spent inside ``data.forward`` (the bare forwards).
        scale_floor: smallest scale handed to the quantizers (guards against ``0`` scales).
        chunk: with ``max_batch="auto"``, the chosen candidates per forward (``None`` until probed).
        probe: with ``max_batch="auto"``, the probe's seconds per candidate for each chunk size.
    """

    def __init__(self, qmodel: QuantizedModel, data: CalibrationData, kind: str = "task",
                 batched: bool = True, max_batch: Optional[Union[int, str]] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if kind not in FITNESS_KINDS:
            raise QuantizationError(f"unknown fitness {kind!r}; use one of {FITNESS_KINDS}")
        if kind == "task" and data.loss is None:
            raise QuantizationError("fitness='task' needs a per-sample task loss but CalibrationData.loss is None; "
                                    "give the task's loss or use fitness='kl' or 'mse'")
        if max_batch != AUTO and max_batch is not None and (isinstance(max_batch, (bool, str)) or max_batch < 1):
            raise QuantizationError(f"max_batch={max_batch!r} must be >= 1, None (no limit) or 'auto'")
        self.qmodel, self.data, self.kind = qmodel, data, kind
        self.batched, self.max_batch, self.clock = batched, max_batch, clock
        self.chunk: Optional[int] = None
        self.probe: dict[int, float] = {}
        self.quantizers = list(qmodel.activation_quantizers.values())
        self.num_samples = data.num_samples
        self.evaluations = 0
        self.forward_calls = 0
        self.seconds = 0.0
        self.forward_seconds = 0.0
        self._repeated: dict[int, list] = {}
        self.reference: Optional[list[torch.Tensor]] = None
        if kind in ("kl", "mse"):
            self.reference = self._reference_outputs()

    # ------------------------------------------------------------------------------ reference
    def _reference_outputs(self) -> list[torch.Tensor]:
        """FP outputs (every quantizer disabled) of each calibration batch, computed once."""
        all_q = [*self.qmodel.activation_quantizers.values(), *self.qmodel.weight_quantizers.values()]
        states = [q.enabled for q in all_q]
        try:
            for q in all_q:
                q.enabled = False
            with torch.no_grad():
                refs = [_as_tensor(self.data.forward(self.qmodel, b), self.kind).detach() for b in self.data.batches]
            self.forward_calls += len(self.data.batches)
        finally:
            for q, s in zip(all_q, states):
                q.enabled = s
        return refs

    # ------------------------------------------------------------------------------- fitness
    def per_sample(self, outputs: Any, batch: Any, index: int, pop: int) -> torch.Tensor:
        """Per-sample fitness ``[pop, B]`` of outputs for calibration batch ``index`` (repeated ``pop`` times)."""
        b = batch_size(self.data.batches[index])
        if self.kind == "task":
            loss = self.data.loss(outputs, batch)
            if loss.shape != (pop * b,):
                raise QuantizationError(f"data.loss returned shape {tuple(loss.shape)}, expected a per-sample loss "
                                        f"of shape ({pop * b},); make the task loss return one value per sample")
            return loss.detach().float().view(pop, b)
        out = _as_tensor(outputs, self.kind)
        out = out.reshape(pop, b, *out.shape[1:])
        ref = self.reference[index]
        return (kl_per_sample if self.kind == "kl" else mse_per_sample)(out, ref)

    def _batches(self, pop: int) -> list:
        """Calibration batches repeated ``pop`` times (cached for the last few population sizes)."""
        if pop == 1:
            return self.data.batches
        if pop not in self._repeated:
            if len(self._repeated) >= 2:
                self._repeated.pop(next(iter(self._repeated)))
            self._repeated[pop] = [repeat_batch(b, pop) for b in self.data.batches]
        return self._repeated[pop]

    def _run(self, scales: torch.Tensor) -> torch.Tensor:
        """Sum over samples of the per-sample fitness for a population ``[p, N]`` set at once -> ``[p]``."""
        pop = scales.shape[0]
        self._set_scales(scales if pop > 1 else scales[0])
        total = torch.zeros(pop, dtype=torch.float64)
        for i, batch in enumerate(self._batches(pop)):
            t0 = time.perf_counter()
            outputs = self.data.forward(self.qmodel, batch)
            self.forward_seconds += time.perf_counter() - t0
            total += self.per_sample(outputs, batch, i, pop).double().sum(1).cpu()
        self.forward_calls += len(self.data.batches)
        return total

    def _set_scales(self, scales: torch.Tensor) -> None:
        for i, q in enumerate(self.quantizers):
            q.set_scale(scales[..., i])

    def _chunk(self, pop: int) -> int:
        """Candidates per forward outside the probe: 1 unbatched, else by ``max_batch`` (``"auto"``: the
        probe's choice; the whole population until a probe ran)."""
        if not self.batched:
            return 1
        if self.max_batch == AUTO:
            return self.chunk or pop
        if self.max_batch is None:
            return pop
        return max(1, min(pop, self.max_batch // max(batch_size(b) for b in self.data.batches)))

    def __call__(self, scales: torch.Tensor) -> torch.Tensor:
        """Fitness ``[P]`` (float64) of candidate scale vectors ``scales`` (``[P, N]`` or ``[N]``)."""
        if isinstance(scales, torch.Tensor) and type(scales) is not torch.Tensor:
            scales = scales.as_subclass(torch.Tensor)  # e.g. evotorch's read-only tensors
        scales = torch.as_tensor(scales, dtype=torch.float32).detach()
        if scales.dim() == 1:
            scales = scales[None]
        if scales.dim() != 2 or scales.shape[1] != len(self.quantizers):
            raise QuantizationError(f"candidate scales have shape {tuple(scales.shape)}; expected [P, {len(self.quantizers)}] "
                                    "(one scale per activation quantizer)")
        pop = scales.shape[0]
        probing = self.batched and self.max_batch == AUTO and self.chunk is None and pop > 1
        sizes = probe_chunks(pop) if probing else [min(pop, self._chunk(pop))] * -(-pop // self._chunk(pop))
        sizes[-1] = pop - sum(sizes[:-1])
        start_time = time.perf_counter()
        out = torch.empty(pop, dtype=torch.float64)
        measured: dict[int, tuple[float, int]] = {}
        start = 0
        with torch.no_grad():
            for size in sizes:
                self._batches(size)  # the repeated batches are built once, outside the probe's timing
                t0 = self.clock()
                out[start:start + size] = self._run(scales[start:start + size])
                seconds, count = measured.get(size, (0.0, 0))
                measured[size] = (seconds + self.clock() - t0, count + size)
                start += size
        if probing:
            self.chunk = choose_chunk(measured)
            self.probe = {c: t / n for c, (t, n) in sorted(measured.items())}
            log.info("fitness: population chunks of %d candidates (probe, seconds per candidate: %s)", self.chunk,
                     ", ".join(f"{c}: {t:.3g}" for c, t in self.probe.items()))
        self.evaluations += pop
        out /= self.num_samples
        self.seconds += time.perf_counter() - start_time
        if torch.isnan(out).any():
            log.warning("fitness: %d of %d candidates gave NaN (scored inf, so the search discards them)",
                        int(torch.isnan(out).sum()), pop)
        return torch.nan_to_num(out, nan=float("inf"))
