"""Speed of ESC calibration on a small transformer audio classifier (a stand-in for AST keyword spotting).

Usage: ``python benchmarks/bench_esc.py [--generations 20] [--clips 100] [--threads 2] [--bits 4]
[--batch-size 25] [--results benchmarks/RESULTS.md]``.

Model: ``StandInAST`` (random weights, ~0.8M parameters): 64x101 log-mel -> Conv2d patch embedding
(16x16 patches, stride 16x10: 4x9 = 36 tokens of dim 128) + positional embedding -> 4 pre-LN
transformer blocks (4 heads, attention products via ``esc.quant.modules.MatMul``, MLP 512) -> LayerNorm
-> mean pool -> 35-class head. Calibration data: ``--clips`` random log-mel-like clips with the FP32
model's predictions as labels and per-sample cross-entropy as the task loss. Quantization: per-channel
weights, per-tensor activations, ``--bits`` for both.

Measured (wall time, ``--threads`` torch threads; a shared machine makes them noisy, so the small
timings are the best of ``--repeats`` interleaved runs):

* calibration time per calibrator (minmax / percentile / entropy / mse when importable; ESC with
  ``--generations`` generations and projected to 100: local step + (the rest) x 100 / generations);
* ESC's local step and seconds per generation;
* ESC fitness evaluations per second, one batched pass for the whole population vs one pass per
  candidate (target >= 2x) vs ``max_batch="auto"`` (its probe run first, untimed);
* ESC overhead over the bare forward passes it needs, measured inside the same run (the time spent in
  ``data.forward`` during the fitness evaluations, plus an estimate of the local step's 2 FP passes):
  search overhead (fitness loss, batch repeat, CMA-ES) and total overhead including the local step's
  grid search (target <= 10%);
* ESC time / MSE calibrator time;
* inference time of the fake-quantized model (calibrated, W``bits``A``bits``) vs the FP32 model on the
  calibration clips (target <= 1.5x).

Results are printed as a table and appended to ``--results`` (Markdown) with the command, machine
and date. Not a test.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import platform
import shlex
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.calibrators.esc import ESCCalibrator
from esc.calibrators.fitness import FitnessEvaluator
from esc.calibrators.local_step import local_mse_scales
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.modules import MatMul


class Block(nn.Module):
    """Pre-LN transformer block with MatMul attention products."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.qk, self.av = MatMul("qk"), MatMul("pv")
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(self.qk(q, k.transpose(-1, -2)) * (d // self.heads) ** -0.5, dim=-1)
        h = h + self.proj(self.av(att, v).transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class StandInAST(nn.Module):
    """Patch-embedding transformer classifier on ``[B, 64, 101]`` log-mel features (random weights)."""

    def __init__(self, mels: int = 64, frames: int = 101, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp: int = 512, classes: int = 35, patch: tuple[int, int] = (16, 16), stride: tuple[int, int] = (16, 10),
                 logit_gain: float = 8.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(1, dim, patch, stride)
        tokens = ((mels - patch[0]) // stride[0] + 1) * ((frames - patch[1]) // stride[1] + 1)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():  # confident predictions, as a trained classifier would make
            self.head.weight.mul_(logit_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x.unsqueeze(1)).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def make_data(model: nn.Module, clips: int, batch_size: int, seed: int = 0) -> CalibrationData:
    """Random log-mel-like clips (smooth in time, a few loud frames), FP32 pseudo-labels, CE loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(clips, 64, 101, generator=g)
    x = F.avg_pool1d(x, 5, 1, 2) * 2 + 0.3 * torch.randn(clips, 64, 101, generator=g)
    loud = torch.rand(clips, 1, 101, generator=g) < 0.02
    x = torch.where(loud, x * 6, x)
    with torch.no_grad():
        labels = model(x).argmax(-1)
    batches = [(x[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, clips, batch_size)]
    return CalibrationData(batches, forward=lambda m, b: m(b[0]),
                           loss=lambda out, b: F.cross_entropy(out, b[1], reduction="none"))


def interleaved(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Smallest wall time of each function over ``repeats`` interleaved rounds (fair under drifting load)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generations", type=int, default=20, help="ESC generations to run (projected to 100)")
    parser.add_argument("--clips", type=int, default=100, help="calibration clips")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--batch-size", type=int, default=25, help="calibration batch size")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the small timings (best of)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"),
                        help="Markdown file the results are appended to ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model = StandInAST().eval()
    params = sum(p.numel() for p in model.parameters())
    data = make_data(model, args.clips, args.batch_size)
    spec = dict(weight=QuantSpec(args.bits, True, "channel"), activation=QuantSpec(args.bits, True, "tensor"))
    n_act = len(quantize_model(model, **spec).activation_quantizers)
    popsize = ESCCalibrator.default_popsize(n_act)
    rows: list[tuple[str, str]] = []
    print(f"StandInAST: {params / 1e6:.2f}M parameters, {n_act} activation quantizers, {args.clips} clips "
          f"(batch {args.batch_size}), W{args.bits}A{args.bits}, {args.threads} threads, ESC popsize {popsize}")

    # ------------------------------------------------------------- statistic calibrators
    calib_times: dict[str, float] = {}
    for module, cls in (("minmax", "MinMaxCalibrator"), ("percentile", "PercentileCalibrator"),
                        ("entropy", "EntropyCalibrator"), ("mse", "MSECalibrator")):
        try:
            calibrator = getattr(importlib.import_module(f"esc.calibrators.{module}"), cls)()
        except (ImportError, AttributeError) as err:
            print(f"  {module}: not importable ({err})")
            continue
        qmodel = quantize_model(model, **spec)
        t = time.perf_counter()
        calibrator.calibrate(qmodel, data)
        calib_times[module] = time.perf_counter() - t
        rows.append((f"calibration time: {module}", f"{calib_times[module]:.2f} s"))

    # ------------------------------------------------------------------------- ESC run
    qmodel = quantize_model(model, **spec)
    esc = ESCCalibrator(generations=args.generations, progress=True)
    result = esc.calibrate(qmodel, data)
    tm = esc.timings
    gens = max(args.generations, 1)
    # projection: the local step is paid once, everything else scales with the generations
    projected = tm["local"] + (tm["total"] - tm["local"]) * 100 / gens
    rows.append((f"calibration time: esc, {args.generations} generations (measured)", f"{tm['total']:.1f} s"))
    rows.append(("calibration time: esc, 100 generations (projected)", f"{projected:.1f} s"))
    rows.append(("  esc local step (2 passes + grid errors)", f"{tm['local']:.1f} s"))
    rows.append(("  esc seconds per generation (all but the local step)", f"{(tm['total'] - tm['local']) / gens:.2f} s"))
    rows.append(("  esc fitness evaluations", f"{tm['fitness']:.1f} s ({result.forward_passes} forward passes counted)"))
    rows.append(("  esc bare model forwards inside them", f"{tm['forward']:.1f} s"))
    rows.append(("  esc CMA-ES + bookkeeping", f"{tm['search_overhead']:.2f} s"))
    rows.append(("  esc fitness local -> final", f"{result.history['local_fitness'][0]:.4f} -> {result.history['final_fitness'][0]:.4f}"))

    # ----------------------------------------------------- fitness evals/s, batched vs one by one
    s_local, _ = local_mse_scales(qmodel, data)
    g = torch.Generator().manual_seed(1)
    population = s_local * torch.exp(0.1 * torch.randn(popsize, n_act, generator=g))
    batched = FitnessEvaluator(qmodel, data, "task", batched=True)
    single = FitnessEvaluator(qmodel, data, "task", batched=False)
    auto = FitnessEvaluator(qmodel, data, "task", max_batch="auto")
    auto(population)  # the probe (first population), not timed here
    t_batched, t_single, t_auto = interleaved([lambda: batched(population), lambda: single(population),
                                               lambda: auto(population)], args.repeats)
    eps_b, eps_s, eps_a = popsize / t_batched, popsize / t_single, popsize / t_auto
    rows.append(("fitness evals/s batched (one pass per population)", f"{eps_b:.2f}"))
    rows.append(("fitness evals/s one by one", f"{eps_s:.2f}"))
    rows.append((f"fitness evals/s max_batch=auto (chose {auto.chunk} candidates per forward)", f"{eps_a:.2f}"))
    rows.append(("batched gain (target >= 2x)", f"{eps_b / eps_s:.2f}x"))
    rows.append(("auto gain over one by one", f"{eps_a / eps_s:.2f}x"))

    # ------------------------------------ overhead over the bare forwards ESC needs (same run)
    # bare forwards: those inside the fitness evaluations, plus the local step's 2 FP passes
    per_eval = tm["forward"] / max(result.forward_passes - 2, 1)  # task fitness: passes = 2 (local) + evaluations
    bare = tm["forward"] + 2 * per_eval
    search_overhead = (tm["total"] - tm["local"]) / tm["forward"] - 1
    overhead = tm["total"] / bare - 1
    bare_100 = tm["forward"] * 100 / gens + 2 * per_eval
    overhead_100 = projected / bare_100 - 1
    rows.append(("bare forwards per generation", f"{tm['forward'] / gens:.2f} s"))
    rows.append(("ESC search overhead over its bare forwards (fitness loss, repeat, CMA-ES)", f"{100 * search_overhead:.1f}%"))
    rows.append((f"ESC total overhead incl. local step, {args.generations} gen (target <= 10%)", f"{100 * overhead:.1f}%"))
    rows.append(("ESC total overhead incl. local step, 100 gen (projected)", f"{100 * overhead_100:.1f}%"))
    if "mse" in calib_times:
        rows.append(("ESC time / MSE time, measured", f"{tm['total'] / calib_times['mse']:.1f}x"))
        rows.append(("ESC time / MSE time, 100 generations projected", f"{projected / calib_times['mse']:.1f}x"))

    # ------------------------------------------------------------- inference overhead
    qmodel.set_activation_scales(s_local)
    inputs = [b[0] for b in data.batches]

    def run(m: nn.Module) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                for x in inputs:
                    m(x)
        return go

    run(model)(), run(qmodel)()  # warm-up (weight cache)
    t_fp, t_q = interleaved([run(model), run(qmodel)], 3 * args.repeats)
    rows.append(("inference FP32 (all clips)", f"{t_fp:.3f} s"))
    rows.append((f"inference fake-quant W{args.bits}A{args.bits} (all clips)", f"{t_q:.3f} s"))
    rows.append(("fake-quant / FP32 inference (target <= 1.5x)", f"{t_q / t_fp:.2f}x"))

    width = max(len(k) for k, _ in rows)
    table = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    table += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    print("\n".join(table))
    if args.results:
        command = "python benchmarks/bench_esc.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (f"\n## bench_esc: {date}\n\nCommand: `{command.strip()}`  \n"
                  f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
                  f"torch {torch.__version__}, {args.threads} threads  \n"
                  f"Model: StandInAST {params / 1e6:.2f}M parameters, {n_act} activation quantizers, "
                  f"ESC popsize {popsize}, {args.clips} clips in batches of {args.batch_size}, W{args.bits}A{args.bits}\n\n")
        with open(args.results, "a") as f:
            f.write(header + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
