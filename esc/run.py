"""Hydra entry point for one run: ``(model, task, precision, scope, calibrator, ptq, seed) -> one result row``.

``python -m esc.run [group=option ...]`` runs one configuration; ``python -m esc.run -m ...`` sweeps a
grid (joblib locally, submitit on Slurm). The stages of a run live in :mod:`esc.pipeline`; this
module keys the run, skips a finished row (unless its requested ``export=<dir>`` ONNX file is
missing, or the row's ``data_hashes`` differ from the data the task loads now: a key hashes the
config, not the data), and writes the row with its provenance. A run that raises writes an error row (and,
inside a sweep, lets the other runs go on).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from esc.config import register_resolvers
from esc.core.errors import UserError
from esc.pipeline import changed_splits, component_name, current_data_hashes, execute, export_path, run_axes, validate
from esc.results import is_finished, provenance, read_row, row_path, run_key, write_json_atomic

log = logging.getLogger("esc.run")
register_resolvers()
FAILED = "failed.jsonl"  # failed runs of a sweep, under its sweep dir


def save_samples(path: Path, fp: dict[str, Any], quantized: dict[str, Any]) -> None:
    """Move the per-sample results out of both metric dicts into ``path`` (npz: ``fp32/<k>``, ``quantized/<k>``)."""
    samples = {"fp32": fp.pop("per_sample", {}), "quantized": quantized.pop("per_sample", {})}
    arrays = {f"{side}/{k}": np.asarray(v) for side, d in samples.items() for k, v in d.items()}
    if arrays:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)


def finish_row(cfg: DictConfig, axes: dict[str, Any], key: str, out: dict[str, Any], samples_path: Path) -> dict[str, Any]:
    """Add the headline columns (metric, fp32, quantized, drops) and provenance to a result row.

    Per-sample results go to ``samples_path`` (for paired bootstrap intervals in the report).
    """
    task = out.pop("task_obj")
    out["fp32_metrics"], out["metrics"] = dict(out["fp32_metrics"]), dict(out["metrics"])
    save_samples(samples_path, out["fp32_metrics"], out["metrics"])
    fp, q = out["fp32_metrics"][task.metric], out["metrics"][task.metric]
    drop = (fp - q) if task.higher_is_better else (q - fp)
    return {"key": key, "status": "ok", "study": cfg.study,
            "task": component_name(axes["task"]), "model": component_name(axes["model"]),
            "precision": cfg.precision.name, "scope": component_name(axes["scope"]), "calibrator": component_name(axes["calibrator"]),
            "ptq": component_name(axes["ptq"]), "seed": cfg.seed, "calibration_seed": cfg.calibration.seed,
            "metric": task.metric, "higher_is_better": task.higher_is_better,
            "task_class": f"{type(task).__module__}.{type(task).__qualname__}", "fp32": fp, "quantized": q,
            "drop": drop, "rel_drop": drop / abs(fp) if fp else float("nan"), **out,
            "axes": axes, "finished_at": datetime.now(timezone.utc).isoformat(), **provenance()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration unless its row is already finished; return the row.

    Bad config values raise :class:`~esc.core.errors.UserError` before anything is built. A run
    that fails writes an error row (retried by the next sweep); inside a sweep it is also listed
    in ``<sweep dir>/failed.jsonl`` for :class:`FailedRuns`, and the other runs go on.
    """
    validate(cfg)
    axes = run_axes(cfg)
    key = run_key(axes)
    rows_dir = Path(cfg.paths.rows) / cfg.study
    path = row_path(rows_dir, key)
    onnx_path = export_path(cfg, key)
    if is_finished(rows_dir, key) and (onnx_path is None or onnx_path.is_file()):
        done = read_row(path)
        changed = changed_splits(done.get("data_hashes", {}), current_data_hashes(cfg))
        if not changed:
            log.info("Row %s already finished (%s): skipping", key, path)
            return done
        log.warning("Row %s was made on other data than the task loads now (splits %s changed: a new data generator "
                    "version or replaced files): running it again", key, ", ".join(changed))
    log.info("Run %s -> %s", key, path)
    try:
        row = finish_row(cfg, axes, key, execute(cfg, axes), path.with_suffix(".samples.npz"))
    except Exception as exc:  # record the failure, then let the sweep go on
        row = {"key": key, "status": "error", "study": cfg.study, "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(), "axes": axes, **provenance()}
        write_json_atomic(path, row)
        log.error("Run %s failed: %s (error row written to %s)", key, row["error"], path)
        if not in_multirun():
            raise
        record_failure(key, row["error"])
        return row
    write_json_atomic(path, row)
    log_to_tracker(cfg, row)
    log.info("%s %s %s %s: %s fp32 %.4g -> quantized %.4g", row["model"], row["precision"], row["calibrator"], row["ptq"],
             row["metric"], row["fp32"], row["quantized"])
    return row


def record_failure(key: str, error: str) -> None:
    """Append a failed run (key, overrides, error) to ``<sweep dir>/failed.jsonl`` (one line, atomic append)."""
    hc = HydraConfig.get()
    line = json.dumps({"key": key, "overrides": list(hc.overrides.task), "error": error}) + "\n"
    path = Path(hc.sweep.dir) / FAILED
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line)


class FailedRuns(Callback):
    """Hydra callback: after a sweep, print every failed configuration and exit with status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / FAILED
        if not path.is_file():
            return
        failed = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        lines = [f"  {' '.join(f['overrides'])}: {f['error']}" for f in failed]
        print(f"{len(failed)} run(s) of this sweep failed (error rows written; a rerun retries them):\n" + "\n".join(lines),
              file=sys.stderr)
        sys.exit(1)


def in_multirun() -> bool:
    """True inside a Hydra multirun job."""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def log_to_tracker(cfg: DictConfig, row: dict[str, Any]) -> None:
    """Send the row to the configured experiment tracker (wandb) if any."""
    if cfg.logger.name != "wandb":
        return
    import wandb

    Path(cfg.logger.dir).mkdir(parents=True, exist_ok=True)
    with wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, dir=cfg.logger.dir,
                    name=f"{row['model']}-{row['precision']}-{row['calibrator']}-{row['ptq']}-s{row['seed']}",
                    config=row["axes"], reinit="finish_previous") as wb:
        for gen, (best, mean) in enumerate(zip(row["history"].get("best", []), row["history"].get("mean", []))):
            wb.log({"esc/best_fitness": best, "esc/mean_fitness": mean, "generation": gen})
        wb.summary.update({k: row[k] for k in ("fp32", "quantized", "drop", "rel_drop", "calib_seconds", "ptq_seconds")})


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: bad input ends the run with its one-sentence message and exit status 2."""
    try:
        run(cfg)
    except (UserError, FileNotFoundError) as exc:
        print(f"esc.run: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
