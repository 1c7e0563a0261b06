"""Per-layer sensitivity: the metric drop when only one activation quantizer is on.

``python -m esc.analysis.sensitivity --study demo --precision w4a4 --out results/sensitivity/ast_kws.csv
[--max-test-clips 500] [hydra overrides ...]``

Definition. The run config is composed as ``python -m esc.run`` would (``esc.config.compose``, the
Hydra overrides given after the options, plus ``precision=<precision>``); the model and task are
built and prepared from it. The float model is quantized with **activations only** (``bits``
bits, symmetric, per tensor; weights stay float, so the drop is the activation quantizer's own;
``--with-weights`` also quantizes the weights as the precision says, per-channel max). For each
calibrator row of the study with the run's settings (the rows whose keys differ from this
configuration's only in the calibrator: same model, task, precision, scope, PTQ method, calibration
and seed, so pass the overrides the runs used; by default the ``minmax`` and ``esc`` rows), each activation quantizer ``i`` in turn is the only one enabled,
with the symmetric clip ``c_i`` = that row's ``clip_hi`` for quantizer ``i`` (``set_clip_range``) on
the row's grid (unsigned ``[0, 2^b - 1]`` where the row's ``clip_lo`` is 0, as runs with
``precision.activation.unsigned_nonnegative`` give non-negative inputs; signed otherwise),
and the test metric is measured. ``drop = fp32 - metric`` (higher-is-better metrics) or
``metric - fp32`` (lower-is-better), where ``fp32`` is measured on the same test clips with every
activation quantizer off (with ``--with-weights`` that reference has the weights quantized: column
``reference`` says ``weights-only`` instead of ``fp32``). A line ``quantizer = "ALL"`` has every
quantizer on with the row's clips (the interaction of all layers, for comparison with the row's own metric).

CSV columns: model, task, precision, bits, calibrator, row_key, index, quantizer, clip_hi, signed,
metric_name, reference, fp32, metric, drop, loss (the task's mean test loss, when it reports one), test_clips,
looping (ASR: hypotheses at least twice their reference length), role (the quantizer's op role).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import logging
import os
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf, open_dict

from esc.config import compose, project_root
from esc.pipeline import component_name, prepare, quantize, run_axes
from esc.results import read_rows, run_key

log = logging.getLogger("esc.analysis.sensitivity")


def default_rows_dir(study: str) -> Path:
    """``$ESC_ROWS``, else ``results/<study>/rows``, else ``experiments/rows/<study>`` (first that exists)."""
    root = Path(project_root())
    candidates = [Path(os.environ["ESC_ROWS"])] if os.environ.get("ESC_ROWS") else []
    candidates += [root / "results" / study / "rows", root / "experiments" / "rows" / study]
    return next((c for c in candidates if c.exists()), candidates[0])


def setting_key(axes: dict) -> str:
    """The run key of ``axes`` without the calibrator and ``calibration.monitor_every`` (it records ESC's test
    curve, it changes no clip): rows with equal setting keys differ only in how their clips were chosen."""
    out = {k: v for k, v in axes.items() if k != "calibrator"}
    if isinstance(out.get("calibration"), dict):
        out["calibration"] = {k: v for k, v in out["calibration"].items() if k != "monitor_every"}
    return run_key(out)


def candidates(rows: list[dict], calibrators: list[str]):
    """The successful rows of these calibrators that record their run axes."""
    return (r for r in rows if r.get("status") == "ok" and r.get("calibrator") in calibrators and "axes" in r)


def matching_rows(rows: list[dict], axes: dict, calibrators: list[str]) -> dict[str, dict]:
    """One successful row per calibrator whose run axes (model, task, precision, scope, PTQ method,
    calibration, seed) equal ``axes`` up to the calibrator, compared as row keys compare them."""
    want = setting_key(axes)
    out = {}
    for r in candidates(rows, calibrators):
        if setting_key(r["axes"]) == want:
            out.setdefault(r["calibrator"], r)
    return out


def differing_axes(rows: list[dict], axes: dict, calibrators: list[str]) -> list[str]:
    """The axes in which the rows of these calibrators (same model and precision) differ from ``axes``, for error messages."""
    names = set()
    for r in candidates(rows, calibrators):
        if r.get("precision") == axes["precision"].get("name"):
            names |= {k for k in axes if k != "calibrator" and setting_key({k: r["axes"].get(k)}) != setting_key({k: axes[k]})}
    return sorted(names)


def sensitivity(cfg, rows: dict[str, dict], bits: int, with_weights: bool = False) -> pd.DataFrame:
    """The per-quantizer metric drops for each row's clip ranges (see the module docstring)."""
    bundle, task = prepare(cfg)
    qcfg = copy.deepcopy(cfg)  # the rows' quantizers: their scope at ``bits``, weights quantized only if asked
    with open_dict(qcfg):
        qcfg.precision.activation = {"bits": bits, "symmetric": True, "granularity": "tensor"}
        if not with_weights:
            qcfg.precision.weight = None
    qmodel = quantize(qcfg, bundle, bundle.model, task.calibration_data(1, int(cfg.calibration.seed)))
    weight = qcfg.precision.weight
    quantizers = qmodel.all_activation_quantizers
    qmodel.set_quant_state(activations=False)
    qmodel.eval()
    with torch.no_grad():
        fp = task.evaluate(qmodel)
    fp_metric = float(fp[task.metric])
    n_test = len(next(iter(fp["per_sample"].values()))) if fp.get("per_sample") else None
    sign = 1.0 if task.higher_is_better else -1.0
    out = []
    for cal, row in rows.items():
        acts = {q["name"]: q for q in row.get("quantizers", []) if q.get("kind") == "activation"}
        clips = {name: q["clip_hi"] for name, q in acts.items()}
        missing = [n for n in quantizers if n not in clips]
        if missing:
            raise SystemExit(f"row {row['key']} ({cal}) has no clip for quantizers {missing[:3]}...: it was made with another "
                             "model or quantization setting; pass matching overrides")
        signed = {}
        for name, q in quantizers.items():
            # the row's grid: its "signed" field; rows written before that field existed: unsigned iff clip_lo == 0
            signed[name] = acts[name].get("signed", not (acts[name].get("clip_lo", -1.0) >= 0 and clips[name] > 0))
            if q.signed != signed[name]:
                q.set_signed(signed[name])
            q.set_clip_range(torch.tensor(float(clips[name])))
        targets = [(i, name) for i, name in enumerate(quantizers)] + [(-1, "ALL")]
        for i, name in targets:
            for other, q in quantizers.items():
                q.enabled = name == "ALL" or other == name
            with torch.no_grad():
                result = task.evaluate(qmodel)
            metric = float(result[task.metric])
            out.append(dict(model=row["model"], task=row["task"], precision=row["precision"], bits=bits, calibrator=cal,
                            row_key=row["key"], index=i, quantizer=name, clip_hi=clips.get(name, float("nan")),
                            signed=signed.get(name, True),
                            metric_name=task.metric, reference="fp32" if weight is None else "weights-only",
                            fp32=fp_metric, metric=metric, drop=sign * (fp_metric - metric),
                            loss=float(result.get("loss", float("nan"))), test_clips=n_test,
                            looping=result.get("looping"), role=quantizers[name].role if name in quantizers else "all"))
            log.info("%s %-50s %s %.4g (drop %.4g)", cal, name, task.metric, metric, out[-1]["drop"])
        qmodel.set_quant_state(activations=False)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="demo", help="study whose rows give the clip ranges")
    parser.add_argument("--precision", default="w4a4", help="precision of the rows to take clips from")
    parser.add_argument("--rows", type=Path, help="rows folder (default $ESC_ROWS, results/STUDY/rows, experiments/rows/STUDY)")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (e.g. results/sensitivity/ast_kws.csv)")
    parser.add_argument("--calibrators", default="minmax,esc", help="comma-separated calibrators whose rows to use")
    parser.add_argument("--bits", type=int, help="activation bits (default: the precision's activation bits)")
    parser.add_argument("--seed", type=int, help="row seed (default: the config's seed)")
    parser.add_argument("--max-test-clips", type=int, help="evaluate on a fixed subset of this many test clips")
    parser.add_argument("--with-weights", action="store_true", help="also quantize weights as the precision says")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=ast_tiny task=kws_tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    seed = [] if args.seed is None else [f"seed={args.seed}"]
    cfg = compose([f"precision={args.precision}", *args.overrides, *seed])
    if cfg.precision.activation is None:
        raise SystemExit(f"precision {args.precision} quantizes no activations; use e.g. --precision w4a4")
    axes = run_axes(cfg)  # the rows' settings, before the test subset below (which no row depends on)
    if args.max_test_clips is not None:
        if "max_test_clips" not in cfg.task and "max_test_clips" not in inspect.signature(get_object(cfg.task._target_)).parameters:
            raise SystemExit(f"task {component_name(OmegaConf.to_container(cfg.task))} has no max_test_clips parameter; "
                             "drop --max-test-clips")
        with open_dict(cfg):
            cfg.task.max_test_clips = args.max_test_clips
    bits = args.bits or int(cfg.precision.activation.bits)
    rows_dir = args.rows or default_rows_dir(args.study)
    calibrators = args.calibrators.split(",")
    all_rows = read_rows([rows_dir])
    rows = matching_rows(all_rows, axes, calibrators)
    if not rows:
        differ = differing_axes(all_rows, axes, calibrators)
        hint = (f"rows of precision {args.precision} exist but differ in {', '.join(differ)}: pass the overrides those runs used"
                if differ else f"run them first (python -m esc.run precision={args.precision} calibrator=minmax study={args.study} ...)")
        raise SystemExit(f"no {args.calibrators} rows under {rows_dir} with this run's settings; {hint}")
    log.info("clip ranges from %s", {c: r["key"] for c, r in rows.items()})
    df = sensitivity(cfg, rows, bits, args.with_weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False, float_format="%.6g")
    print(f"wrote {args.out} ({len(df)} lines)")
    return df


if __name__ == "__main__":
    main()
