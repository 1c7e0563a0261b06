"""Keyword spotting on the synthetic Speech-Commands-style data (:mod:`esc.data.kws`).

Metric: top-1 accuracy (%) on the test split (voices unseen in training), plus the mean
cross-entropy. Calibration: ``num_samples`` training clips drawn without replacement with
``seed``, batched as ``(features, labels)`` tuples; ``forward(model, batch) = model(features)``;
``loss`` = per-sample cross-entropy of the logits against the true labels.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.data.audio import pcm_to_float
from esc.data.kws import KWSSplit, config_from_kwargs, load_kws
from esc.core.bundle import ModelBundle
from esc.tasks.base import Task, require_finite, split_hashes, subset_indices

log = logging.getLogger(__name__)

TINY_DATA = dict(words=("yes", "no", "up"), num_voices=(2, 1, 2), clips_per_word=(2, 1, 2), valid_variants=1, test_variants=1)


def _forward(model: nn.Module, batch) -> torch.Tensor:
    """Run ``model`` on the features of a ``(features, labels)`` batch."""
    return model(batch[0])


def _loss(outputs: torch.Tensor, batch) -> torch.Tensor:
    """Per-sample cross-entropy against the labels of a ``(features, labels)`` batch."""
    return F.cross_entropy(outputs.float(), batch[1], reduction="none")


class KeywordSpottingTask(Task):
    """Keyword spotting: 35-word (or fewer, ``words``) classification of 1 s clips.

    Args:
        data_dir: where the data set is cached / generated.
        seed: data-set seed (``KWSConfig.seed``).
        eval_batch_size: batch size of :meth:`evaluate`.
        calibration_batch_size: batch size of the calibration batches.
        max_test_clips: evaluate on a fixed random subset (drawn with ``subset_seed``) of this
            many test clips; ``None`` = the whole test split.
        tiny: use :data:`TINY_DATA` (3 words, 2 train / 2 test voices) for tests; explicit
            ``data`` parameters override it.
        generate: synthesise the data set if it is not cached (otherwise raise).
        name: task name in result rows (default ``kws``).
        data: further :class:`esc.data.kws.KWSConfig` fields (num_voices, clips_per_word, words, ...).

    Train features are computed lazily, only for the clips drawn for calibration, and memoised;
    test features are computed once in :meth:`prepare`.
    """

    name = "kws"
    metric = "accuracy"
    higher_is_better = True
    calibration_options = ("calibration_batch_size",)

    def __init__(self, data_dir: str = "data/kws", seed: int = 0, eval_batch_size: int = 256,
                 calibration_batch_size: int = 32, max_test_clips: Optional[int] = None, subset_seed: int = 0,
                 tiny: bool = False, generate: bool = True, progress: bool = True, name: Optional[str] = None, **data) -> None:
        if name is not None:  # else the class attribute (subclasses may set self.name before calling this)
            self.name = name
        params = {**(TINY_DATA if tiny else {}), **data, "seed": seed}
        self.data_config = config_from_kwargs(**params)
        self.data_dir = data_dir
        self.eval_batch_size = int(eval_batch_size)
        self.calibration_batch_size = int(calibration_batch_size)
        self.max_test_clips = max_test_clips
        self.subset_seed = subset_seed
        self.generate = generate
        self.progress = progress
        self.bundle: Optional[ModelBundle] = None

    # ------------------------------------------------------------------------------ prepare
    def _features(self, waveforms: np.ndarray) -> torch.Tensor:
        """Front-end features of int16/float waveforms ``[n, samples]``, in batches of ``eval_batch_size``."""
        out = []
        with torch.no_grad():
            for start in range(0, len(waveforms), self.eval_batch_size):
                wav = torch.from_numpy(np.ascontiguousarray(pcm_to_float(waveforms[start:start + self.eval_batch_size])))
                out.append(self.bundle.frontend(wav))
        return torch.cat(out)

    def _model_labels(self, split: KWSSplit) -> torch.Tensor:
        """The split's labels as indices into the model's label list."""
        names = self.bundle.labels
        if names is None:
            raise ValueError(f"model {self.bundle.name!r} has no label list; the kws task needs a classifier bundle with labels")
        missing = [w for w in split.words if w not in names]
        if missing:
            raise ValueError(f"words {missing} of the kws data are not classes of model {self.bundle.name!r}; "
                             "choose task words among the model's labels")
        index = np.array([names.index(w) for w in split.words], dtype=np.int64)
        return torch.from_numpy(index[split.labels])

    def load_splits(self) -> dict[str, KWSSplit]:
        """The ``train`` (calibration pool) and ``test`` splits; subclasses override it to change the data source."""
        return load_kws(self.data_dir, self.data_config, generate=self.generate, progress=self.progress, splits=("train", "test"))

    def load_data_hashes(self) -> dict[str, str]:
        """``{"train", "test"}`` content hashes of :meth:`load_splits` (read from the data set's metadata)."""
        return split_hashes(self.load_splits())

    def prepare(self, bundle: ModelBundle) -> None:
        """Load (or synthesise) the data and cache the test features of ``bundle``'s front end."""
        if bundle.sample_rate != self.data_config.sample_rate:
            raise ValueError(f"model {bundle.name!r} expects {bundle.sample_rate} Hz but the kws data is "
                             f"{self.data_config.sample_rate} Hz; set the task's sample_rate to match")
        self.bundle = bundle
        splits = self.load_splits()
        self.train, test = splits["train"], splits["test"]
        fix = f"delete {self.data_dir} and regenerate it (make data)"
        require_finite(self.train.pcm, self.name, "train", fix)
        require_finite(test.pcm, self.name, "test", fix)
        self.data_hashes = split_hashes(splits)
        self.train_labels = self._model_labels(self.train)
        idx = subset_indices(len(test), self.max_test_clips, self.subset_seed)
        self.test_features = self._features(test.pcm[idx])
        self.test_labels = self._model_labels(test)[torch.from_numpy(idx)]
        self._train_cache: dict[int, torch.Tensor] = {}
        log.info("kws task: %d test clips (%d voices), %d train clips available for calibration",
                 len(self.test_labels), len(test.voices), len(self.train))

    def _check_prepared(self) -> None:
        """Raise if :meth:`prepare` has not run."""
        if self.bundle is None:
            raise RuntimeError("KeywordSpottingTask.prepare(bundle) must be called before evaluate/calibration_data")

    # ----------------------------------------------------------------------------- evaluate
    def evaluate(self, model: nn.Module) -> dict:
        """Top-1 accuracy (%) and mean cross-entropy of ``model`` on the (subset of the) test split.

        ``per_sample``: ``correct`` (bool per test clip) and ``prediction`` (class index).
        """
        self._check_prepared()
        was_training = model.training
        model.eval()
        predictions, losses = [], []
        with torch.no_grad():
            for start in range(0, len(self.test_labels), self.eval_batch_size):
                x = self.test_features[start:start + self.eval_batch_size]
                y = self.test_labels[start:start + self.eval_batch_size]
                logits = model(x).float()
                losses.append(F.cross_entropy(logits, y, reduction="none"))
                predictions.append(logits.argmax(-1))
        model.train(was_training)
        prediction = torch.cat(predictions)
        correct = (prediction == self.test_labels).numpy()
        return {"accuracy": self.metric_from_samples({"correct": correct}), "loss": float(torch.cat(losses).mean()),
                "per_sample": {"correct": correct, "prediction": prediction.numpy()}}

    @staticmethod
    def metric_from_samples(samples: dict) -> float:
        """Accuracy (%) from per-clip ``correct`` flags."""
        return 100.0 * float(np.mean(samples["correct"]))

    # ---------------------------------------------------------------------- calibration
    def calibration_data(self, num_samples: int, seed: int) -> CalibrationData:
        """``num_samples`` training clips drawn with ``seed`` as ``(features, labels)`` batches."""
        self._check_prepared()
        if not 1 <= num_samples <= len(self.train):
            raise ValueError(f"num_samples={num_samples} but the kws train split has {len(self.train)} clips; "
                             "choose 1..that many (or generate a larger data set)")
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(self.train), size=num_samples, replace=False)
        todo = sorted(int(i) for i in idx if int(i) not in self._train_cache)
        if todo:
            feats = self._features(self.train.pcm[todo])
            self._train_cache.update(zip(todo, feats))
        x = torch.stack([self._train_cache[int(i)] for i in idx])
        y = self.train_labels[torch.from_numpy(idx)]
        bs = self.calibration_batch_size
        batches = [(x[s:s + bs], y[s:s + bs]) for s in range(0, num_samples, bs)]
        return CalibrationData(batches, forward=_forward, loss=_loss)
