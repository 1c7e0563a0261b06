"""Hydra entry point for one run: ``(model, task, precision, calibrator, ptq, seed) -> one result row``.

``python -m esc.run [group=option ...]`` runs one configuration; ``python -m esc.run -m ...`` sweeps a
grid (joblib locally, submitit on Slurm). Steps of a run: build the model and task; evaluate FP32
(cached per model/task/seed, so a sweep evaluates it once); draw the calibration set; apply a
"before" PTQ method; insert quantizers; calibrate weights and activations; apply an "after" PTQ
method; measure level utilisation; evaluate; write the row (and, with ``export=<dir>``, the calibrated
model as ONNX QDQ, :func:`export_path`). A finished row is never recomputed (unless its requested
export is missing); a run that raises writes an error row (and, inside a sweep, lets the other runs go on).
"""
from __future__ import annotations

import copy
import logging
import os
import random
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from esc.calibrators.base import use_unsigned_for_nonnegative
from esc.config import register_resolvers
from esc.export.onnx import example_inputs, export_onnx
from esc.models.base import weights_fingerprint
from esc.models.checkpoint import save_checkpoint
from esc.quant.model import QuantSpec, quantize_model
from esc.results import is_finished, portable, provenance, read_row, row_path, run_key, write_json_atomic

log = logging.getLogger("esc.run")
register_resolvers()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def path_roots(cfg: DictConfig) -> dict[str, str]:
    """The configured directories (``paths.root``, ``paths.data``, ...) as absolute paths, for :func:`esc.results.portable`."""
    return {f"paths.{k}": str(Path(v).resolve()) for k, v in OmegaConf.to_container(cfg.paths, resolve=True).items()}


def run_axes(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config axes that define a run (and its key), with paths made portable.

    For FP32 the calibrator and PTQ method play no role, and for weight-only precisions the
    calibrator plays none: they are recorded as ``none`` so equivalent runs share one key.
    """
    roots = path_roots(cfg)
    axes = {k: portable(OmegaConf.to_container(cfg[k], resolve=True), roots)
            for k in ("model", "task", "precision", "calibrator", "ptq", "calibration")}
    axes["seed"] = cfg.seed
    if cfg.precision.activation is None:
        axes["calibrator"] = "none"
    if cfg.precision.weight is None and cfg.precision.activation is None:
        axes["ptq"] = "none"
        axes["calibration"] = "none"
    return axes


def component_name(node: Any) -> str:
    """Short name of a configured component: its ``name`` field, else the ``name`` attribute of its
    ``_target_`` (calibrators, PTQ methods), else the target's name in lower case without ``build_``."""
    if not isinstance(node, dict):
        return str(node)
    if "name" in node:
        return str(node["name"])
    target = node.get("_target_")
    if not target:
        return "none"
    return str(getattr(get_object(target), "name", None) or target.rsplit(".", 1)[-1].lower().removeprefix("build_"))


def quant_spec(node: DictConfig | None) -> QuantSpec | None:
    """A :class:`QuantSpec` from a precision sub-config (``None`` = stays float)."""
    return None if node is None else QuantSpec(int(node.bits), bool(node.symmetric), str(node.granularity))


def fp32_metrics(cfg: DictConfig, axes: dict[str, Any], task, bundle, weights: str) -> dict[str, float]:
    """FP32 metrics of the model on the task, cached per model config, ``weights`` fingerprint, task
    config, data content and seed under ``paths.cache``."""
    key = run_key({"model": axes["model"], "weights": weights, "task": axes["task"], "data": task.data_hashes,
                   "seed": axes["seed"]})
    path = Path(cfg.paths.cache) / "fp32" / f"{key}.json"
    cached = read_row(path)
    if cached is not None:
        log.info("FP32 metrics from cache %s", path)
        return cached
    log.info("Evaluating the FP32 model")
    metrics = task.evaluate(bundle.model)
    write_json_atomic(path, {**metrics, "per_sample": {k: np.asarray(v).tolist() for k, v in metrics.get("per_sample", {}).items()}})
    return metrics


def save_samples(path: Path, fp: dict[str, Any], quantized: dict[str, Any]) -> None:
    """Move the per-sample results out of both metric dicts into ``path`` (npz: ``fp32/<k>``, ``quantized/<k>``)."""
    samples = {"fp32": fp.pop("per_sample", {}), "quantized": quantized.pop("per_sample", {})}
    arrays = {f"{side}/{k}": np.asarray(v) for side, d in samples.items() for k, v in d.items()}
    if arrays:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)


def calibration_path(cfg: DictConfig, axes: dict[str, Any], ptq_stage: str, weights: str, data: dict[str, str]) -> Path:
    """Cache file of an activation calibration, keyed by everything it depends on: the run axes
    without an "after" PTQ method, the float model's ``weights`` fingerprint and the ``data`` hashes."""
    key = run_key({**{k: axes[k] for k in ("model", "task", "precision", "calibrator", "calibration", "seed")},
                   "ptq": axes["ptq"] if ptq_stage == "before" else "none", "weights": weights, "data": data})
    return Path(cfg.paths.cache) / "calibration" / f"{key}.pt"


def calibrate_activations(cfg: DictConfig, qmodel, data, task, path: Path) -> dict[str, Any]:
    """Calibrate ``qmodel``'s activation quantizers (unsigned grids for non-negative inputs first, when
    the precision asks for them), or restore the grids and scales of an identical earlier calibration.

    Runs that differ only in an "after" PTQ method (the PTQ grid) share one calibration, cached
    at ``path`` (:func:`calibration_path`) with its seconds, forward passes and history.
    """
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        qmodel.load_activation_state(cached["state"])  # grids (signed/unsigned) included
        log.info("Activation scales from an identical earlier calibration (%s; it took %.1f s)", path, cached["result"]["seconds"])
        return {**cached["result"], "cached": True}
    if cfg.precision.activation.get("unsigned_nonnegative", False):
        unsigned = use_unsigned_for_nonnegative(qmodel, data)
        log.info("%d non-negative activations get an unsigned grid: %s", len(unsigned), ", ".join(unsigned))
    calibrator = instantiate(cfg.calibrator)
    if cfg.calibration.monitor_every and hasattr(calibrator, "monitor"):  # ESC: test metric along the search
        calibrator.monitor_every = int(cfg.calibration.monitor_every)
        calibrator.monitor = lambda: task.evaluate(qmodel)[task.metric]
    log.info("Calibrating %d activation quantizers with %s on %d samples",
             len(qmodel.activation_quantizers), type(calibrator).__name__, data.num_samples)
    res = calibrator.calibrate(qmodel, data)
    result = {"seconds": res.seconds, "forward_passes": res.forward_passes, "history": res.history}
    save_checkpoint({"state": qmodel.activation_state(), "result": result}, path)
    return {**result, "cached": False}


def export_path(cfg: DictConfig, key: str) -> Path | None:
    """Where run ``key`` writes its ONNX QDQ export: ``<export>/<key>.onnx``; ``None`` when ``export`` is
    unset or the precision quantizes nothing."""
    if not cfg.get("export") or (cfg.precision.weight is None and cfg.precision.activation is None):
        return None
    return Path(cfg.export) / f"{key}.onnx"


def execute(cfg: DictConfig, axes: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration and return its result row (without provenance)."""
    seed_everything(cfg.seed)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    log.info("Building model %s and task %s", component_name(axes["model"]), component_name(axes["task"]))
    bundle = instantiate(cfg.model)
    task = instantiate(cfg.task)
    task.prepare(bundle)
    weights = weights_fingerprint(bundle.model)
    fp = fp32_metrics(cfg, axes, task, bundle, weights)
    row: dict[str, Any] = {"fp32_metrics": fp, "weights_fingerprint": weights, "data_hashes": dict(task.data_hashes), "calib_seconds": 0.0, "calibration_cached": False, "ptq_seconds": 0.0, "forward_passes": 0,
                           "n_act_quantizers": 0, "n_weight_quantizers": 0, "calib_samples": 0, "history": {}, "quantizers": []}
    if cfg.precision.weight is None and cfg.precision.activation is None:
        return {**row, "metrics": fp, "task_obj": task}

    data = task.calibration_data(int(cfg.calibration.num_samples), int(cfg.calibration.seed))
    ptq = instantiate(cfg.ptq)
    float_model = bundle.model
    start = time.perf_counter()
    if ptq.stage == "before":
        log.info("PTQ %s on the float model", ptq.name)
        float_model = copy.deepcopy(float_model)
        ptq.apply(float_model, data)
    ptq_seconds = time.perf_counter() - start
    qmodel = quantize_model(float_model, weight=quant_spec(cfg.precision.weight), activation=quant_spec(cfg.precision.activation),
                            skip=bundle.skip_quantization)
    if cfg.precision.weight is not None:
        qmodel.calibrate_weights(cfg.calibration.weights)
    if cfg.precision.activation is not None:
        cache = calibration_path(cfg, axes, ptq.stage, weights, task.data_hashes)
        result = calibrate_activations(cfg, qmodel, data, task, cache)
        row.update(calib_seconds=result["seconds"], forward_passes=result["forward_passes"], history=result["history"],
                   calibration_cached=result["cached"])
    if ptq.stage == "after" and ptq.name != "none":
        log.info("PTQ %s on the calibrated model", ptq.name)
        start = time.perf_counter()
        ptq.apply(qmodel, data)
        ptq_seconds += time.perf_counter() - start
    qmodel.measure_level_utilisation(data.batches, data.forward)
    log.info("Evaluating the quantized model")
    metrics = task.evaluate(qmodel)
    onnx_path = export_path(cfg, run_key(axes))
    if onnx_path is not None:
        export_onnx(qmodel, example_inputs(qmodel, lambda: data.forward(qmodel, data.batches[0])), onnx_path,
                    {"row_key": run_key(axes), "axes": axes, **provenance()})
        log.info("ONNX QDQ export written to %s", onnx_path)
    return {**row, "metrics": metrics, "ptq_seconds": ptq_seconds, "calib_samples": data.num_samples,
            "n_act_quantizers": sum(q.enabled for q in qmodel.activation_quantizers.values()),
            "n_weight_quantizers": sum(q.enabled for q in qmodel.weight_quantizers.values()),
            "quantizers": qmodel.summary(), "task_obj": task}


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
            "precision": cfg.precision.name, "calibrator": component_name(axes["calibrator"]),
            "ptq": component_name(axes["ptq"]), "seed": cfg.seed, "calibration_seed": cfg.calibration.seed,
            "metric": task.metric, "higher_is_better": task.higher_is_better,
            "task_class": f"{type(task).__module__}.{type(task).__qualname__}", "fp32": fp, "quantized": q,
            "drop": drop, "rel_drop": drop / abs(fp) if fp else float("nan"), **out,
            "axes": axes, "finished_at": datetime.now(timezone.utc).isoformat(), **provenance()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration unless its row is already finished; return the row."""
    axes = run_axes(cfg)
    key = run_key(axes)
    rows_dir = Path(cfg.paths.rows) / cfg.study
    path = row_path(rows_dir, key)
    onnx_path = export_path(cfg, key)
    if is_finished(rows_dir, key) and (onnx_path is None or onnx_path.is_file()):
        log.info("Row %s already finished (%s): skipping", key, path)
        return read_row(path)
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
        return row
    write_json_atomic(path, row)
    log_to_tracker(cfg, row)
    log.info("%s %s %s %s: %s fp32 %.4g -> quantized %.4g", row["model"], row["precision"], row["calibrator"], row["ptq"],
             row["metric"], row["fp32"], row["quantized"])
    return row


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
    """Hydra entry point."""
    run(cfg)


if __name__ == "__main__":
    main()
