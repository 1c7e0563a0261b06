"""Parity and speed of the calibrated models executed as ONNX QDQ by onnxruntime (int8, CPU).

Usage: ``python benchmarks/deploy.py [--pairs offline_kws,offline_tagging,offline_whisper_kws]
[--calibrators minmax,percentile,entropy,mse,esc] [--precision w8a8] [--threads 1]
[--latency-clips 32] [--repeats 3] [--out results/deploy]``.

For each model/task pair (``conf/pair/<pair>.yaml``, as in ``make demo``) and calibrator, one run of
:func:`esc.run.run` (study ``deploy``, ``torch_threads=1``) with ``export=experiments/export`` gives
the FP32 torch metric, the fake-quant metric, its per-clip results and the ONNX QDQ file (resumable:
a finished row with its export is not recomputed; calibrations are cached). Then, through the
same ``task.evaluate``:

* **int8 metric**: the exported file run by onnxruntime (:class:`esc.export.onnx.OnnxRuntimeModel`);
* **ORT FP32 metric**: the float model exported to ONNX (no quantizers) and run by onnxruntime;
* **agreement**: fraction of test clips whose prediction is the same for the fake-quant and the
  int8 model: the arg-max class for ``kws`` (``per_sample["prediction"]``) and the arg-max over
  the task's classes of the clip scores for ``tagging`` (``per_sample["scores"]``);
* **latency**: on the same ``--latency-clips`` calibration-pool clips, one clip per call (batch 1),
  ``--threads`` onnxruntime intra-op threads, after one warm-up pass each: the FP32 and int8
  sessions alternate clip by clip (the first alternates too), ``--repeats`` rounds; reported is
  the median milliseconds per clip of each and the ratio FP32 / int8 (the speed-up).

ESC runs only where its calibration is already cached (ESC takes minutes to hours a run here);
otherwise its line says so. The ops onnxruntime runs on integers and in float (:func:`op_kinds`
of the optimized int8 graph of the first calibrator) go to ``ops.md``. Writes ``table.md``,
``table.csv`` and ``ops.md`` to ``--out``, headed by the command, commit, machine and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate

from esc.config import compose, project_root
from esc.core.bundle import weights_fingerprint
from esc.export.onnx import OnnxRuntimeModel, example_inputs, export_onnx, op_kinds
from esc.pipeline import calibration_path, export_path, run_axes
from esc.results import git_state, row_path, run_key
from esc.run import run

log = logging.getLogger("deploy")


def predictions(per_sample: dict) -> np.ndarray:
    """The per-clip prediction of a task's ``per_sample`` results (see the module docstring)."""
    if "prediction" in per_sample:
        return np.asarray(per_sample["prediction"])
    return np.asarray(per_sample["scores"]).argmax(axis=1)


def latency_ms(models: dict[str, OnnxRuntimeModel], clips: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds per clip (batch 1) of each model on ``clips``, models interleaved clip by clip."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        models[n](clips[:1])
    for r in range(repeats):
        for i in range(len(clips)):
            order = names if (r + i) % 2 == 0 else names[::-1]
            for n in order:
                start = time.perf_counter()
                models[n](clips[i:i + 1])
                times[n].append(1e3 * (time.perf_counter() - start))
    return {n: statistics.median(t) for n, t in times.items()}


def esc_is_cached(cfg, bundle, task) -> bool:
    """True when the ESC calibration of ``cfg`` is in the calibration cache (ESC is not run here otherwise)."""
    ptq_stage = instantiate(cfg.ptq).stage
    return calibration_path(cfg, run_axes(cfg), ptq_stage, weights_fingerprint(bundle.model), task.data_hashes).is_file()


def deploy_pair(pair: str, calibrators: list[str], args) -> tuple[list[dict], str]:
    """The table lines of one model/task pair, and its ops section (Markdown)."""
    base = [f"+pair={pair}", f"precision={args.precision}", "study=deploy", "torch_threads=1",
            f"export={project_root()}/experiments/export"]
    cfg0 = compose(base + [f"calibrator={calibrators[0]}"])
    torch.set_num_threads(1)
    bundle, task = instantiate(cfg0.model), instantiate(cfg0.task)
    task.prepare(bundle)
    data = task.calibration_data(args.latency_clips, 0)
    clips = example_inputs(bundle.model, lambda: data.forward(bundle.model, data.batches[0]), batch=args.latency_clips)
    fp32_path = export_onnx(bundle.model, clips[0][:2], Path(cfg0.export) / f"fp32-{weights_fingerprint(bundle.model)}.onnx",
                            {"model": bundle.name})
    fp32_ort = OnnxRuntimeModel(fp32_path, threads=args.threads)
    fp32_ort_metric = task.evaluate(fp32_ort)[task.metric]
    lines, ops = [], ""
    for calibrator in calibrators:
        cfg = compose(base + [f"calibrator={calibrator}"])
        line = {"pair": pair, "model": bundle.name, "calibrator": calibrator, "precision": args.precision, "metric": task.metric}
        if calibrator == "esc" and not esc_is_cached(cfg, bundle, task):
            lines.append({**line, "note": "not run: no cached ESC calibration"})
            log.info("%s esc: no cached calibration, skipped", pair)
            continue
        row = run(cfg)
        key = run_key(run_axes(cfg))
        onnx_path = export_path(cfg, key)
        optimized = onnx_path.with_suffix(".ort.onnx")
        int8_ort = OnnxRuntimeModel(onnx_path, threads=args.threads, optimized_path=optimized)
        int8 = task.evaluate(int8_ort)
        fake = np.load(row_path(Path(cfg.paths.rows) / cfg.study, key).with_suffix(".samples.npz"))
        fake_pred = predictions({k.removeprefix("quantized/"): fake[k] for k in fake.files if k.startswith("quantized/")})
        agree = predictions(int8["per_sample"]) == fake_pred
        ms = latency_ms({"fp32": fp32_ort, "int8": int8_ort}, clips[0], args.repeats)
        line.update(row_key=key, fp32_torch=row["fp32"], fake_quant=row["quantized"],
                    ort_int8=int8[task.metric], ort_fp32=fp32_ort_metric, gap=int8[task.metric] - row["quantized"],
                    agreement=float(agree.mean()), disagreeing=int((~agree).sum()), clips=int(agree.size),
                    ms_fp32=ms["fp32"], ms_int8=ms["int8"], speedup=ms["fp32"] / ms["int8"], threads=args.threads)
        lines.append(line)
        log.info("%s", json.dumps(line))
        if not ops:
            kinds = op_kinds(optimized, [clips[0][:2]])
            ops = (f"## {row['model']} ({pair}, {calibrator})\n\n"
                   + "\n".join(f"- {kind}: " + (", ".join(f"{op} x{n}" for op, n in c.most_common()) or "none")
                               for kind, c in kinds.items()) + "\n")
    return lines, ops


def markdown(df: pd.DataFrame) -> str:
    """The table in Markdown (metrics with 4 significant digits, agreement in %, latency in ms)."""
    cols = {"model": "model", "calibrator": "calibrator", "metric": "metric", "fp32_torch": "FP32 torch",
            "ort_fp32": "FP32 ORT", "fake_quant": "fake-quant", "ort_int8": "ORT int8", "gap": "int8 - fake",
            "agreement": "agreement", "disagreeing": "disagreeing clips", "ms_fp32": "ms FP32", "ms_int8": "ms int8",
            "speedup": "speed-up", "note": "note"}
    df = df.reindex(columns=[c for c in cols if c in df.columns])
    fmt = {"agreement": lambda v: f"{100 * v:.2f}%", "speedup": lambda v: f"{v:.2f}x",
           "disagreeing": lambda v: f"{int(v)}", "ms_fp32": lambda v: f"{v:.2f}", "ms_int8": lambda v: f"{v:.2f}"}
    lines = ["| " + " | ".join(cols[c] for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            cells.append("" if v is None or (isinstance(v, float) and np.isnan(v)) else
                         fmt[c](v) if c in fmt else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="offline_kws,offline_tagging,offline_whisper_kws")
    parser.add_argument("--calibrators", default="minmax,percentile,entropy,mse,esc")
    parser.add_argument("--precision", default="w8a8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency-clips", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/deploy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit, diff = git_state()
    head = (f"Command: `python benchmarks/deploy.py {shlex.join(sys.argv[1:] if argv is None else argv)}`  \n"
            f"Commit: {commit}{f' (diff sha256 {diff})' if diff else ''}  \n"
            f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
            f"onnxruntime {__import__('onnxruntime').__version__}, {args.threads} onnxruntime thread(s)  \n"
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n")
    lines, ops = [], []
    for pair in args.pairs.split(","):
        pair_lines, pair_ops = deploy_pair(pair, args.calibrators.split(","), args)
        lines += pair_lines
        ops.append(pair_ops)
        df = pd.DataFrame(lines)  # written after every pair: a killed benchmark keeps what it finished
        df.to_csv(out / "table.csv", index=False)
        (out / "table.md").write_text(f"# ONNX QDQ parity and speed ({args.precision})\n\n" + head + markdown(df))
        (out / "ops.md").write_text("# Ops in onnxruntime's optimized int8 graphs\n\n" + head + "\n".join(ops))
    print(markdown(pd.DataFrame(lines)))


if __name__ == "__main__":
    main()
