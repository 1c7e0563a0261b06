"""Seconds per PTQ method on a ~0.9M-parameter conv + transformer stand-in with 100 calibration clips.

Usage: ``python benchmarks/ptq_timing.py [--threads 1] [--bits 4] [--clips 100]``. Prints, per
method, the wall and CPU time of ``apply`` and the output MSE to the FP32 model on the calibration clips
(max calibration, per-channel weights, per-tensor activations). Not a test: timings depend on the
machine and its load.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ptq_models import TinyConvTransformer, make_data, max_calibrate  # noqa: E402

from esc.ptq.adaround import AdaRound  # noqa: E402
from esc.ptq.base import NoPTQ  # noqa: E402
from esc.ptq.bias_correction import BiasCorrection  # noqa: E402
from esc.ptq.brecq import BRECQ  # noqa: E402
from esc.ptq.smoothquant import SmoothQuant  # noqa: E402
from esc.quant.model import QuantSpec, quantize_model  # noqa: E402


def main() -> None:
    """Time every PTQ method with its default parameters."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bits", type=int, default=4, help="weight and activation bits")
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--frames", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = TinyConvTransformer(n_mels=64, dim=128, heads=4, ff=512, depth=4, n_classes=35, outlier_channels=4).eval()
    print(f"stand-in: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.clips} clips of [64, {args.frames}], W{args.bits}A{args.bits}, {args.threads} thread(s)")
    data = make_data(args.clips, 50, n_mels=64, frames=args.frames, mean=0.5)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data.batches])
    for method in (NoPTQ(), SmoothQuant(), BiasCorrection(), AdaRound(), BRECQ()):
        fmodel = copy.deepcopy(model)
        seconds = cpu = 0.0
        if method.stage == "before":
            start, start_cpu = time.perf_counter(), time.process_time()
            method.apply(fmodel, data)
            seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        qmodel = quantize_model(fmodel, QuantSpec(args.bits, True, "channel"), QuantSpec(args.bits))
        max_calibrate(qmodel, data)
        if method.stage == "after":
            start, start_cpu = time.perf_counter(), time.process_time()
            method.apply(qmodel, data)
            seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        with torch.no_grad():
            err = float((torch.cat([qmodel(b) for b in data.batches]) - ref).pow(2).mean())
        print(f"{type(method).__name__:15s} wall {seconds:7.2f} s  CPU {cpu:7.2f} s   output MSE to FP32 {err:.4g}", flush=True)


if __name__ == "__main__":
    main()
