"""A small Audio Spectrogram Transformer (AST) for keyword spotting, quantization-ready.

Architecture (the paper's KWS model, scaled down so it trains on a CPU):

* float front end (:class:`LogMelFrontend`, never quantized): the waveform batch ``[B, samples]``
  is padded/cropped to ``num_samples``, turned into a power mel spectrogram with
  ``torchaudio.transforms.MelSpectrogram`` (``n_fft`` = ``win_length`` = 25 ms, hop 10 ms,
  ``n_mels`` bins, Hann window, centred frames), ``log(mel + log_eps)``, then normalised as in
  AST: ``(x - mean) / (2 * std)`` with the training-set ``mean``/``std`` stored in the checkpoint.
  Output ``[B, 1, n_mels, frames]``.
* :class:`AST`: ``Conv2d`` patch embedding (kernel = stride = ``patch``, over (mel, time)),
  a learned CLS token and positional embedding, ``depth`` pre-norm transformer blocks
  (LayerNorm -> multi-head self-attention -> residual; LayerNorm -> MLP with GELU -> residual),
  a final LayerNorm on the CLS token and a Linear head. In attention, ``Q @ K^T`` and
  ``softmax @ V`` are :class:`esc.quant.modules.MatMul` modules (the query is scaled by
  ``head_dim ** -0.5`` before the product), with the batch on dim 0 of every tensor.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torchaudio
from torch import nn

from esc.models import checkpoint as checkpoint_io
from esc.core.bundle import ModelBundle
from esc.models.checkpoint import MAKE_TARGET
from esc.quant.modules import MatMul

log = logging.getLogger(__name__)



@dataclass
class FrontendConfig:
    """Log-mel front end settings (``mean``/``std`` are the training-set feature statistics)."""

    sample_rate: int = 16000
    num_samples: int = 16000
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    f_min: float = 20.0
    f_max: float = 8000.0
    log_eps: float = 1e-6
    mean: float = 0.0
    std: float = 0.5  # (x - mean) / (2 * std): std 0.5 means "no scaling"

    @property
    def num_frames(self) -> int:
        """Frames produced for ``num_samples`` (centred frames)."""
        return self.num_samples // int(round(self.sample_rate * self.hop_ms / 1000)) + 1


@dataclass
class ASTConfig:
    """AST hyper-parameters."""

    num_classes: int = 35
    patch: tuple[int, int] = (16, 8)  # (mel, time); kernel = stride
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    frontend: FrontendConfig = field(default_factory=FrontendConfig)

    def to_dict(self) -> dict:
        """Plain-dict form stored in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ASTConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["frontend"] = FrontendConfig(**d.get("frontend", {}))
        d["patch"] = tuple(d.get("patch", cls.patch))
        return cls(**d)


TINY = dict(patch=(8, 10), dim=32, depth=2, heads=2, mlp_ratio=2.0, dropout=0.0,
            frontend=dict(n_mels=32))


class LogMelFrontend(nn.Module):
    """Batched log-mel front end: ``[B, samples]`` float waveforms -> ``[B, 1, n_mels, frames]``."""

    def __init__(self, cfg: FrontendConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_fft = int(round(cfg.sample_rate * cfg.win_ms / 1000))
        hop = int(round(cfg.sample_rate * cfg.hop_ms / 1000))
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=cfg.sample_rate, n_fft=n_fft, win_length=n_fft,
                                                        hop_length=hop, f_min=cfg.f_min, f_max=cfg.f_max,
                                                        n_mels=cfg.n_mels, power=2.0, center=True)
        self.register_buffer("mean", torch.tensor(float(cfg.mean)))
        self.register_buffer("std", torch.tensor(float(cfg.std)))

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """Un-normalised ``log(mel + eps)`` of ``[B, samples]`` -> ``[B, 1, n_mels, frames]``."""
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        if wav.dim() != 2:
            raise ValueError(f"the AST front end expects waveforms [B, samples], got shape {tuple(wav.shape)}")
        n = self.cfg.num_samples
        wav = wav.float()
        if wav.shape[1] < n:
            wav = nn.functional.pad(wav, (0, n - wav.shape[1]))
        elif wav.shape[1] > n:
            wav = wav[:, :n]
        return torch.log(self.mel(wav) + self.cfg.log_eps).unsqueeze(1)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(wav) - self.mean) / (2 * self.std)


class Attention(nn.Module):
    """Multi-head self-attention whose two products are :class:`MatMul` quantization points."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk = MatMul("qk")  # Q @ K^T
        self.av = MatMul("pv")  # softmax @ V
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, N, d]
        attn = self.qk(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
        out = self.av(self.drop(attn), v)  # [B, H, N, d]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class AST(nn.Module):
    """Audio Spectrogram Transformer on ``[B, 1, n_mels, frames]`` log-mel features -> logits ``[B, classes]``."""

    def __init__(self, cfg: ASTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fe = cfg.frontend
        pf, pt = cfg.patch
        self.grid = (fe.n_mels // pf, fe.num_frames // pt)
        if min(self.grid) < 1:
            raise ValueError(f"patch {cfg.patch} is larger than the feature map ({fe.n_mels} mels x {fe.num_frames} frames)")
        self.patch_embed = nn.Conv2d(1, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(feats)  # [B, dim, gf, gt]
        x = x.flatten(2).transpose(1, 2)  # [B, tokens, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def build_ast(cfg: ASTConfig) -> tuple[AST, LogMelFrontend]:
    """A fresh (randomly initialised) model and its front end."""
    return AST(cfg), LogMelFrontend(cfg.frontend)


def load_checkpoint(checkpoint: str | Path) -> dict:
    """Read a KWS AST checkpoint; a clear error names ``make models`` if it is missing."""
    return checkpoint_io.load_checkpoint(checkpoint, "KWS AST checkpoint", ("state_dict", "config", "labels"),
                                         "esc.models.train_kws", "model=ast_tiny")


def build_kws_ast(checkpoint: Optional[str] = None, tiny: bool = False, labels: Optional[Sequence[str]] = None,
                  seed: int = 0, name: Optional[str] = None,
                  **overrides) -> ModelBundle:
    """The KWS AST as a :class:`ModelBundle`.

    Args:
        checkpoint: path to ``kws_ast.pt`` written by :mod:`esc.models.train_kws` (required unless ``tiny``).
        tiny: a very small random-weight model (seeded with ``seed``) for tests; no checkpoint.
        labels: class names of the tiny model (default: the 35 Speech Commands words).
        overrides: :class:`ASTConfig` fields for the tiny model.
    """
    if tiny:
        from esc.data.kws import WORDS

        labels = list(labels) if labels is not None else list(WORDS)
        spec = {**TINY, **overrides, "num_classes": len(labels)}
        spec["frontend"] = {**TINY["frontend"], **spec.get("frontend", {})}
        cfg = ASTConfig.from_dict(spec)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model, frontend = build_ast(cfg)
        extras = {"config": cfg.to_dict(), "checkpoint": None}
        name = name or "ast_tiny"
    else:
        if checkpoint is None:
            raise ValueError(f"build_kws_ast needs a checkpoint (create it with `{MAKE_TARGET}`) or tiny=True")
        ckpt = load_checkpoint(checkpoint)
        cfg = ASTConfig.from_dict(ckpt["config"])
        model, frontend = build_ast(cfg)
        model.load_state_dict(ckpt["state_dict"])
        labels = list(ckpt["labels"])
        extras = {k: v for k, v in ckpt.items() if k != "state_dict"}
        extras["checkpoint"] = str(checkpoint)
        name = name or "ast_kws"
    model.eval()
    frontend.eval()
    return ModelBundle(name=name, model=model, frontend=frontend, sample_rate=cfg.frontend.sample_rate,
                       labels=labels, extras=extras, head=("head",))
