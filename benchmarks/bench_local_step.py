"""ESC's local step on a real model: today's exhaustive grid against the cheaper searches, in one run.

Usage: ``python benchmarks/bench_local_step.py [--model ast_kws] [--precision w4a4] [--clips 100]
[--batch-size 50] [--threads 1] [--repeats 2] [--variants "coarse_fine;coarse_fine,samples=262144"]``.

The model and its calibration clips come from the project config (``model=...``, ``task=kws``,
quantized as ``esc.pipeline.quantize`` does for ESC runs). Variants of
:func:`esc.calibrators.local_step.local_mse_scales`: ``exhaustive`` (all 100 grid candidates, 2 passes;
ESC's default) against each of ``--variants``: a search (``exhaustive`` | ``coarse_fine``) with
integer arguments (``stride``, ``refine``, ``samples``: a row sample of that many elements per
quantizer, 1 pass). The variants and one generation (one
fitness evaluation of a default-size population around the local scales: batched, one by one,
and with ``max_batch="auto"``, whose first call is its probe) are timed interleaved, ``--repeats`` rounds, best of; the table gives each variant's seconds, its speed-up
over ``exhaustive``, its cost in generations, and how far its scales are from the exhaustive
choice in the local step's own objective: the largest, over quantizers, relative excess of the
layer-output MSE on the whole calibration set (:func:`esc.calibrators.local_step.local_output_mse`).
Not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from esc.calibrators.esc import ESCCalibrator
from esc.calibrators.fitness import FitnessEvaluator
from esc.calibrators.local_step import local_mse_scales, local_output_mse
from esc.config import compose
from esc.pipeline import prepare, quantize


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ast_kws")
    p.add_argument("--task", default="kws")
    p.add_argument("--precision", default="w4a4")
    p.add_argument("--clips", type=int, default=100, help="calibration clips")
    p.add_argument("--batch-size", type=int, default=50, help="calibration batch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (best of)")
    p.add_argument("--variants", default="coarse_fine;coarse_fine,samples=262144",
                   help="';'-separated variants besides exhaustive: a search, then ',key=value' arguments of local_mse_scales")
    args = p.parse_args()
    cfg = compose([f"model={args.model}", f"task={args.task}", f"precision={args.precision}", "calibrator=esc",
                   f"calibration.num_samples={args.clips}", f"calibration.batch_size={args.batch_size}"])
    bundle, task = prepare(cfg)
    torch.set_num_threads(args.threads)
    data = task.calibration_data(args.clips, 0)
    qmodel = quantize(cfg, bundle, bundle.model, data)
    n = len(qmodel.activation_quantizers)
    variants: dict[str, dict] = {"exhaustive": {}}
    for spec in filter(None, args.variants.split(";")):
        search, *options = spec.split(",")
        variants[spec] = dict(search=search, **{k: int(v) for k, v in (o.split("=") for o in options)})
    popsize = ESCCalibrator.default_popsize(n)
    evaluators = {"generation": FitnessEvaluator(qmodel, data, "task"),
                  "generation, one by one": FitnessEvaluator(qmodel, data, "task", batched=False),
                  "generation, max_batch=auto": FitnessEvaluator(qmodel, data, "task", max_batch="auto")}
    times: dict[str, list[float]] = {v: [] for v in [*variants, *evaluators]}
    scales: dict[str, torch.Tensor] = {}
    print(f"{args.model}: {n} activation quantizers, {args.clips} clips (batch {args.batch_size}), {args.precision}, "
          f"{args.threads} thread(s), popsize {popsize}, load average {os.getloadavg()[0]:.1f}", flush=True)
    for _ in range(args.repeats):
        for name, kw in variants.items():
            t0 = time.perf_counter()
            scales[name] = local_mse_scales(qmodel, data, **kw)[0]
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
        population = scales["exhaustive"] * torch.exp(0.1 * torch.randn(popsize, n, generator=torch.Generator().manual_seed(0)))
        for name, evaluator in evaluators.items():
            t0 = time.perf_counter()
            evaluator(population)  # the auto evaluator's first call is its probe
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    mse = local_output_mse(qmodel, data, torch.stack([scales[v] for v in variants], dim=1))
    excess = (mse / mse[:, :1] - 1).max(0).values
    best = {v: min(t) for v, t in times.items()}
    print("\n| variant | seconds | speed-up | generations | max rel. output-MSE excess | scales changed |\n|---|---|---|---|---|---|")
    for i, v in enumerate(variants):
        changed = int((scales[v] != scales["exhaustive"]).sum())
        print(f"| {v} | {best[v]:.2f} | {best['exhaustive'] / best[v]:.2f}x | {best[v] / best['generation']:.2f} | "
              f"{float(excess[i]):.2e} | {changed}/{n} |")
    print(f"| one generation ({popsize} x {args.clips} clips, batched) | {best['generation']:.2f} | | 1 | | |")
    auto = evaluators["generation, max_batch=auto"]
    print(f"\ngeneration seconds, best of {args.repeats}: batched {best['generation']:.2f}, one by one "
          f"{best['generation, one by one']:.2f}, auto {best['generation, max_batch=auto']:.2f} (probe in round 1; chose "
          f"{auto.chunk} candidates per forward; probe seconds per candidate "
          + ", ".join(f"{c}: {t:.3f}" for c, t in auto.probe.items()) + ")")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
