"""ESC fitness losses of the Whisper ASR task (``task.fitness_loss``), on teacher-forced decoder logits.

Both are per-sample losses ``[B]`` of the logits ``[B, L, vocab]`` of a batch made by
:func:`esc.tasks.whisper_decoding.teacher_forcing_batch` (``labels`` = the FP32 model's transcript + ``[eos]``,
``-100`` elsewhere):

* ``ce`` (default; :func:`token_cross_entropy`): the mean token cross entropy over the labelled
  positions.
* ``ce_eos_margin`` (:class:`EOSMarginLoss`): ``ce + eos_weight * relu(eos_margin - m)`` with the
  end-of-text margin ``m = z[eos] - max_{v != eos, v not in suppress_ids} z[v]`` of the logits
  ``z`` at the one position whose label is ``eos`` (:func:`eos_margins`).

Why the second one (ours; not from the ESC paper): a quantized Whisper can fall into decoding
loops, repeating a phrase up to the token cap, because at the position where the transcript ends
the end-of-text token no longer wins greedy decoding's argmax. Measured in this project on one clip
at W8A8: the teacher-forced margin there was -0.26 against +2.1 in FP32, while the teacher-forced
cross entropy was even lower than that of a model that did not loop; one token's probability,
averaged with every other token of the transcript, barely moves the mean, so the ``ce`` fitness
cannot see the flip. The hinge scores exactly that argmax: it is zero once EOS wins by
``eos_margin`` logits and grows linearly as it falls behind. Rivals are the tokens greedy decoding
can pick (``suppress_ids``, set to -inf there, are left out; the begin-suppression of the first
step is not applied: the EOS label sits there only for an empty transcript, which Whisper's first
step, suppressing EOS, never yields). Labels whose transcript hit the decoding cap still end with
``eos`` (appended by the batch), so there the hinge asks for an end the FP32 model did not make.
Only the stated hinge is used: EOS firing too early (truncation) is not penalised separately.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from esc.core.errors import UserError

IGNORE = -100
#: ``task.fitness_loss`` values: teacher-forced token cross entropy, alone or plus the end-of-text margin hinge.
FITNESS_LOSSES = ("ce", "ce_eos_margin")


def token_cross_entropy(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-sample mean cross entropy ``[B]`` of ``logits`` against ``batch["labels"]`` (-100 ignored)."""
    labels = batch["labels"]
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    mask = (labels != IGNORE).float()
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def eos_margins(logits: torch.Tensor, labels: torch.Tensor, eos_id: int, suppress_ids: Sequence[int] = ()) -> torch.Tensor:
    """End-of-text margin ``[B]``: ``z[eos] - max`` over the other non-suppressed tokens of the logits
    ``z`` at each row's one position whose label is ``eos_id`` (positive: greedy decoding stops there)."""
    hits = labels == eos_id
    if not bool((hits.sum(1) == 1).all()):
        raise ValueError(f"every row of labels must hold eos_id={eos_id} exactly once (teacher_forcing_batch appends it)")
    z = logits[torch.arange(len(labels)), hits.long().argmax(1)].float()
    rivals = z.clone()
    rivals[:, [eos_id, *suppress_ids]] = -float("inf")
    return z[:, eos_id] - rivals.max(-1).values


class EOSMarginLoss:
    """``ce_eos_margin``: per-sample ``token_cross_entropy + eos_weight * relu(eos_margin - eos_margins(...))``.

    See the module docstring for the definition and why (decoding loops); ``eos_id`` and
    ``suppress_ids`` are the model's (``bundle.extras``), ``eos_margin`` and ``eos_weight`` the task's.
    """

    def __init__(self, eos_id: int, eos_margin: float, eos_weight: float, suppress_ids: Sequence[int] = ()) -> None:
        self.eos_id, self.eos_margin, self.eos_weight = int(eos_id), float(eos_margin), float(eos_weight)
        self.suppress_ids = [int(i) for i in suppress_ids]

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        margin = eos_margins(logits, batch["labels"], self.eos_id, self.suppress_ids)
        return token_cross_entropy(logits, batch) + self.eos_weight * F.relu(self.eos_margin - margin)


def check_fitness_options(options: Mapping[str, Any]) -> None:
    """Raise a :class:`~esc.core.errors.UserError` naming a bad ``fitness_loss`` (not in :data:`FITNESS_LOSSES`),
    ``eos_margin`` (not a finite number) or ``eos_weight`` (not a finite number >= 0) among ``options``
    (a task config; absent keys keep the task's defaults and are not checked)."""
    kind = options.get("fitness_loss", FITNESS_LOSSES[0])
    if kind not in FITNESS_LOSSES:
        raise UserError(f"task.fitness_loss={kind!r} must be one of {FITNESS_LOSSES} (ce: teacher-forced token cross "
                        "entropy; ce_eos_margin: plus the end-of-text margin hinge)")
    for name, low, what in (("eos_margin", -math.inf, "a finite number (the end-of-text logit margin the hinge asks for)"),
                            ("eos_weight", 0.0, "a finite number >= 0 (the weight of the end-of-text margin hinge)")):
        if name not in options:
            continue
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise UserError(f"task.{name}={value!r} must be {what}")


def fitness_loss(kind: str, eos_id: int, eos_margin: float, eos_weight: float,
                 suppress_ids: Sequence[int] = ()) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    """The per-sample loss of ``task.fitness_loss=kind``: :func:`token_cross_entropy` itself for ``ce``,
    an :class:`EOSMarginLoss` for ``ce_eos_margin``."""
    check_fitness_options({"fitness_loss": kind, "eos_margin": eos_margin, "eos_weight": eos_weight})
    if kind == "ce":
        return token_cross_entropy
    return EOSMarginLoss(eos_id, eos_margin, eos_weight, suppress_ids)
