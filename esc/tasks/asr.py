"""Speech recognition with Whisper: WER/CER of greedy transcripts; teacher-forced calibration loss.

Data (:mod:`esc.data.asr`): synthesised English sentences with reference transcripts, one test
split and one training (calibration) split per voice, with different sentence seeds.

Evaluation: greedy decoding from Whisper's prompt ``bundle.extras["prompt_ids"]``; at every step
the ``suppress_ids`` logits are set to -inf, and at the first step also ``suppress_ids_begin``
(as CTranslate2 does); decoding stops at ``eos_id`` or after ``max_new_tokens`` tokens.
Hypotheses and references go through Whisper's ``EnglishTextNormalizer`` (transformers) before
jiwer counts errors. ``WER = sum(word edits) / sum(reference words)`` over the test clips (the
corpus-level WER, as jiwer computes it on a list); CER likewise on characters. Also reported:
``WER_<voice>`` / ``CER_<voice>`` per voice, and ``per_sample`` edit and length counts (plus the
hypotheses) for the paired bootstrap. Decoding loops of a quantized model (a phrase repeated up to
the token cap) can dominate corpus WER, so :func:`loop_metrics` adds ``looping`` (hypotheses at least
``LOOP_FACTOR`` times as long as their reference, in words), ``WER_median`` (median per-utterance
WER) and ``WER_no_loops`` (corpus WER over the other utterances); loops are reported, never hidden.

Calibration (:meth:`ASRTask.calibration_data`): the FP32 model's own greedy transcripts of the
calibration clips are the targets (pseudo-labels, computed once per clip and cached). A batch is
``{"input_features", "decoder_input_ids", "labels"}``: ``decoder_input_ids`` = prompt +
transcript (right-padded with ``eos_id``), ``labels`` the next token at each position (-100 on
prompt positions before the first transcript token and on padding). The pseudo-labels are cached
on disk under ``<data_dir>/pseudo_labels/`` keyed by a hash of the model weights and the data. ``forward`` returns the
teacher-forced decoder logits ``[B, L, vocab]``; ``loss`` (``task.fitness_loss``) is the per-sample
mean token cross entropy against the labels (``ce``), or that plus a hinge on the end-of-text logit
margin where the transcript ends, which sees decoding loops (``ce_eos_margin``; :mod:`esc.tasks.asr_fitness`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.data.asr import DEFAULT_ESPEAK_VOICES, Clip, clips_hash, make_clips
from esc.core.bundle import ModelBundle
from esc.core.errors import UserError
from esc.tasks.asr_fitness import check_fitness_options, fitness_loss
from esc.tasks.base import Task, require_finite, subset_indices
from esc.tasks.whisper_decoding import greedy_decode, teacher_forced_logits, teacher_forcing_batch

log = logging.getLogger(__name__)


def english_normalizer(spelling_map: Optional[str | Path] = None):
    """transformers' Whisper ``EnglishTextNormalizer``.

    Its British -> American spelling map (``english.json`` / ``normalizer.json`` of the Whisper
    repositories) ships neither in transformers nor in the CTranslate2 wheels; give its path as
    ``spelling_map`` to use it. Without it the map is empty, which changes nothing for references
    written in American spelling (ours) unless Whisper itself outputs British spellings.
    """
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = json.loads(Path(spelling_map).read_text()) if spelling_map else {}
    return EnglishTextNormalizer(mapping)


#: A hypothesis at least this many times as long as its reference (in words) counts as a decoding loop.
LOOP_FACTOR = 2.0


def _pad(waves: Sequence[np.ndarray]) -> torch.Tensor:
    out = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
    for i, w in enumerate(waves):
        out[i, : len(w)] = w
    return torch.from_numpy(out)


class ASRTask(Task):
    """English ASR on synthesised speech (see the module docstring for every definition).

    Args:
        data_dir: cache of synthesised clips (``${paths.data}/asr``); ``None`` disables the cache.
        voices: test/train voices, ``"piper"`` and/or ``"espeak"``; the headline WER pools them.
        num_test: test clips per voice.
        num_train: training (calibration pool) clips per voice.
        test_seed / train_seed: sentence and synthesis seeds of the splits (distinct sentences).
        rates: speaking-rate factors drawn per clip; snr_db: SNRs drawn per clip (``null`` = clean).
        espeak_voices / espeak_pitches: eSpeak voice variants and pitches drawn per clip.
        eval_batch_size / calibration_batch_size: clips per batch.
        max_new_tokens: decoding bound (``None``: ``bundle.extras["max_new_tokens"]``).
        spelling_map: optional path of Whisper's ``english.json`` for the normaliser.
        fitness_loss / eos_margin / eos_weight: the calibration loss, ``"ce"`` or ``"ce_eos_margin"``, and
            the hinge's margin and weight (see :mod:`esc.tasks.asr_fitness`).
        clips: ``{"test": [Clip...], "train": [Clip...]}`` given directly (tests, own data): overrides the synthesised splits.
        max_test_clips / subset_seed: a fixed random subset of the test clips (``None``: all; ``data_hashes``
            name the whole split). Not in ``conf/task/asr.yaml``, so row keys stay: ``+task.max_test_clips=N``.
        progress: show tqdm bars.
        name: task name in result rows (default ``asr``).
    """

    name = "asr"
    metric = "WER"
    higher_is_better = False
    calibration_options = ("calibration_batch_size", "fitness_loss", "eos_margin", "eos_weight")

    def __init__(self, data_dir: Optional[str] = "data/asr", voices: Sequence[str] = ("piper", "espeak"),
                 num_test: int = 30, num_train: int = 32, test_seed: int = 1000, train_seed: int = 2000,
                 rates: Sequence[float] = (0.85, 1.0, 1.15), snr_db: Sequence[Optional[float]] = (None, 30.0, 20.0),
                 espeak_voices: Sequence[str] = DEFAULT_ESPEAK_VOICES, espeak_pitches: Sequence[int] = (35, 50, 65),
                 eval_batch_size: int = 8, calibration_batch_size: int = 8, max_new_tokens: Optional[int] = None,
                 spelling_map: Optional[str] = None, clips: Optional[dict] = None, progress: bool = True, name: Optional[str] = None,
                 fitness_loss: str = "ce", eos_margin: float = 1.0, eos_weight: float = 1.0, max_test_clips: Optional[int] = None,
                 subset_seed: int = 0) -> None:
        if name is not None:
            self.name = name
        self.check_options(dict(fitness_loss=fitness_loss, eos_margin=eos_margin, eos_weight=eos_weight))
        self.fitness = dict(kind=fitness_loss, eos_margin=float(eos_margin), eos_weight=float(eos_weight))
        self.data_dir = data_dir
        self.voices = list(voices)
        self.num_test, self.num_train = int(num_test), int(num_train)
        self.test_seed, self.train_seed = int(test_seed), int(train_seed)
        self.synth = dict(rates=tuple(rates), snr_db=tuple(snr_db), espeak_voices=tuple(espeak_voices),
                          espeak_pitches=tuple(espeak_pitches))
        self.eval_batch_size, self.calibration_batch_size = int(eval_batch_size), int(calibration_batch_size)
        self.max_new_tokens = max_new_tokens
        self.normalizer = english_normalizer(spelling_map)
        self.given_clips, self.max_test_clips, self.subset_seed = clips, max_test_clips, int(subset_seed)
        self.progress = progress
        self.bundle: Optional[ModelBundle] = None
        self._pseudo: dict[int, list[int]] = {}
        self._train_features: dict[int, torch.Tensor] = {}

    @classmethod
    def check_options(cls, options) -> None:
        """Raise a :class:`~esc.core.errors.UserError` for a bad ``fitness_loss`` / ``eos_margin`` / ``eos_weight``."""
        check_fitness_options(options)

    # ------------------------------------------------------------------------------- data
    def check_clips(self) -> None:
        """Raise a :class:`~esc.core.errors.UserError` naming the first test or training clip with NaN/Inf audio."""
        fix = (f"delete the synthesised clips under {self.data_dir} so they are made again, or replace that file "
               "of a folder or hub data set")
        require_finite([c.wave for c in self.test_clips], self.name, "test", fix)
        require_finite([c.wave for c in self.train_clips], self.name, "train", fix)

    def load_clips(self) -> None:
        """Load ``test_clips`` and ``train_clips`` (synthesised on first use), check them and set :attr:`data_hashes`."""
        self.test_clips, self.train_clips = self._split("test"), self._split("train")
        self.check_clips()
        self.data_hashes = {"test": clips_hash(self.test_clips), "train": clips_hash(self.train_clips)}

    def load_data_hashes(self) -> dict[str, str]:
        """``{"test", "train"}`` content hashes (:func:`esc.data.asr.clips_hash`) of the clips :meth:`load_clips` loads."""
        return {split: clips_hash(self._split(split)) for split in ("test", "train")}

    def _split(self, split: str) -> list[Clip]:
        if self.given_clips is not None:
            clips = list(self.given_clips.get(split, []))
            if not clips:
                raise ValueError(f"ASRTask(clips=...) has no {split!r} clips; give both 'test' and 'train'")
            return clips
        n, seed = (self.num_test, self.test_seed) if split == "test" else (self.num_train, self.train_seed)
        out: list[Clip] = []
        for voice in self.voices:
            out += make_clips(n, seed, voice, cache_dir=self.data_dir, progress=self.progress, **self.synth)
        return out

    def _features(self, clips: Sequence[Clip]) -> torch.Tensor:
        feats = []
        for s in range(0, len(clips), self.eval_batch_size):
            feats.append(self.bundle.frontend(_pad([c.wave for c in clips[s:s + self.eval_batch_size]])))
        return torch.cat(feats)

    def prepare(self, bundle: ModelBundle) -> None:
        """Synthesise (or load) both splits and cache the test split's front-end features."""
        for key in ("tokenizer", "prompt_ids", "eos_id"):
            if key not in bundle.extras:
                raise UserError(f"model {bundle.name!r} is not a Whisper-style model (its bundle lacks extras[{key!r}]), "
                                f"but task {self.name} decodes with Whisper's decoder; for a CTC model use "
                                "task._target_=esc.tasks.hub.HubCTCASRTask (the asr_wav2vec2_* / asr_conformer_* pairs do)")
        self.bundle, self.extras = bundle, bundle.extras
        self.load_clips()
        self.test_clips = [self.test_clips[i] for i in subset_indices(len(self.test_clips), self.max_test_clips, self.subset_seed)]
        self.test_features = self._features(self.test_clips)
        self.references = [self.normalizer(c.text) for c in self.test_clips]
        window = self.test_features.shape[-1] * 160  # samples per encoder window (hop 160 at 16 kHz)
        longer = sum(len(c.wave) > window for c in [*self.test_clips, *self.train_clips])
        if longer:
            log.warning("%d clips are longer than the %.1f s encoder window and are cut; raise the model's "
                        "encoder_frames", longer, window / 16000)
        self._pseudo.clear()
        self._train_features.clear()
        self._pseudo_key = None
        log.info("ASR task: %d test clips, %d training clips, voices %s", len(self.test_clips), len(self.train_clips),
                 sorted({c.voice for c in self.test_clips}))

    # ------------------------------------------------------------------------------- decoding
    @property
    def _max_new(self) -> int:
        n = self.max_new_tokens or self.extras.get("max_new_tokens", 96)
        limit = self.bundle.model.config.max_target_positions - len(self.extras["prompt_ids"]) if self.bundle else n
        return int(min(n, limit))

    def transcribe(self, model: nn.Module, features: torch.Tensor) -> list[list[int]]:
        """Greedy token transcripts of ``features`` (batched by ``eval_batch_size``)."""
        ex = self.extras
        out: list[list[int]] = []
        starts = range(0, len(features), self.eval_batch_size)
        if self.progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="transcribing", leave=False)
        model.eval()
        for s in starts:
            out += greedy_decode(model, features[s:s + self.eval_batch_size], ex["prompt_ids"], ex["eos_id"], self._max_new,
                                 ex.get("suppress_ids", ()), ex.get("suppress_ids_begin", ()))
        return out

    def decode_text(self, tokens: Sequence[int]) -> str:
        """Text of a token transcript (special tokens dropped)."""
        return self.extras["tokenizer"].decode(list(tokens), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------- metrics
    @staticmethod
    def edit_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, np.ndarray]:
        """Per-pair word/char edit counts and reference lengths (normalised text in, jiwer alignment)."""
        import jiwer

        we, rw, ce, rc = [], [], [], []
        for ref, hyp in zip(references, hypotheses):
            if not ref:
                raise ValueError("a reference transcript is empty after normalisation; WER is undefined for it")
            w = jiwer.process_words(ref, hyp)
            c = jiwer.process_characters(ref, hyp)
            we.append(w.substitutions + w.deletions + w.insertions)
            rw.append(w.substitutions + w.deletions + w.hits)
            ce.append(c.substitutions + c.deletions + c.insertions)
            rc.append(c.substitutions + c.deletions + c.hits)
        return dict(word_errors=np.array(we), ref_words=np.array(rw), char_errors=np.array(ce), ref_chars=np.array(rc))

    @staticmethod
    def loop_metrics(samples: dict) -> dict[str, float]:
        """``looping`` (count of hypotheses with ``hyp_words >= LOOP_FACTOR * ref_words``), ``WER_median``
        (median of ``word_errors / ref_words``) and ``WER_no_loops`` (corpus WER without the looping ones)."""
        errors, ref, hyp = (np.asarray(samples[k], dtype=np.float64) for k in ("word_errors", "ref_words", "hyp_words"))
        loops = hyp >= LOOP_FACTOR * ref
        rest = ~loops
        return {"looping": int(loops.sum()), "WER_median": float(np.median(errors / np.maximum(ref, 1))),
                "WER_no_loops": float(errors[rest].sum() / max(ref[rest].sum(), 1)) if rest.any() else float("nan")}

    @staticmethod
    def metric_from_samples(samples: dict) -> float:
        """Corpus WER: ``sum(word_errors) / sum(ref_words)``."""
        return float(np.sum(samples["word_errors"]) / max(np.sum(samples["ref_words"]), 1))

    def evaluate(self, model: nn.Module) -> dict:
        """``WER``, ``CER`` (pooled), ``WER_<voice>``/``CER_<voice>``, ``per_sample`` counts and hypotheses."""
        if self.bundle is None:
            raise RuntimeError("call prepare(bundle) before evaluate()")
        tokens = self.transcribe(model, self.test_features)
        hyps = [self.normalizer(self.decode_text(t)) for t in tokens]
        counts = self.edit_counts(self.references, hyps)
        voices = np.array([c.voice for c in self.test_clips])
        metrics: dict = {"WER": self.metric_from_samples(counts),
                         "CER": float(counts["char_errors"].sum() / max(counts["ref_chars"].sum(), 1))}
        for v in sorted(set(voices)):
            m = voices == v
            metrics[f"WER_{v}"] = float(counts["word_errors"][m].sum() / max(counts["ref_words"][m].sum(), 1))
            metrics[f"CER_{v}"] = float(counts["char_errors"][m].sum() / max(counts["ref_chars"][m].sum(), 1))
        metrics["mean_tokens"] = float(np.mean([len(t) for t in tokens]))
        counts["hyp_words"] = np.array([len(h.split()) for h in hyps])
        metrics.update(self.loop_metrics(counts))
        metrics["per_sample"] = {**counts, "voice": voices, "hypothesis": np.array(hyps, dtype=object).astype(str)}
        return metrics

    # ------------------------------------------------------------------------------- calibration
    def _pseudo_cache_path(self) -> Optional[Path]:
        """``<data_dir>/pseudo_labels/<hash>.json``: FP32 transcripts of the training clips, keyed by a hash
        of the float model's weights, the encoder window, the decoding settings and the training clips."""
        if self.data_dir is None:
            return None
        if getattr(self, "_pseudo_key", None) is None:
            h = hashlib.sha1()
            for name, t in self.bundle.model.state_dict().items():
                h.update(name.encode())
                h.update(t.detach().float().contiguous().numpy().tobytes())
            ex = self.extras
            h.update(json.dumps([self.bundle.name, int(self.test_features.shape[-1]), list(ex["prompt_ids"]), ex["eos_id"],
                                 list(ex.get("suppress_ids", ())), list(ex.get("suppress_ids_begin", ())), self._max_new,
                                 [c.text for c in self.train_clips]]).encode())
            for c in self.train_clips:
                h.update(c.wave.tobytes())
            self._pseudo_key = h.hexdigest()[:16]
        return Path(self.data_dir) / "pseudo_labels" / f"{self.bundle.name}_{self._pseudo_key}.json"

    def calibration_data(self, num_samples: int, seed: int) -> CalibrationData:
        """``num_samples`` training clips (drawn with ``seed``) with the FP32 model's transcripts as targets."""
        if self.bundle is None:
            raise RuntimeError("call prepare(bundle) before calibration_data()")
        pool = len(self.train_clips)
        if not 0 < num_samples <= pool:
            raise ValueError(f"calibration.num_samples={num_samples} but the ASR training pool holds {pool} clips "
                             f"(num_train={self.num_train} per voice x {len(self.voices)} voices); raise task.num_train")
        idx = np.sort(np.random.default_rng(seed).choice(pool, size=num_samples, replace=False)).tolist()
        todo = [i for i in idx if i not in self._train_features]
        if todo:
            for i, f in zip(todo, self._features([self.train_clips[i] for i in todo])):
                self._train_features[i] = f
        cache = self._pseudo_cache_path()
        if cache is not None and not self._pseudo and cache.is_file():
            self._pseudo.update({int(k): v for k, v in json.loads(cache.read_text()).items()})
        todo = [i for i in idx if i not in self._pseudo]
        if todo:  # FP32 pseudo-labels, once per clip (and per model/data, on disk)
            feats = torch.stack([self._train_features[i] for i in todo])
            for i, t in zip(todo, self.transcribe(self.bundle.model, feats)):
                self._pseudo[i] = t
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({str(k): v for k, v in sorted(self._pseudo.items())}))
                tmp.replace(cache)
        ex = self.extras
        batches = []
        for s in range(0, len(idx), self.calibration_batch_size):
            chunk = idx[s:s + self.calibration_batch_size]
            batches.append(teacher_forcing_batch(torch.stack([self._train_features[i] for i in chunk]),
                                                 [self._pseudo[i] for i in chunk], ex["prompt_ids"], ex["eos_id"]))
        loss = fitness_loss(self.fitness["kind"], ex["eos_id"], self.fitness["eos_margin"], self.fitness["eos_weight"],
                            ex.get("suppress_ids", ()))
        return CalibrationData(batches, forward=teacher_forced_logits, loss=loss)
