"""What a model adapter returns: the network to quantize plus its float front end."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn


@dataclass
class ModelBundle:
    """A model ready for the harness.

    Attributes:
        name: short model name used in result rows (``ast_kws``, ``yamnet``, ``whisper_base``...).
        model: the ``nn.Module`` that gets quantized. It takes front-end features, not waveforms.
        frontend: waveform batch ``[B, samples]`` (float, at ``sample_rate``) -> model input.
            It stays in float and is never quantized; tasks run it once and cache its output.
        sample_rate: the rate the front end expects.
        labels: class names for classifiers (index order of the logits), else ``None``.
        extras: anything a task needs to drive this model (a tokenizer, generation settings...).
        head: glob patterns of the head modules (classifier, vocabulary projection): their input
            has the ``head`` role of :mod:`esc.quant.roles`.
        prefix_modules: glob patterns of the modules that process a fixed prompt prefix (Whisper's
            decoder and vocabulary projection), kept float on those positions by ``scope.float_prefix``.
        revisions: hub repository -> the commit the model was loaded from (hub models only; result rows record it).
    """

    name: str
    model: nn.Module
    frontend: Callable[[torch.Tensor], Any]
    sample_rate: int = 16000
    labels: Optional[list[str]] = None
    extras: dict = field(default_factory=dict)
    head: tuple[str, ...] = ()
    prefix_modules: tuple[str, ...] = ()
    revisions: dict[str, str] = field(default_factory=dict)


def weights_fingerprint(model: nn.Module) -> str:
    """16-hex-digit hash of every parameter and buffer (names, shapes, values): a retrained or
    re-fetched checkpoint behind an unchanged config gets a new fingerprint, so caches keyed on it
    (FP32 metrics, calibrations) are not reused by mistake."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
