"""Tasks on the hub data sets (the paper's rows; need internet), reusing the offline task classes.

Each class subclasses an offline task and only changes where the data comes from
(:mod:`esc.data.hub` loaders); metrics, batching and calibration losses are the offline tasks':

* :class:`HubKeywordSpottingTask` (:class:`esc.tasks.kws.KeywordSpottingTask`): Speech Commands
  v0.02; test = ``test_split``, calibration pool = ``train_max_samples`` clips of ``train_split``.
* :class:`HubTaggingTask` (:class:`esc.tasks.tagging.AudioTaggingTask`): ESC-50 folds mapped to
  AudioSet names (zero-shot tagging with an AudioSet model): test = ``test_folds``, calibration =
  ``calibration_folds``.
* :class:`HubASRTask` (:class:`esc.tasks.asr.ASRTask`, Whisper decoding): LibriSpeech ``config``
  (``clean``/``other``) ``test``; calibration pool = ``train_max_samples`` utterances of
  ``train_split`` (default ``validation`` = dev-clean/dev-other: the training splits are 6-30 GB
  downloads; set ``train_split: train.100`` (config ``clean``; ``train.500`` for ``other``) for the paper's "training split").
* :class:`CTCASRTask` (any :class:`esc.tasks.asr.ASRTask` data; CTC models) and
  :class:`HubCTCASRTask` (LibriSpeech + CTC): greedy CTC decoding through
  ``bundle.extras["decode"]`` (:class:`esc.models.ctc_decoder.CTCGreedyDecoder`), the same WER/CER,
  normaliser and per-sample counts as the Whisper task. Calibration loss: per-utterance CTC loss
  (``torch.nn.functional.ctc_loss``, blank = ``extras["blank_id"]``, ``zero_infinity=True``)
  of the model's log-softmax against the FP32 model's greedy CTC labels (pseudo-labels, computed
  once per clip), divided by the label length (at least 1): the CTC analogue of the Whisper task's
  teacher-forced cross entropy.

The KWS and tagging tasks load their data through their ``load_splits()`` hook, which the hub
variants override. ``skip_bad_files=True`` leaves undecodable rows out (each logged; their messages
in ``skipped_files``, their count in the row) instead of stopping the run. Each hub task's
``revisions`` holds, once prepared, the commit of every hub data
set it read (result rows record it next to the model's).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.data import hub as hubdata
from esc.core.bundle import ModelBundle
from esc.core.errors import UserError
from esc.tasks.asr import ASRTask, _pad
from esc.tasks.kws import KeywordSpottingTask
from esc.tasks.tagging import AudioTaggingTask

log = logging.getLogger(__name__)


class HubData:
    """Mixin of the hub tasks: their data hashes are known only once prepared (hashing a hub data set means
    downloading and decoding it), so a finished row is not checked against the current data; its
    ``revisions`` pin the data set instead."""

    def load_data_hashes(self) -> None:
        """``None``: see the class docstring."""
        return None


# ------------------------------------------------------------------------------ KWS
class HubKeywordSpottingTask(HubData, KeywordSpottingTask):
    """Keyword spotting on Speech Commands (hub or a local copy); everything else as :class:`KeywordSpottingTask`.

    Args:
        path / config / revision / cache_dir: the data set (``google/speech_commands``, ``v0.02``).
        test_split / train_split: evaluation split and calibration pool split.
        max_test_clips: seeded random subset of the test split (``None``: all of it).
        train_max_samples: size of the calibration pool drawn from ``train_split``.
        words: label names kept (default the 35 words; ``_silence_`` rows are dropped).
        subset_seed: seed of both subsets.
        eval_batch_size / calibration_batch_size / progress: as the offline task.
        name: task name in result rows.
    """

    def __init__(self, path: str = "google/speech_commands", config: Optional[str] = "v0.02", test_split: str = "test",
                 train_split: str = "train", max_test_clips: Optional[int] = None, train_max_samples: Optional[int] = 1000,
                 words: Optional[Sequence[str]] = None, subset_seed: int = 0, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, eval_batch_size: int = 64, calibration_batch_size: int = 32,
                 progress: bool = True, skip_bad_files: bool = False, name: str = "speechcommands") -> None:
        self.name = name
        super().__init__(eval_batch_size=eval_batch_size, calibration_batch_size=calibration_batch_size,
                         max_test_clips=None, subset_seed=subset_seed, generate=False, progress=progress)
        self.revisions: dict[str, str] = {}
        self.skipped_files: list[str] = []
        self.source = dict(path=path, name=config, revision=revision, cache_dir=cache_dir, words=words,
                           seed=subset_seed, progress=progress, revisions=self.revisions,
                           skipped=self.skipped_files if skip_bad_files else None)
        self.test_split, self.train_split = test_split, train_split
        self.hub_max_test, self.train_max_samples = max_test_clips, train_max_samples

    def load_splits(self) -> dict:
        """``{"train", "test"}`` :class:`esc.data.kws.KWSSplit` from :func:`esc.data.hub.load_speech_commands`."""
        return {"test": hubdata.load_speech_commands(split=self.test_split, max_samples=self.hub_max_test, **self.source),
                "train": hubdata.load_speech_commands(split=self.train_split, max_samples=self.train_max_samples, **self.source)}


# ------------------------------------------------------------------------------ tagging
class HubTaggingTask(HubData, AudioTaggingTask):
    """Zero-shot AudioSet tagging of ESC-50 (ESC-50 categories mapped to AudioSet names); metric and loss as :class:`AudioTaggingTask`.

    Args:
        path / split / revision / cache_dir: the data set (``ashraq/esc50``, one ``train`` split with a ``fold`` column).
        test_folds / calibration_folds: folds of the test and calibration sets (disjoint).
        class_map: ESC-50 category -> AudioSet display name (default :data:`esc.data.hub.ESC50_TO_AUDIOSET`).
        max_test_clips / calibration_clips: seeded subsets (``None``: all clips of those folds).
        clip_samples: clip length at 16 kHz (ESC-50: 5 s = 80000).
        batch_size / loss / cache_fp32: as :class:`AudioTaggingTask`; ``data_dir`` holds its FP32-score cache.
        name: task name in result rows.
    """

    def __init__(self, path: str = "ashraq/esc50", split: str = "train", test_folds: Sequence[int] = (1, 2, 3, 4),
                 calibration_folds: Sequence[int] = (5,), class_map: Optional[dict] = None,
                 max_test_clips: Optional[int] = None, calibration_clips: Optional[int] = 200, subset_seed: int = 0,
                 clip_samples: int = 80000, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                 batch_size: int = 16, loss: str = "fp32", data_dir: str = "data/esc50", cache_fp32: bool = True,
                 progress: bool = True, skip_bad_files: bool = False, name: str = "esc50") -> None:
        self.name = name
        if set(test_folds) & set(calibration_folds):
            raise ValueError(f"test_folds {list(test_folds)} and calibration_folds {list(calibration_folds)} overlap; make them disjoint")
        class_map = dict(hubdata.ESC50_TO_AUDIOSET if class_map is None else class_map)
        classes = tuple(dict.fromkeys(class_map.values()))
        super().__init__(data_dir=data_dir, num_clips=max_test_clips or 1, calibration_clips=calibration_clips or 1,
                         classes=classes, clip_samples=clip_samples, mixture_fraction=0.0, batch_size=batch_size, loss=loss,
                         cache_fp32=cache_fp32)
        self.revisions: dict[str, str] = {}
        self.skipped_files: list[str] = []
        self.source = dict(path=path, split=split, class_map=class_map, seed=subset_seed, clip_samples=clip_samples,
                           revision=revision, cache_dir=cache_dir, progress=progress, revisions=self.revisions,
                           skipped=self.skipped_files if skip_bad_files else None)
        self.test_folds, self.calibration_folds = tuple(test_folds), tuple(calibration_folds)
        self.hub_max_test, self.hub_calibration = max_test_clips, calibration_clips

    def load_splits(self) -> dict:
        """``{"test", "calibration"}`` :class:`esc.data.tagging.TaggingSet` from :func:`esc.data.hub.load_esc50`."""
        return {"test": hubdata.load_esc50(folds=self.test_folds, max_samples=self.hub_max_test, **self.source),
                "calibration": hubdata.load_esc50(folds=self.calibration_folds, max_samples=self.hub_calibration, **self.source)}


# ------------------------------------------------------------------------------ ASR
class HubASRTask(HubData, ASRTask):
    """Whisper ASR on LibriSpeech (``config`` = ``clean`` / ``other``); metrics as :class:`ASRTask`.

    Args:
        path / config / revision / cache_dir: the data set (``openslr/librispeech_asr``).
        test_split: ``test`` (test-clean / test-other); max_test_clips: seeded subset (``None``: all).
        train_split / train_max_samples: the calibration pool (default 200 utterances of ``validation``).
        subset_seed: seed of both subsets. name: task name in result rows (default ``librispeech_<config>``).
        Other keyword arguments go to :class:`ASRTask`
        (``eval_batch_size``, ``calibration_batch_size``, ``max_new_tokens``, ``spelling_map``, ``progress``,
        ``fitness_loss``, ``eos_margin``, ``eos_weight``).
    """

    def __init__(self, path: str = "openslr/librispeech_asr", config: Optional[str] = "clean", test_split: str = "test",
                 max_test_clips: Optional[int] = None, train_split: str = "validation",
                 train_max_samples: Optional[int] = 200, subset_seed: int = 0, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, skip_bad_files: bool = False, name: Optional[str] = None, **kwargs) -> None:
        self.name = name or f"librispeech_{config or 'asr'}"
        super().__init__(data_dir=None, voices=(), **kwargs)
        self.revisions: dict[str, str] = {}
        self.skipped_files: list[str] = []
        self.source = dict(path=path, name=config, revision=revision, cache_dir=cache_dir, seed=subset_seed,
                           progress=self.progress, revisions=self.revisions,
                           skipped=self.skipped_files if skip_bad_files else None)
        self.hub_splits = {"test": (test_split, max_test_clips), "train": (train_split, train_max_samples)}

    def _split(self, split: str):
        """The ``test`` / ``train`` clips from :func:`esc.data.hub.load_librispeech` (``clips=`` given to the constructor wins)."""
        if self.given_clips is not None:
            return super()._split(split)
        name, n = self.hub_splits[split]
        return hubdata.load_librispeech(split=name, max_samples=n, **self.source)


class CTCFeatures:
    """Front-end features of a clip list in padded batches (clips sorted by length to limit padding).

    ``batches[k]`` = ``(features, output_lengths, clip_indices)``; ``len()`` = number of clips.
    """

    def __init__(self, bundle: ModelBundle, waves: Sequence[np.ndarray], batch_size: int) -> None:
        order = np.argsort([-len(w) for w in waves], kind="stable")
        out_len = bundle.extras["output_lengths"]
        self.batches = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            feats = bundle.frontend(_pad([waves[i] for i in idx]))
            self.batches.append((feats, out_len([len(waves[i]) for i in idx]), idx))
        self.n = len(waves)

    def __len__(self) -> int:
        return self.n


def ctc_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """CTC logits ``[B, frames, vocab]`` of ``model`` on a calibration batch's ``features``."""
    return model(batch["features"])


class CTCPseudoLabelLoss:
    """Per-sample CTC loss of ``outputs`` against ``batch["targets"]``, divided by the target length (>= 1)."""

    def __init__(self, blank_id: int) -> None:
        self.blank_id = int(blank_id)

    def __call__(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        logp = outputs.float().log_softmax(-1).transpose(0, 1)  # [T, B, V]
        tl = batch["target_lengths"]
        loss = F.ctc_loss(logp, batch["targets"], batch["output_lengths"], tl, blank=self.blank_id,
                          reduction="none", zero_infinity=True)
        return loss / tl.clamp(min=1).float()


class CTCASRTask(ASRTask):
    """ASR with a CTC model (``bundle.extras["decode"]``): data and metrics of :class:`ASRTask`, CTC decoding and loss.

    "Tokens" of a transcript are the collapsed CTC label ids (repeats merged, blanks removed); see
    the module docstring for the calibration loss (``fitness_loss`` must stay ``ce``: CTC has no end-of-text token).
    """

    @classmethod
    def check_options(cls, options) -> None:
        """:meth:`ASRTask.check_options`, and a :class:`~esc.core.errors.UserError` for any ``fitness_loss`` but ``ce``."""
        super().check_options(options)
        if options.get("fitness_loss", "ce") != "ce":
            raise UserError(f"task.fitness_loss={options['fitness_loss']!r} needs Whisper's end-of-text token, but this CTC "
                            "task calibrates with its CTC loss; leave task.fitness_loss=ce (for Whisper use "
                            "task._target_=esc.tasks.hub.HubASRTask)")

    def prepare(self, bundle: ModelBundle) -> None:
        """Load both splits and cache the test split's front-end features in padded batches."""
        for key in ("decode", "output_lengths", "blank_id"):
            if key not in bundle.extras:
                raise UserError(f"model {bundle.name!r} is not a CTC model (its bundle lacks extras[{key!r}]), but task "
                                f"{self.name} decodes with greedy CTC; for Whisper use task._target_=esc.tasks.hub.HubASRTask "
                                "(+pair=asr_whisper_clean / asr_whisper_other do)")
        self.bundle, self.extras = bundle, bundle.extras
        self.load_clips()
        self.test_features = CTCFeatures(bundle, [c.wave for c in self.test_clips], self.eval_batch_size)
        self.references = [self.normalizer(c.text) for c in self.test_clips]
        self._pseudo.clear()
        log.info("CTC ASR task: %d test clips, %d training clips", len(self.test_clips), len(self.train_clips))

    def collapse(self, logits: torch.Tensor, lengths: Sequence[int]) -> list[list[int]]:
        """Greedy CTC label sequences of ``logits`` ``[B, T, V]`` (first ``lengths`` frames)."""
        decoder = self.extras["decode"]
        return [decoder.collapse(row[: int(n)].tolist()) for row, n in zip(logits.argmax(-1).cpu(), lengths)]

    def transcribe(self, model: nn.Module, features: CTCFeatures) -> list[list[int]]:
        """Collapsed CTC label ids of every clip of ``features`` (in clip order)."""
        out: list = [None] * len(features)
        model.eval()
        with torch.no_grad():
            for feats, lengths, idx in features.batches:
                for i, seq in zip(idx, self.collapse(model(feats).float(), lengths)):
                    out[int(i)] = seq
        return out

    def decode_text(self, tokens: Sequence[int]) -> str:
        """Text of collapsed CTC ids (word delimiter -> space, special tokens dropped)."""
        return self.extras["decode"].text(tokens)

    def calibration_data(self, num_samples: int, seed: int) -> CalibrationData:
        """``num_samples`` training clips (drawn with ``seed``) with the FP32 model's CTC transcripts as targets."""
        if self.bundle is None:
            raise RuntimeError("call prepare(bundle) before calibration_data()")
        pool = len(self.train_clips)
        if not 0 < num_samples <= pool:
            raise ValueError(f"calibration.num_samples={num_samples} but the ASR training pool holds {pool} clips; "
                             "raise the task's training pool (num_train / train_max_samples)")
        idx = np.sort(np.random.default_rng(seed).choice(pool, size=num_samples, replace=False))
        waves = [self.train_clips[i].wave for i in idx]
        feats = CTCFeatures(self.bundle, waves, self.calibration_batch_size)
        batches = []
        with torch.no_grad():
            for f, lengths, local in feats.batches:
                todo = [k for k, i in enumerate(local) if int(idx[i]) not in self._pseudo]
                if todo:  # FP32 pseudo-labels, once per clip
                    labels = self.collapse(self.bundle.model(f).float(), lengths)
                    for k in todo:
                        self._pseudo[int(idx[local[k]])] = labels[k]
                targets = [self._pseudo[int(idx[i])] for i in local]
                tl = torch.tensor([len(t) for t in targets], dtype=torch.long)
                padded = torch.zeros(len(targets), max(1, int(tl.max())), dtype=torch.long)
                for k, t in enumerate(targets):
                    padded[k, : len(t)] = torch.tensor(t, dtype=torch.long)
                batches.append({"features": f, "targets": padded, "target_lengths": tl,
                                "output_lengths": torch.as_tensor(lengths, dtype=torch.long)})
        return CalibrationData(batches, forward=ctc_forward, loss=CTCPseudoLabelLoss(self.extras["blank_id"]))


class HubCTCASRTask(CTCASRTask, HubASRTask):
    """CTC ASR on LibriSpeech: :class:`HubASRTask`'s data with :class:`CTCASRTask`'s decoding and loss."""
