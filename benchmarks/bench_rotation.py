"""Forward time of a rotated model (``ptq=rotation``): the fast Hadamard transform against the dense ``x @ R``.

Usage: ``python benchmarks/bench_rotation.py [--config "+experiment=ptq_whisper_kws precision=w8a6"]
[--clips 20] [--repeats 3] [--threads 1] [--results benchmarks/RESULTS.md]``.

Builds the model, task and calibration clips of the composed run config as ``python -m esc.run`` does
(``esc.pipeline``), applies :class:`esc.ptq.rotation.Rotation` (the config's ``ptq`` node with
``_target_`` forced to it), inserts the scope's quantizers and calibrates them with max (the
forward cost does not depend on the scales), then times one pass over the calibration clips of:
the unrotated quantized model, the rotated one with the fast transform (:func:`esc.ptq.rotation.hadamard_transform`)
and the same model with every ``hadamard_diagonal`` removed (dense ``x @ R``, the implementation before it).
ESC evaluates ``popsize x generations`` such passes, so the ratio is its speed-up on this model.
Best of ``--repeats`` interleaved passes. Results are printed and appended to ``--results``. Not a test.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
import time

import torch

from esc.calibrators import BY_NAME
from esc.config import compose
from esc.pipeline import build, prepare, quantize
from esc.ptq.rotation import QuantRotatedLinear
from esc.results import git_state


def one_pass(qmodel, data) -> float:
    """Seconds of one forward pass over the calibration batches."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in data.batches:
            data.forward(qmodel, batch)
    return time.perf_counter() - start


def main() -> None:
    """Time the unrotated, fast-rotated and dense-rotated quantized model; print and append the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="+experiment=ptq_whisper_kws precision=w8a6")
    p.add_argument("--clips", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose([*shlex.split(args.config), "ptq=rotation", f"calibration.num_samples={args.clips}"])
    bundle, task = prepare(cfg)
    data = task.calibration_data(args.clips, int(cfg.calibration.seed))
    rotated = copy.deepcopy(bundle.model)
    build(cfg.ptq).apply(rotated, data)
    models = {"unrotated": quantize(cfg, bundle, bundle.model, data), "rotated, fast": quantize(cfg, bundle, rotated, data)}
    for qmodel in models.values():
        BY_NAME["minmax"]().calibrate(qmodel, data)
    models["rotated, dense"] = copy.deepcopy(models["rotated, fast"])
    for m in models["rotated, dense"].modules():
        if isinstance(m, QuantRotatedLinear):
            m.hadamard_diagonal = None
    seconds = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, qmodel in models.items():
            seconds[name] = min(seconds[name], one_pass(qmodel, data))
    lines = [f"## Rotation forward time ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"Command: `python benchmarks/bench_rotation.py {shlex.join(sys.argv[1:])}`  ",
             f"Commit: {git_state()[0]}  ",
             f"Machine: {platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}; "
             f"{args.clips} calibration clips, best of {args.repeats}", "",
             "| model | one pass over the clips | / unrotated |", "|---|---|---|"]
    lines += [f"| {name} | {s:.2f} s | {s / seconds['unrotated']:.2f}x |" for name, s in seconds.items()]
    lines += ["", f"Dense / fast: {seconds['rotated, dense'] / seconds['rotated, fast']:.2f}x", ""]
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
