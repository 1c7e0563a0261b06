"""Offline audio tagging: AudioSet classes synthesised by code (:mod:`esc.data.tagging`), scored by mAP.

Metric: **mAP**, the standard AudioSet metric: the macro average over the evaluated classes of
the average precision of the clip-level scores (:func:`average_precision`), computed only over
the task's classes (the model's other AudioSet outputs are ignored). Also reported:
``top1_agreement``, the fraction of test clips whose arg-max over *all* the model's classes equals
the FP32 model's, and ``AP/<class>`` per class.

FP32 reference: :meth:`AudioTaggingTask.prepare` runs the bundle's float model once on the test
and calibration splits and keeps its clip scores (for ``top1_agreement`` and the calibration
targets), so the reference never depends on which model is evaluated first. The scores are cached
in ``<data_dir>/fp32-<hash>.npz``, the hash covering the model's state dict and the exact
front-end features of both splits (so a changed model, front end or data set never reuses them).

Calibration loss (ESC's fitness), ``loss="fp32"`` (default): per-clip binary cross-entropy of the
model's clip scores against the FP32 model's scores over all its classes,
``mean_k BCE(q_k, p_k) = -mean_k [p_k log q_k + (1 - p_k) log(1 - q_k)]`` (log clamped at -100 as in
``torch.nn.functional.binary_cross_entropy``). It needs no labels, covers every output the
quantized model should preserve, and its minimum is at ``q = p``. ``loss="labels"`` uses the
synthetic multi-hot labels over the task's classes instead (the classes overlap acoustically,
see :mod:`esc.data.tagging`, so these targets disagree with what the FP32 model rightly says).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esc.core.files import read_npz
from esc.calibrators.base import CalibrationData
from esc.data.tagging import CLASSES, DEFAULT_CLIP_SAMPLES, TaggingSpec, load_or_generate
from esc.core.bundle import ModelBundle
from esc.tasks.base import Task, require_finite, split_hashes

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ metrics
def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class (as ``sklearn.metrics.average_precision_score``).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in decreasing order
    (tied scores form one threshold), with ``P_n`` / ``R_n`` the precision / recall of "score >=
    threshold n". ``nan`` when there is no positive.
    """
    scores, targets = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(targets).ravel() > 0
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in length")
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct threshold
    tp, seen = tp[last], last + 1
    precision, recall = tp / seen, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mean of :func:`average_precision` over the columns (classes) that have a positive."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


# ------------------------------------------------------------------------ calibration parts
def forward_features(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Run ``model`` on the features of a calibration batch ``(features, targets)``."""
    return model(batch[0])


class FP32BCELoss:
    """Per-sample BCE of clip scores against the FP32 scores in ``batch[1]``, averaged over all classes."""

    def __call__(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        target = batch[1].to(outputs.dtype)
        return F.binary_cross_entropy(outputs.clamp(0.0, 1.0), target, reduction="none").mean(dim=1)


class LabelBCELoss:
    """Per-sample BCE of the scores of the task's classes (``class_index``) against multi-hot labels ``batch[1]``."""

    def __init__(self, class_index: Sequence[int]) -> None:
        self.class_index = list(class_index)

    def __call__(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        scores = outputs[:, self.class_index].clamp(0.0, 1.0)
        return F.binary_cross_entropy(scores, batch[1].to(scores.dtype), reduction="none").mean(dim=1)


# --------------------------------------------------------------------------------------- task
class AudioTaggingTask(Task):
    """Audio tagging on synthetic AudioSet-class clips (see the module docstring for metric and loss).

    Args:
        data_dir: cache of the synthetic sets (``${paths.data}/tagging``).
        num_clips / seed: the test split (default 720 clips, seed 0).
        calibration_clips / calibration_seed: the calibration split (256 clips, seed 1).
        classes: AudioSet display names to synthesise and evaluate (see :data:`esc.data.tagging.CLASSES`);
            each must be one of the model's ``labels``.
        clip_samples: clip length in samples at 16 kHz (23280 = 1.455 s = two YAMNet patches).
        mixture_fraction: share of two-class mixtures (multi-label clips).
        batch_size: clips per forward pass (evaluation and calibration batches).
        loss: calibration loss, ``"fp32"`` (BCE against FP32 scores) or ``"labels"``.
        cache_fp32: keep the FP32 scores on disk (see the module docstring).
    """

    name = "tagging"
    metric = "mAP"
    higher_is_better = True
    calibration_options = ("calibration_clips", "calibration_seed", "loss", "cache_fp32")

    def __init__(self, data_dir: str = "data/tagging", num_clips: int = 720, seed: int = 0,
                 calibration_clips: int = 256, calibration_seed: int = 1, classes: Sequence[str] = CLASSES,
                 clip_samples: int = DEFAULT_CLIP_SAMPLES, mixture_fraction: float = 0.3, batch_size: int = 32,
                 loss: str = "fp32", cache_fp32: bool = True) -> None:
        if loss not in ("fp32", "labels"):
            raise ValueError(f"loss={loss!r}; use 'fp32' (BCE against the FP32 scores) or 'labels'")
        if seed == calibration_seed:
            raise ValueError(f"the test and calibration splits share seed {seed}; give calibration_seed another value")
        self.data_dir = Path(data_dir)
        self.classes = tuple(str(c) for c in classes)
        common = dict(classes=self.classes, clip_samples=int(clip_samples), mixture_fraction=float(mixture_fraction))
        self.test_spec = TaggingSpec(num_clips=int(num_clips), seed=int(seed), **common)
        self.calib_spec = TaggingSpec(num_clips=int(calibration_clips), seed=int(calibration_seed), **common)
        self.batch_size, self.loss, self.cache_fp32 = int(batch_size), loss, bool(cache_fp32)
        self._prepared = False

    # -------------------------------------------------------------------------------- helpers
    def _features(self, frontend, waves: np.ndarray) -> torch.Tensor:
        return torch.cat([frontend(torch.from_numpy(waves[i:i + self.batch_size]))
                          for i in range(0, len(waves), self.batch_size)])

    def predict(self, model: nn.Module, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Clip scores ``[N, num_labels]`` of ``model`` on ``features`` (default: the test split)."""
        features = self.test_features if features is None else features
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(features[i:i + self.batch_size]).float() for i in range(0, len(features), self.batch_size)])
        model.train(was_training)
        return out

    # ------------------------------------------------------------------------------ interface
    def load_splits(self) -> dict:
        """The ``test`` and ``calibration`` sets; subclasses override it to change the data source."""
        return {"test": load_or_generate(self.test_spec, self.data_dir, "test"),
                "calibration": load_or_generate(self.calib_spec, self.data_dir, "calibration")}

    def load_data_hashes(self) -> dict[str, str]:
        """``{"test", "calibration"}`` content hashes of :meth:`load_splits`."""
        return split_hashes(self.load_splits())

    def prepare(self, bundle: ModelBundle) -> None:
        """Synthesise/load both splits, cache their front-end features and the FP32 model's clip scores."""
        if bundle.sample_rate != self.test_spec.sample_rate:
            raise ValueError(f"model {bundle.name} expects {bundle.sample_rate} Hz; the tagging task synthesises "
                             f"{self.test_spec.sample_rate} Hz audio")
        labels = list(bundle.labels or [])
        missing = [c for c in self.classes if c not in labels]
        if missing:
            raise ValueError(f"model {bundle.name} has no output for {missing}; its labels must contain every task "
                             f"class (drop them from task.classes or use a model with AudioSet labels)")
        self.class_index = [labels.index(c) for c in self.classes]
        splits = self.load_splits()
        test, calib = splits["test"], splits["calibration"]
        fix = f"delete the tagging caches in {self.data_dir} so they are synthesised again"
        require_finite(test.waves, self.name, "test", fix)
        require_finite(calib.waves, self.name, "calibration", fix)
        self.data_hashes = split_hashes(splits)
        self.test_labels, self.calib_labels = test.labels.astype(np.float32), calib.labels.astype(np.float32)
        self.test_features = self._features(bundle.frontend, test.waves)
        self.calib_features = self._features(bundle.frontend, calib.waves)
        log.info("tagging: %d test / %d calibration clips, features %s; FP32 reference pass",
                 len(self.test_features), len(self.calib_features), tuple(self.test_features.shape[1:]))
        self.fp32_test_scores, self.fp32_calib_scores = self._fp32_scores(bundle.model)
        self.fp32_top1 = self.fp32_test_scores.argmax(dim=1).numpy()
        self._prepared = True

    def _fp32_scores(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """FP32 clip scores on the test and calibration features, from the disk cache when it matches."""
        digest = hashlib.sha1()
        for name, value in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        for feats in (self.test_features, self.calib_features):
            digest.update(feats.numpy().tobytes())
        path = self.data_dir / f"fp32-{digest.hexdigest()[:16]}.npz"
        if self.cache_fp32 and path.is_file():
            return read_npz(path, lambda z: (torch.from_numpy(z["test"]), torch.from_numpy(z["calibration"])),
                            "delete it to recompute the FP32 scores")
        test, calib = self.predict(model, self.test_features), self.predict(model, self.calib_features)
        if self.cache_fp32:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, test=test.numpy(), calibration=calib.numpy())
            tmp.replace(path)
        return test, calib

    def _require_prepared(self) -> None:
        if not self._prepared:
            raise RuntimeError("AudioTaggingTask.prepare(bundle) must run before evaluate/calibration_data")

    def evaluate(self, model: nn.Module) -> dict:
        """``mAP`` over the task's classes, ``top1_agreement`` with FP32, ``AP/<class>``, and ``per_sample``."""
        self._require_prepared()
        scores = self.predict(model)
        task_scores = scores[:, self.class_index].numpy()
        agree = (scores.argmax(dim=1).numpy() == self.fp32_top1).astype(np.float32)
        out = {"mAP": mean_average_precision(task_scores, self.test_labels), "top1_agreement": float(agree.mean())}
        for c, name in enumerate(self.classes):
            out[f"AP/{name}"] = average_precision(task_scores[:, c], self.test_labels[:, c])
        out["per_sample"] = {"scores": task_scores, "labels": self.test_labels, "top1_agree": agree}
        return out

    @staticmethod
    def metric_from_samples(samples: dict) -> float:
        """mAP of (a resample of) the per-sample ``scores`` / ``labels``."""
        return mean_average_precision(samples["scores"], samples["labels"])

    def calibration_data(self, num_samples: int, seed: int) -> CalibrationData:
        """``num_samples`` calibration clips drawn without replacement with ``seed``: batches ``(features, targets)``."""
        self._require_prepared()
        n = len(self.calib_features)
        if not 0 < num_samples <= n:
            raise ValueError(f"calibration.num_samples={num_samples} but the tagging calibration split has {n} clips; "
                             f"use 1..{n} or raise task.calibration_clips")
        idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n, size=num_samples, replace=False)))
        if self.loss == "fp32":
            targets, loss = self.fp32_calib_scores, FP32BCELoss()
        else:
            targets, loss = torch.from_numpy(self.calib_labels), LabelBCELoss(self.class_index)
        batches = [(self.calib_features[b], targets[b]) for b in idx.split(self.batch_size)]
        return CalibrationData(batches, forward_features, loss)
