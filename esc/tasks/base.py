"""What a task is: data, a metric, and a calibration loss. It knows nothing of quantization."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.core.bundle import ModelBundle
from esc.core.errors import UserError


def require_finite(waves: Sequence[Any] | np.ndarray, task: str, split: str, fix: str) -> None:
    """Raise a :class:`~esc.core.errors.UserError` naming the first clip of ``split`` whose audio
    (an array or tensor per clip, or one ``[clips, samples]`` array) holds NaN/Inf, and ``fix``."""
    for i, wave in enumerate(waves):
        wave = np.asarray(wave)
        if np.issubdtype(wave.dtype, np.floating) and not np.isfinite(wave).all():
            bad = int((~np.isfinite(wave)).sum())
            raise UserError(f"{task} task: {split} clip {i} holds {bad} NaN/Inf audio samples; the data is damaged: {fix}")


def subset_indices(n: int, max_clips: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``max_clips`` of ``n`` test clips (drawn with ``seed``);
    all ``n`` when ``max_clips`` is ``None`` or not below ``n``."""
    if max_clips is None or max_clips >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_clips), replace=False))


def split_hashes(splits: Mapping[str, Any]) -> dict[str, str]:
    """``{split name: split.sha256}`` of the data splits a task loaded (KWS and tagging sets carry their hash)."""
    return {name: split.sha256 for name, split in splits.items()}


class Task:
    """Base class of tasks (keyword spotting, audio tagging, ASR).

    Life cycle used by :mod:`esc.run`: ``prepare(bundle)`` once (load/synthesise data, run the
    float front end on every split and cache the features), then ``evaluate(model)`` for the FP32
    model and for each quantized model, and ``calibration_data(num_samples, seed)`` to get the
    calibration batches (drawn from the training split).

    Attributes:
        name: task name used in result rows (``kws``, ``tagging``, ``asr``).
        metric: name of the headline metric (``accuracy``, ``mAP``, ``WER``).
        higher_is_better: direction of the headline metric.
        data_hashes: content hash of every data split the task uses (``{"test": ..., "train": ...}``),
            set by :meth:`prepare`; result rows record it, so two rows name the same bytes, and the
            runner reruns a finished row whose hashes differ from :meth:`load_data_hashes`.
        revisions: hub data set -> the commit it was loaded from (hub tasks only), set by :meth:`prepare`.
        skipped_files: messages of the undecodable files left out (``skip_bad_files``; hub tasks only).
        calibration_options: options of the task's config that shape only the calibration batches or the
            calibration loss, never :meth:`evaluate`; the FP32 metrics cache leaves them out of its key.
    """

    name = "task"
    metric = "metric"
    higher_is_better = True
    data_hashes: dict[str, str] = {}
    revisions: dict[str, str] = {}
    skipped_files: list[str] = []
    calibration_options: tuple[str, ...] = ()

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise a :class:`~esc.core.errors.UserError` naming a bad value among ``options`` (this task's
        config node), so :func:`esc.pipeline.validate` stops a run before any model is built; the base
        class checks nothing (subclasses that check call it from their constructor too)."""

    def prepare(self, bundle: ModelBundle) -> None:
        """Load the data and cache front-end features for ``bundle``."""
        raise NotImplementedError

    def load_data_hashes(self) -> dict[str, str] | None:
        """The :attr:`data_hashes` that :meth:`prepare` would set, without a model (the data synthesised on
        first use like :meth:`prepare` does); ``None`` when they cannot be known more cheaply than by
        preparing (the base class; hub data sets, pinned by their ``revisions`` instead)."""
        return None

    def evaluate(self, model: nn.Module) -> dict:
        """Metrics of ``model`` on the test split.

        Must contain ``self.metric`` (a float) and ``"per_sample"``: a dict of arrays whose first
        dimension is the test sample, from which :meth:`metric_from_samples` recomputes the metric
        (the paired bootstrap of :mod:`esc.stats` resamples these rows).
        """
        raise NotImplementedError

    @staticmethod
    def metric_from_samples(samples: dict) -> float:
        """The headline metric computed from (a resample of) ``evaluate(...)["per_sample"]``."""
        raise NotImplementedError

    def calibration_data(self, num_samples: int, seed: int) -> CalibrationData:
        """``num_samples`` training samples drawn with ``seed``, as model-ready batches with a per-sample loss."""
        raise NotImplementedError
