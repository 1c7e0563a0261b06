"""The Whisper ASR task's ESC fitness losses (``task.fitness_loss``): the end-of-text margin hinge by hand,
its blindness-fixing property (the decoding-loop case), the ``ce`` default, config, row keys, validation."""
from __future__ import annotations

import copy
import math
import re

import pandas as pd
import pytest
import torch

from esc.analysis.fitness_link import main as fitness_link_main
from esc.config import compose
from esc.core.errors import UserError
from esc.pipeline import prepare, run_axes, validate
from esc.results import run_key
from esc.tasks.asr import ASRTask
from esc.tasks.asr_fitness import EOSMarginLoss, eos_margins, token_cross_entropy

torch.set_num_threads(1)
EOS = 3
TINY = ["model=whisper_tiny_random", "task=asr_tiny"]
NEW_KEYS = ("fitness_loss", "eos_margin", "eos_weight")


def test_eos_margin_and_hinge_known_answer():
    logits = torch.zeros(2, 4, 5)
    labels = torch.tensor([[-100, 1, EOS, -100], [-100, 2, 0, EOS]])
    logits[0, 2] = torch.tensor([0.5, 1.0, 0.2, 1.5, 9.0])  # eos 1.5; best rival 1.0 once token 4 is suppressed
    logits[1, 3] = torch.tensor([2.0, 0.0, 0.0, 1.0, 0.0])  # eos 1.0; best rival 2.0
    logits[1, 2, EOS] = 5.0  # eos at a position whose label is not eos: not the margin's position
    assert eos_margins(logits, labels, EOS, suppress_ids=[4]).tolist() == pytest.approx([0.5, -1.0])
    assert eos_margins(logits, labels, EOS)[0] == pytest.approx(1.5 - 9.0)  # greedy decoding could pick token 4
    batch = {"labels": labels}
    loss = EOSMarginLoss(EOS, eos_margin=1.0, eos_weight=2.0, suppress_ids=[4])(logits, batch)
    # by hand: 2 * relu(1 - 0.5) = 1 and 2 * relu(1 - (-1)) = 4 on top of the token cross entropy
    assert (loss - token_cross_entropy(logits, batch)).tolist() == pytest.approx([1.0, 4.0], abs=1e-6)
    with pytest.raises(ValueError, match="exactly once"):
        eos_margins(logits, torch.tensor([[-100, 1, 2, -100], [-100, 2, 0, EOS]]), EOS)


def test_hinge_is_zero_once_eos_wins_by_the_margin():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, EOS, -100, -100], [4, EOS, -100, -100, -100], [0, 5, 6, 1, EOS]])
    for row, pos in enumerate([2, 1, 4]):
        rivals = logits[row, pos].clone()
        rivals[EOS] = -float("inf")
        logits[row, pos, EOS] = rivals.max() + 1.5  # margin 1.5 > eos_margin 1.0
    batch = {"labels": labels}
    assert eos_margins(logits, labels, EOS).tolist() == pytest.approx([1.5] * 3)
    assert torch.equal(EOSMarginLoss(EOS, 1.0, 5.0)(logits, batch), token_cross_entropy(logits, batch))
    assert (EOSMarginLoss(EOS, 2.0, 5.0)(logits, batch) > token_cross_entropy(logits, batch)).all()  # 1.5 < 2.0


def _transcript_logits(word_logit: float, eos_logit: float, rival_logit: float) -> torch.Tensor:
    """Logits of the transcript ``[1, 2] + [eos]``: each word at ``word_logit``, then eos against token 0."""
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = logits[0, 1, 2] = word_logit
    logits[0, 2, EOS], logits[0, 2, 0] = eos_logit, rival_logit
    return logits


def test_eos_losing_at_the_end_scores_worse_though_cross_entropy_cannot_tell():
    """The loop mechanism: where the transcript ends, token 0 (a repeat) beats eos, so greedy decoding goes on."""
    batch = {"labels": torch.tensor([[1, 2, EOS]])}
    loss = EOSMarginLoss(EOS, eos_margin=1.0, eos_weight=1.0)
    stops = _transcript_logits(3.0, eos_logit=2.0, rival_logit=1.9)
    swapped = _transcript_logits(3.0, eos_logit=1.9, rival_logit=2.0)  # eos and its rival swapped: a loop
    confident = _transcript_logits(4.0, eos_logit=1.9, rival_logit=2.0)  # that loop with more confident words
    ce = {name: float(token_cross_entropy(x, batch)) for name, x in [("stops", stops), ("swapped", swapped), ("confident", confident)]}
    assert stops[0, 2].argmax() == EOS and swapped[0, 2].argmax() == confident[0, 2].argmax() == 0
    assert abs(ce["swapped"] - ce["stops"]) < 0.04  # by hand: 0.100 at one of three positions
    assert ce["confident"] < ce["stops"]  # as measured on Whisper W8A8: the looping model has the lower cross entropy
    for loops in (swapped, confident):  # hinge 1.1 against 0.9 outweighs both differences
        assert float(loss(loops, batch)) > float(loss(stops, batch)) + 0.1


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """``{fitness_loss: (bundle, task)}`` of the composed tiny random Whisper on ``asr_tiny``."""
    data = tmp_path_factory.mktemp("data")
    out = {}
    for extra in ([], ["task.fitness_loss=ce_eos_margin", "task.eos_weight=2.0", "task.eos_margin=0.5"]):
        cfg = compose([*TINY, *extra, f"paths.data={data}"])
        validate(cfg)
        out[cfg.task.fitness_loss] = prepare(cfg)
    return out


def test_ce_default_is_todays_token_cross_entropy(tiny_whisper):
    bundle, task = tiny_whisper["ce"]
    data = task.calibration_data(4, seed=0)
    assert data.loss is token_cross_entropy
    b = data.batches[0]
    with torch.no_grad():
        logits = data.forward(bundle.model, b)
    assert torch.equal(data.loss(logits, b), token_cross_entropy(logits, b))


def test_option_composes_through_hydra_to_the_calibration_loss(tiny_whisper):
    bundle, task = tiny_whisper["ce_eos_margin"]
    data = task.calibration_data(4, seed=0)
    ex = bundle.extras
    assert isinstance(data.loss, EOSMarginLoss)
    assert (data.loss.eos_id, data.loss.eos_margin, data.loss.eos_weight, data.loss.suppress_ids) == \
        (ex["eos_id"], 0.5, 2.0, list(ex["suppress_ids"]))
    for b in data.batches:
        with torch.no_grad():
            logits = data.forward(bundle.model, b)
        hinge = 2.0 * torch.relu(0.5 - eos_margins(logits, b["labels"], ex["eos_id"], ex["suppress_ids"]))
        torch.testing.assert_close(data.loss(logits, b), token_cross_entropy(logits, b) + hinge)


@pytest.mark.parametrize("task", ["asr", "asr_tiny", "librispeech_clean"])
def test_new_options_at_their_defaults_leave_row_keys_unchanged(task):
    axes = run_axes(compose([f"task={task}", "calibrator=esc"]))
    before = copy.deepcopy(axes)  # the axes as rows made before the options existed hold them
    for key in NEW_KEYS:
        del before["task"][key]
    assert run_key(axes) == run_key(before)
    for override in ("task.fitness_loss=ce_eos_margin", "task.eos_weight=2.0", "task.eos_margin=0.5"):
        assert run_key(run_axes(compose([f"task={task}", "calibrator=esc", override]))) != run_key(axes), override


@pytest.mark.parametrize("overrides,message", [
    ([*TINY, "task.fitness_loss=bogus"], "task.fitness_loss='bogus' must be one of ('ce', 'ce_eos_margin')"),
    ([*TINY, "task.eos_weight=-1"], "task.eos_weight=-1 must be a finite number >= 0"),
    ([*TINY, "task.eos_margin=nan"], "task.eos_margin=nan must be a finite number"),
    (["task=librispeech_clean", "task.fitness_loss=ce_eos_margin"], "task.fitness_loss='ce_eos_margin' needs Whisper's end-of-text token"),
])
def test_bad_fitness_options_stop_validation_with_one_sentence(overrides, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        validate(compose(overrides))


def test_good_fitness_options_pass_validation_and_the_constructor_checks_too():
    validate(compose(["+pair=asr_whisper_clean", "task.fitness_loss=ce_eos_margin", "task.eos_weight=0"]))
    with pytest.raises(UserError, match="task.fitness_loss='margin' must be one of"):
        ASRTask(clips={}, fitness_loss="margin", progress=False)


def test_fitness_link_reads_the_eos_margin_fitness(tmp_path):
    """Same scales, same WER and KL/MSE; only the task fitness column gains the (non-negative) hinge."""
    frames = {}
    for loss in ("ce", "ce_eos_margin"):
        out = tmp_path / loss
        fitness_link_main(["--out", str(out), "--per-sigma", "1", "--sigmas", "0.3,0.6", *TINY, f"task.fitness_loss={loss}",
                           "precision=w8a8", "calibrator=minmax", "calibration.num_samples=4", "calibration.batch_size=2",
                           f"paths.cache={tmp_path}/cache", f"paths.data={tmp_path}/data"])
        frames[loss] = pd.read_csv(out.with_suffix(".csv"))
    ce, eos = frames["ce"], frames["ce_eos_margin"]
    assert len(ce) == 3 and all(math.isfinite(v) for v in eos["fitness_task"])
    pd.testing.assert_frame_equal(ce.drop(columns="fitness_task"), eos.drop(columns="fitness_task"))
    assert (eos["fitness_task"] > ce["fitness_task"]).all()  # the random model's eos never wins where its transcripts end
