"""Is a difference real? Paired bootstrap confidence intervals over per-sample results.

Tasks return per-sample results (``evaluate(...)["per_sample"]``: a dict of arrays whose first
dimension is the test sample) and a ``metric_from_samples`` function that recomputes the headline
metric from any subset of them. Two runs evaluated on the same test clips are compared by
resampling clip indices with replacement (the same indices for both runs: a paired bootstrap)
and taking percentiles of the metric difference.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

Samples = Mapping[str, np.ndarray]


def take(samples: Samples, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The per-sample arrays restricted to rows ``idx``."""
    return {k: np.asarray(v)[idx] for k, v in samples.items()}


def num_samples(samples: Samples) -> int:
    """Number of test samples (length of the first array)."""
    return len(next(iter(samples.values())))


def paired_bootstrap(a: Samples, b: Samples, metric: Callable[[Samples], float], n_boot: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Percentile-bootstrap CI of ``metric(a) - metric(b)`` over the same resampled test samples.

    Returns ``diff`` (on the full set), ``lo``, ``hi`` and ``significant`` (the interval excludes 0).
    """
    n = num_samples(a)
    if num_samples(b) != n:
        raise ValueError(f"paired bootstrap needs the same test samples; got {n} and {num_samples(b)}")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        diffs[i] = metric(take(a, idx)) - metric(take(b, idx))
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return {"diff": metric(a) - metric(b), "lo": float(lo), "hi": float(hi), "significant": bool(lo > 0 or hi < 0)}
