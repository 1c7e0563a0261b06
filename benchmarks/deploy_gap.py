"""Where fake-quant and onnxruntime int8 predictions part: one model/calibrator, three steps apart.

Usage: ``python benchmarks/deploy_gap.py +pair=offline_tagging calibrator=minmax [override ...]``
(after ``benchmarks/deploy.py`` ran that configuration: it needs the cached calibration and the
export of ``esc.run``'s ``export=experiments/export``). Through the same ``task.evaluate``:

1. **fake**: the fake-quant model (esc's grids: symmetric signed ``[-127, 127]``);
2. **grids**: the same model with every quantizer replaced by its ONNX stand-in
   (:func:`esc.export.onnx.export_mode`: the exported grids, int8 ``[-128, 127]``, in torch float);
3. **unfused**: the exported file run by onnxruntime with basic graph optimizations only
   (``ORT_ENABLE_BASIC``: no QDQ fusion, so QuantizeLinear/DequantizeLinear and float kernels);
4. **int8**: the exported file with all optimizations (fused integer kernels), as in the table.

Prints the prediction agreement and the metric of each neighbouring pair: 1-2 isolates the
grid range, 2-3 the float arithmetic of torch vs onnxruntime kernels (summation order) feeding
the next rounding, 3-4 the integer kernels' requantization. Calibration: restored from the cache
exactly as ``esc.run`` restores it (a missing cache is an error: run the configuration first).
"""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import torch
from hydra.utils import instantiate
from torch import nn

from esc.config import compose, project_root
from esc.core.bundle import weights_fingerprint
from esc.export.onnx import OnnxRuntimeModel, export_mode
from esc.core.files import load_plain
from esc.pipeline import calibration_path, export_path, prepare, quantize, run_axes
from esc.results import run_key

from deploy import predictions


class ExportedGrids(nn.Module):
    """``qmodel`` run with its quantizers' ONNX stand-ins (step 2)."""

    def __init__(self, qmodel: nn.Module) -> None:
        super().__init__()
        self.qmodel = qmodel

    def forward(self, *inputs):
        with export_mode(self.qmodel):
            return self.qmodel(*inputs)


def main(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = compose(["precision=w8a8", "study=deploy", "torch_threads=1", f"export={project_root()}/experiments/export", *overrides])
    bundle, task = prepare(cfg)
    axes = run_axes(cfg)
    data = task.calibration_data(int(cfg.calibration.num_samples), int(cfg.calibration.seed))
    qmodel = quantize(cfg, bundle, bundle.model, data)  # the run's quantizers, weights calibrated
    cache = calibration_path(cfg, axes, instantiate(cfg.ptq).stage, weights_fingerprint(bundle.model), task.data_hashes)
    qmodel.load_activation_state(load_plain(cache, "run benchmarks/deploy.py for this configuration first")["state"])
    path = export_path(cfg, run_key(axes))
    steps = {"fake": qmodel, "grids": ExportedGrids(qmodel),
             "unfused": OnnxRuntimeModel(path, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
             "int8": OnnxRuntimeModel(path)}
    results = {name: task.evaluate(model) for name, model in steps.items()}
    names = list(steps)
    for a, b in zip(names, names[1:]):
        agree = np.mean(predictions(results[a]["per_sample"]) == predictions(results[b]["per_sample"]))
        print(f"{' '.join(overrides)} | {a} -> {b} | agreement {100 * agree:.2f}% | {task.metric} "
              f"{results[a][task.metric]:.4g} -> {results[b][task.metric]:.4g}")


if __name__ == "__main__":
    main(sys.argv[1:])
