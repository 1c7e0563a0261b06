"""The stages of one run, shared by :mod:`esc.run` and the analyses.

``prepare`` (build model and task) -> FP32 metrics (cached) -> calibration set -> "before" PTQ ->
``quantize`` (insert the scope's quantizers, one per tensor, calibrate weights) -> ``calibrate``
(fixed-calibrator roles, then the run's calibrator on its share; cached) -> "after" PTQ ->
evaluate. :func:`execute` chains them; the analyses call the stages they need.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from esc.calibrators import BY_NAME
from esc.calibrators.base import CalibrationData, take_batch, use_unsigned_for_nonnegative
from esc.calibrators.weights import WEIGHT_CLIPS, calibrate_weights
from esc.core.bundle import ModelBundle, weights_fingerprint
from esc.core.errors import UserError
from esc.core.files import load_plain, save_checkpoint
from esc.core.timer import StageTimer
from esc.quant.model import QuantizedModel, QuantSpec, quantize_model
from esc.quant.quantizer import GRANULARITIES, MAX_BITS, MIN_BITS
from esc.quant.roles import matches
from esc.quant.scope import Scope, build_scope
from esc.results import portable, provenance, read_row, run_key, write_json_atomic

log = logging.getLogger("esc.pipeline")

AXES = ("model", "task", "precision", "scope", "calibrator", "ptq", "calibration")


def build(node: DictConfig) -> Any:
    """``hydra.utils.instantiate(node)``, re-raising a :class:`~esc.core.errors.UserError` or
    ``FileNotFoundError`` from the builder as itself (Hydra wraps it), so its one sentence reaches the user."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, (UserError, FileNotFoundError)):
            raise cause from None
        raise


@functools.lru_cache(maxsize=16)
def _load_data_hashes(task_json: str) -> dict[str, str] | None:
    return build(OmegaConf.create(json.loads(task_json))).load_data_hashes()


def current_data_hashes(cfg: DictConfig) -> dict[str, str] | None:
    """Content hashes of the data the run's task loads now (:meth:`esc.tasks.base.Task.load_data_hashes`,
    no model built), once per task config and process; ``None`` when the task cannot tell before preparing."""
    return _load_data_hashes(json.dumps(OmegaConf.to_container(cfg.task, resolve=True), sort_keys=True))


def changed_splits(recorded: dict[str, str], current: dict[str, str] | None) -> list[str]:
    """The data splits whose hash in a finished row (``recorded``) differs from ``current`` (none when
    ``current`` is ``None``: unknown)."""
    if current is None:
        return []
    return sorted(k for k in {*recorded, *current} if recorded.get(k) != current.get(k))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def path_roots(cfg: DictConfig) -> dict[str, str]:
    """The configured directories (``paths.root``, ``paths.data``, ...) as absolute paths, for :func:`esc.results.portable`
    (normalised, symlinks kept: a ``data`` link to another disk still counts as ``${paths.data}``)."""
    return {f"paths.{k}": os.path.abspath(v) for k, v in OmegaConf.to_container(cfg.paths, resolve=True).items()}


def run_axes(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config axes that define a run (and its key), with paths made portable.

    For FP32 the calibrator, scope and PTQ method play no role, and for weight-only precisions
    the calibrator and scope play none: they are recorded as ``none`` so equivalent runs share one key.
    """
    roots = path_roots(cfg)
    axes = {k: portable(OmegaConf.to_container(cfg[k], resolve=True), roots) for k in AXES}
    axes["seed"] = cfg.seed
    if cfg.precision.activation is None:
        axes["calibrator"] = axes["scope"] = "none"
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


def validate(cfg: DictConfig) -> None:
    """Check the composed config before any model is built; raise :class:`~esc.core.errors.UserError`
    with one sentence naming the bad value and the fix."""
    for side in ("weight", "activation"):
        node = cfg.precision.get(side)
        if node is None:
            continue
        bits = node.get("bits")
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise UserError(f"precision.{side}.bits={bits!r} must be an integer in {MIN_BITS}..{MAX_BITS} "
                            f"(set precision.{side}=null to keep it float)")
        if not isinstance(node.get("symmetric"), bool):
            raise UserError(f"precision.{side}.symmetric={node.get('symmetric')!r} must be true or false")
        if node.get("granularity") not in GRANULARITIES:
            raise UserError(f"precision.{side}.granularity={node.get('granularity')!r} must be one of {GRANULARITIES}")
    for name in ("num_samples", "batch_size"):
        value = cfg.calibration.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"calibration.{name}={value!r} must be a positive integer")
    get_object(cfg.task._target_).check_options(cfg.task)  # e.g. the ASR task's fitness_loss
    if cfg.calibration.weights not in WEIGHT_CLIPS:
        raise UserError(f"calibration.weights={cfg.calibration.weights!r} must be one of {sorted(WEIGHT_CLIPS)}")
    if cfg.precision.activation is not None:
        scope = scope_of(cfg)  # checks every role and override
        unknown = {r.calibrator for r in scope.roles.values() if r.calibrator is not None} - set(BY_NAME)
        if unknown:
            raise UserError(f"scope {scope.name}: unknown role calibrators {sorted(unknown)}; use null or one of {sorted(BY_NAME)}")


def scope_of(cfg: DictConfig) -> Scope:
    """The run's :class:`~esc.quant.scope.Scope`, its ``activation`` bits resolved from the precision."""
    bits = None if cfg.precision.activation is None else int(cfg.precision.activation.bits)
    return build_scope(OmegaConf.to_container(cfg.scope, resolve=True), bits)


def prepare(cfg: DictConfig):
    """Seed, set threads, build the model bundle and the task (data prepared for this model)."""
    seed_everything(int(cfg.seed))
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    bundle = build(cfg.model)
    check_weights(bundle.model, bundle.name)
    task = build(cfg.task)
    task.prepare(bundle)
    return bundle, task


def check_weights(model: torch.nn.Module, name: str) -> None:
    """Raise a :class:`~esc.core.errors.UserError` naming the first parameter or buffer that holds NaN/Inf."""
    for pname, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"model {name}: weight {pname} holds NaN/Inf; its checkpoint is damaged: rebuild it "
                            "(make models) or check the training run that wrote it")


def fp32_metrics(cfg: DictConfig, axes: dict[str, Any], task, bundle, weights: str) -> dict[str, float]:
    """FP32 metrics of the model on the task, cached per model config, ``weights`` fingerprint, task
    config without its ``calibration_options`` (so e.g. another ESC fitness reuses them), data content and
    seed under ``paths.cache``."""
    evaluated = {k: v for k, v in axes["task"].items() if k not in task.calibration_options}
    key = run_key({"model": axes["model"], "weights": weights, "task": evaluated, "data": task.data_hashes,
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


def quantize(cfg: DictConfig, bundle: ModelBundle, float_model: torch.nn.Module, data: CalibrationData) -> QuantizedModel:
    """Insert the scope's quantizers into ``float_model`` (one quantizer per tensor when the scope
    asks, traced on one calibration sample) and calibrate the weights."""
    scope = scope_of(cfg)
    qmodel = quantize_model(float_model, weight=quant_spec(cfg.precision.weight), activation=quant_spec(cfg.precision.activation),
                            scope=scope, head=bundle.head)
    if scope.one_quantizer_per_tensor and qmodel.all_activation_quantizers:
        groups = qmodel.share_quantizers(lambda: data.forward(qmodel, take_batch(data.batches[0], 1)))
        log.info("Scope %s: %d activation quantizers (%d tensors read by several slots quantized once)",
                 scope.name, len(qmodel.all_activation_quantizers), len(groups))
    if scope.float_prefix:
        if not bundle.prefix_modules:
            raise UserError(f"scope.float_prefix=true, but model {bundle.name} declares no prompt prefix (prefix_modules); "
                            "use it with Whisper, or set scope.float_prefix=false")
        qmodel.prefix_quantizers = [n for n in qmodel.all_activation_quantizers if matches(n.rpartition(".")[0], bundle.prefix_modules)]
        log.info("Float prompt prefix: %d decoder quantizers skip the prompt positions", len(qmodel.prefix_quantizers))
    if cfg.precision.weight is not None:
        calibrate_weights(qmodel, cfg.calibration.weights)
    return qmodel


def run_share(qmodel: QuantizedModel) -> list[str]:
    """Names of the activation quantizers the run's calibrator sets (the scope fixes no calibrator for them)."""
    return [n for n, q in qmodel.all_activation_quantizers.items() if q.calibrator is None]


def stage_cache(cfg: DictConfig, stage: str, axes: dict[str, Any], weights: str, data: dict[str, str], **more: Any) -> Path:
    """``<paths.cache>/<stage>/<key>.pt`` of a cached stage, keyed by the run axes every such stage depends
    on (model, task, precision, scope, calibration, seed) plus ``more``, the float model's ``weights``
    fingerprint and the ``data`` hashes."""
    key = run_key({**{k: axes[k] for k in ("model", "task", "precision", "scope", "calibration", "seed")}, **more,
                   "weights": weights, "data": data})
    return Path(cfg.paths.cache) / stage / f"{key}.pt"


def calibration_path(cfg: DictConfig, axes: dict[str, Any], ptq_stage: str, weights: str, data: dict[str, str]) -> Path:
    """Cache file of an activation calibration, keyed by everything it depends on: the run axes
    without an "after" PTQ method, the float model's ``weights`` fingerprint and the ``data`` hashes."""
    return stage_cache(cfg, "calibration", axes, weights, data, calibrator=axes["calibrator"],
                       ptq=axes["ptq"] if ptq_stage == "before" else "none")


def transform_path(cfg: DictConfig, axes: dict[str, Any], weights: str, data: dict[str, str]) -> Path:
    """Cache file of a "before" PTQ method's result, keyed like the calibration without the calibrator: the
    method sees only the float model (``weights``) and the calibration clips (``data``), so runs differing
    only in the calibrator share one."""
    return stage_cache(cfg, "ptq_before", axes, weights, data, ptq=axes["ptq"])


def module_tree(model: torch.nn.Module) -> tuple[list, dict]:
    """The module paths and classes of ``model`` and the shapes of its state dict."""
    return ([(n, type(m).__qualname__) for n, m in model.named_modules()],
            {k: tuple(v.shape) for k, v in model.state_dict().items()})


def apply_before(ptq, float_model: torch.nn.Module, data: CalibrationData, path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of ``float_model`` transformed by the "before" PTQ method ``ptq``, or restored from ``path``
    when an identical earlier run cached it; returns the model and ``{"seconds", "cached"}`` (the seconds of
    the method itself). A method that changes only tensor values (same module tree and state-dict shapes,
    e.g. HyQ, SmoothQuant, RepQ-ViT) is cached as the tensors it changed; one that replaces modules
    (rotation, DiTAS's low-rank branch) runs again in every run."""
    model = copy.deepcopy(float_model)
    if path.is_file():
        cached = load_plain(path, "delete it and rerun to apply the PTQ method again")
        unexpected = model.load_state_dict(cached["changed"], strict=False).unexpected_keys
        if unexpected:
            raise UserError(f"{path}: cached PTQ result names tensors the model lacks ({unexpected[:3]}); delete it and rerun")
        log.info("PTQ %s restored from an identical earlier run (%s; it took %.1f s)", ptq.name, path, cached["seconds"])
        return model, {"seconds": cached["seconds"], "cached": True}
    tree = module_tree(model)
    start = time.perf_counter()
    with torch.random.fork_rng():  # later stages see the same global RNG whether the result is cached or not
        ptq.apply(model, data)
    seconds = time.perf_counter() - start
    if module_tree(model) == tree:
        original = float_model.state_dict()
        changed = {k: v for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
        save_checkpoint({"changed": changed, "seconds": seconds}, path)
    else:
        log.info("PTQ %s replaces modules: its result is not cached", ptq.name)
    return model, {"seconds": seconds, "cached": False}


def calibrate(cfg: DictConfig, qmodel: QuantizedModel, data: CalibrationData, task, path: Path) -> dict[str, Any]:
    """Calibrate every activation quantizer, or restore the grids and scales of an identical earlier
    calibration cached at ``path`` (runs differing only in an "after" PTQ method share one).

    Order: unsigned grids for non-negative inputs (when the precision asks); then each role's fixed
    calibrator (e.g. max) on its quantizers, with every other activation in float; then the run's
    calibrator on the remaining quantizers, with the fixed ones quantized (so ESC's fitness sees
    the whole quantized model). Seconds, forward passes and history are those of the run's calibrator.
    """
    if path.is_file():
        cached = load_plain(path, "delete it and rerun to calibrate again")
        qmodel.load_activation_state(cached["state"])  # grids (signed/unsigned) included
        log.info("Activation scales from an identical earlier calibration (%s; it took %.1f s)", path, cached["result"]["seconds"])
        return {**cached["result"], "cached": True}
    if cfg.precision.activation.get("unsigned_nonnegative", False):
        unsigned = use_unsigned_for_nonnegative(qmodel, data)
        log.info("%d non-negative activations get an unsigned grid: %s", len(unsigned), ", ".join(unsigned))
    fixed: dict[str, list[str]] = defaultdict(list)
    for name, q in qmodel.all_activation_quantizers.items():
        if q.calibrator is not None:
            fixed[q.calibrator].append(name)
    with qmodel.quant_state(activations=False):
        for name, members in fixed.items():
            log.info("Calibrating %d activation quantizers with %s (fixed by the scope)", len(members), name)
            with qmodel.selecting(members):
                BY_NAME[name]().calibrate(qmodel, data)
    own = run_share(qmodel)
    calibrator = build(cfg.calibrator)
    if hasattr(calibrator, "state_path"):  # ESC: a killed search resumes from its last saved generation
        calibrator.state_path = path.with_suffix(".esc-state.pt")
    if cfg.calibration.monitor_every and hasattr(calibrator, "monitor"):  # ESC: test metric along the search
        calibrator.monitor_every = int(cfg.calibration.monitor_every)
        calibrator.monitor = lambda: task.evaluate(qmodel)[task.metric]
    log.info("Calibrating %d activation quantizers with %s on %d samples", len(own), type(calibrator).__name__, data.num_samples)
    with qmodel.selecting(own):
        res = calibrator.calibrate(qmodel, data) if own else None
    result = {"seconds": res.seconds if res else 0.0, "forward_passes": res.forward_passes if res else 0,
              "history": res.history if res else {}, "timings": res.timings if res else {}}
    save_checkpoint({"state": qmodel.activation_state(), "result": result}, path)
    return {**result, "cached": False}


def export_path(cfg: DictConfig, key: str) -> Path | None:
    """Where run ``key`` writes its ONNX QDQ export: ``<export>/<key>.onnx``; ``None`` when ``export`` is
    unset or the precision quantizes nothing."""
    if not cfg.get("export") or (cfg.precision.weight is None and cfg.precision.activation is None):
        return None
    return Path(cfg.export) / f"{key}.onnx"


def execute(cfg: DictConfig, axes: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration and return its result row (without provenance); ``stage_seconds`` times
    each stage (build, fp32, calibration_data, ptq, quantize, calibrate, level_utilisation, evaluate)."""
    timer = StageTimer()
    log.info("Building model %s and task %s", component_name(axes["model"]), component_name(axes["task"]))
    with timer("build"):
        bundle, task = prepare(cfg)
        weights = weights_fingerprint(bundle.model)
    with timer("fp32"):
        fp = fp32_metrics(cfg, axes, task, bundle, weights)
    row: dict[str, Any] = {"fp32_metrics": fp, "weights_fingerprint": weights, "data_hashes": dict(task.data_hashes),
                           "calib_seconds": 0.0, "calib_timings": {}, "calibration_cached": False, "ptq_seconds": 0.0, "ptq_cached": False, "forward_passes": 0,
                           "n_act_quantizers": 0, "n_weight_quantizers": 0, "calib_samples": 0, "history": {}, "quantizers": [],
                           "stage_seconds": timer.seconds}
    row["revisions"] = {**bundle.revisions, **task.revisions}  # hub commits of the model and data sets (empty offline)
    row["skipped_files"] = list(task.skipped_files)  # undecodable files left out (task.skip_bad_files)
    if cfg.precision.weight is None and cfg.precision.activation is None:
        return {**row, "metrics": fp, "task_obj": task}

    with timer("calibration_data"):
        data = task.calibration_data(int(cfg.calibration.num_samples), int(cfg.calibration.seed))
    ptq = build(cfg.ptq)
    float_model = bundle.model
    if ptq.stage == "before":
        log.info("PTQ %s on the float model", ptq.name)
        with timer("ptq"):
            float_model, before = apply_before(ptq, float_model, data, transform_path(cfg, axes, weights, task.data_hashes))
        row.update(ptq_seconds=before["seconds"], ptq_cached=before["cached"])
    with timer("quantize"):
        qmodel = quantize(cfg, bundle, float_model, data)
    if cfg.precision.activation is not None:
        cache = calibration_path(cfg, axes, ptq.stage, weights, task.data_hashes)
        with timer("calibrate"):
            result = calibrate(cfg, qmodel, data, task, cache)
        row.update(calib_seconds=result["seconds"], forward_passes=result["forward_passes"], history=result["history"],
                   calib_timings=result.get("timings", {}), calibration_cached=result["cached"])
    if ptq.stage == "after" and ptq.name != "none":
        log.info("PTQ %s on the calibrated model", ptq.name)
        with timer("ptq"):
            ptq.apply(qmodel, data)
        row["ptq_seconds"] = timer.seconds["ptq"]
    with timer("level_utilisation"):
        qmodel.measure_level_utilisation(data.batches, data.forward)
    log.info("Evaluating the quantized model")
    with timer("evaluate"):
        metrics = task.evaluate(qmodel)
    key = run_key(axes)
    onnx_path = export_path(cfg, key)
    if onnx_path is not None:
        from esc.export.onnx import example_inputs, export_onnx  # onnx/onnxruntime load only when a run exports

        with timer("export"):
            export_onnx(qmodel, example_inputs(qmodel, lambda: data.forward(qmodel, data.batches[0])), onnx_path,
                        {"row_key": key, "axes": axes, **provenance()})
        log.info("ONNX QDQ export written to %s", onnx_path)
    return {**row, "metrics": metrics, "eval_seconds": timer.seconds["evaluate"],
            "calib_samples": data.num_samples,
            "n_act_quantizers": sum(q.enabled for q in qmodel.all_activation_quantizers.values()),
            "n_weight_quantizers": sum(q.enabled for q in qmodel.weight_quantizers.values()),
            "quantizers": qmodel.summary(), "task_obj": task}
