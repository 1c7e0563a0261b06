"""How well does each ESC fitness predict the test metric? Spearman's rho over perturbed scales.

``python -m esc.analysis.fitness_link --out results/fitness_link/NAME [--sigmas 0.1,0.2,0.4]
[--per-sigma 5] [--seed 0] [hydra overrides ...]``

ESC minimises a fitness on the calibration clips; what matters is the test metric. This measures
how closely the two are tied, per fitness kind (:data:`esc.calibrators.fitness.FITNESS_KINDS`):

1. The run config is composed as ``python -m esc.run`` would (``esc.config.compose`` with the
   given Hydra overrides). The model and task are built and prepared, the calibration set is
   drawn (``calibration.num_samples``, ``calibration.seed``), weights are quantized and calibrated
   as in a run, and activations are calibrated with the config's calibrator (the run's cached
   calibration is reused when an identical run exists: :func:`esc.run.calibrate_activations`).
   Its activation scales are ``s_0``.
2. Perturbed scale vectors ``s_k = s_0 * exp(sigma_j * z_k)``, ``z_k ~ N(0, I)`` (torch generator
   seeded with ``--seed``), ``--per-sigma`` of them for each ``sigma_j`` in ``--sigmas``; ``k = 0`` is
   ``s_0`` itself. These are the directions ESC searches (it samples log-multipliers of the scales).
3. For every ``s_k``: every fitness kind on the calibration set, from one forward pass per batch
   (exactly :meth:`FitnessEvaluator.per_sample`, the values ESC minimises), and the test metric
   (``task.evaluate``).
4. Per kind, Spearman's rank correlation between the fitness and the test *error* (the metric,
   negated when higher is better), so ``rho = 1`` means the fitness ranks the scale vectors exactly
   as the test set does. Ties get average ranks. The 95% interval is a percentile bootstrap over the
   scale vectors (2,000 resamples, seed 0). ``rho_local`` repeats it without the largest sigma: the
   link at the step sizes ESC searches with.

Writes ``NAME.csv`` (one line per scale vector: ``index, sigma, fitness_<kind>..., metric``) and
``NAME.json`` (the config axes, the metric, per kind ``rho``, ``ci_low``, ``ci_high``, the wall seconds and the
provenance of a result row: library versions, git commit, diff hash).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from esc.calibrators.fitness import FITNESS_KINDS, FitnessEvaluator
from esc.config import compose
from esc.core.bundle import weights_fingerprint
from esc.quant.model import QuantizedModel
from esc.results import provenance
from esc.pipeline import calibrate, calibration_path, component_name, prepare, quantize, run_axes, run_share

log = logging.getLogger("esc.analysis.fitness_link")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (Pearson's r of their average ranks)."""
    rx = pd.Series(np.asarray(x, float)).rank().to_numpy()
    ry = pd.Series(np.asarray(y, float)).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_interval(x: Sequence[float], y: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of :func:`spearman` over the ``(x, y)`` pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    values = [spearman(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(resamples))]
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def perturbations(s0: torch.Tensor, sigmas: Sequence[float], per_sigma: int, seed: int) -> list[tuple[float, torch.Tensor]]:
    """``[(0, s0)]`` followed by ``per_sigma`` vectors ``s0 * exp(sigma * z)`` for each sigma (``z ~ N(0, I)``)."""
    gen = torch.Generator().manual_seed(seed)
    out = [(0.0, s0.clone())]
    for sigma in sigmas:
        for _ in range(per_sigma):
            out.append((float(sigma), s0 * torch.exp(sigma * torch.randn(s0.shape, generator=gen))))
    return out


def all_fitness(qmodel: QuantizedModel, evaluators: dict[str, FitnessEvaluator], scales: torch.Tensor) -> dict[str, float]:
    """Every kind's fitness of one scale vector, sharing one forward pass per calibration batch."""
    qmodel.set_activation_scales(scales)
    data = next(iter(evaluators.values())).data
    totals = dict.fromkeys(evaluators, 0.0)
    with torch.no_grad():
        for i, batch in enumerate(data.batches):
            outputs = data.forward(qmodel, batch)
            for kind, ev in evaluators.items():
                totals[kind] += float(ev.per_sample(outputs, batch, i, 1).double().sum())
    return {kind: total / data.num_samples for kind, total in totals.items()}


def fitness_link(cfg, sigmas: Sequence[float], per_sigma: int, seed: int, kinds: Sequence[str] = FITNESS_KINDS) -> pd.DataFrame:
    """One line per scale vector: its sigma, each kind's calibration fitness and the test metric."""
    if cfg.precision.activation is None:
        raise SystemExit(f"precision {cfg.precision.name} quantizes no activations; choose e.g. precision=w8a5")
    bundle, task = prepare(cfg)
    data = task.calibration_data(int(cfg.calibration.num_samples), int(cfg.calibration.seed))
    qmodel = quantize(cfg, bundle, bundle.model, data)
    stage = instantiate(cfg.ptq).stage
    calibrate(cfg, qmodel, data, task, calibration_path(cfg, run_axes(cfg), stage, weights_fingerprint(bundle.model), task.data_hashes))
    qmodel.eval()
    kinds = [k for k in kinds if k != "task" or data.loss is not None]
    rows = []
    with qmodel.selecting(run_share(qmodel)):  # the scales the run's calibrator (ESC) searches
        evaluators = {k: FitnessEvaluator(qmodel, data, kind=k, batched=False) for k in kinds}
        points = perturbations(qmodel.activation_scales().detach(), sigmas, per_sigma, seed)
        for index, (sigma, scales) in enumerate(tqdm(points, desc="scale vectors")):
            fit = all_fitness(qmodel, evaluators, scales)
            with torch.no_grad():
                metric = float(task.evaluate(qmodel)[task.metric])
            rows.append({"index": index, "sigma": sigma, **{f"fitness_{k}": v for k, v in fit.items()}, "metric": metric})
            log.info("vector %d (sigma %.2f): %s, %s %.4g", index, sigma, ", ".join(f"{k} {v:.4g}" for k, v in fit.items()),
                     task.metric, metric)
    df = pd.DataFrame(rows)
    df.attrs.update(metric=task.metric, higher_is_better=bool(task.higher_is_better))
    return df


def summarise(df: pd.DataFrame, higher_is_better: bool) -> dict[str, dict[str, float]]:
    """Per fitness kind: Spearman's rho with the test error and its bootstrap 95% interval, over all
    scale vectors and (``*_local``) over those below the largest sigma, the scale ESC's steps work at
    (the largest perturbations break fitness and metric together and can carry rho on their own)."""
    error = -df["metric"] if higher_is_better else df["metric"]
    local = df["sigma"] < df["sigma"].max()
    out = {}
    for col in [c for c in df.columns if c.startswith("fitness_")]:
        lo, hi = spearman_interval(df[col], error)
        llo, lhi = spearman_interval(df[col][local], error[local]) if local.sum() >= 3 else (float("nan"),) * 2
        out[col.removeprefix("fitness_")] = {"rho": spearman(df[col], error), "ci_low": lo, "ci_high": hi,
                                             "rho_local": spearman(df[col][local], error[local]),
                                             "ci_local_low": llo, "ci_local_high": lhi}
    return out


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output stem: writes OUT.csv and OUT.json")
    parser.add_argument("--sigmas", default="0.1,0.2,0.4", help="comma-separated perturbation sizes (log-scale std)")
    parser.add_argument("--per-sigma", type=int, default=5, help="perturbed vectors per sigma")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=whisper_asr precision=w8a5 calibrator=mse")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose(args.overrides)
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    if args.per_sigma < 1 or not sigmas or min(sigmas) <= 0:
        raise SystemExit("need --per-sigma >= 1 and positive --sigmas")
    start = time.perf_counter()
    df = fitness_link(cfg, sigmas, args.per_sigma, args.seed)
    summary = {"model": component_name(OmegaConf.to_container(cfg.model, resolve=True)),
               "task": component_name(OmegaConf.to_container(cfg.task, resolve=True)),
               "precision": cfg.precision.name, "calibrator": component_name(OmegaConf.to_container(cfg.calibrator, resolve=True)),
               "calib_samples": int(cfg.calibration.num_samples), "seed": args.seed, "sigmas": sigmas,
               "per_sigma": args.per_sigma, "metric": df.attrs["metric"], "overrides": args.overrides,
               "spearman_fitness_vs_test_error": summarise(df, df.attrs["higher_is_better"]),
               "seconds": round(time.perf_counter() - start, 1), **provenance()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.6g")
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    for kind, s in summary["spearman_fitness_vs_test_error"].items():
        print(f"{kind:5s} rho {s['rho']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]; below the largest sigma "
              f"{s['rho_local']:+.3f} [{s['ci_local_low']:+.3f}, {s['ci_local_high']:+.3f}]")
    print(f"wrote {args.out.with_suffix('.csv')} and .json ({len(df)} scale vectors)")
    return summary


if __name__ == "__main__":
    main()
