"""Shared fixtures: a tiny conv + transformer audio-like model with random weights (no downloads).

``tiny_audio_model`` is a fresh float :class:`TinyAudioModel` (seeded); ``tiny_audio_batches`` is a
short list of seeded log-mel-like feature batches ``[B, n_mels, T]`` it accepts. Both are
function-scoped, so tests may modify them.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esc.quant.modules import MatMul

torch.set_num_threads(1)


class TinyAudioModel(nn.Module):
    """Conv front end + one pre-LN transformer block + linear head, with attention products as ``MatMul``.

    ``[B, n_mels, T]`` -> two ``Conv1d`` (GELU, the second with stride 2) -> ``[B, T', d]`` ->
    LayerNorm -> single-head self-attention (``Q @ K^T`` and ``softmax @ V`` through
    :class:`~esc.quant.modules.MatMul`) -> residual -> LayerNorm -> MLP -> residual -> mean over time ->
    ``Linear`` head ``[B, classes]``. Quantization points: 2 Conv1d, 5 Linear, 3 LayerNorm, 2 MatMul.
    """

    def __init__(self, n_mels: int = 16, d: int = 32, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv1d(n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.qk = MatMul("qk")
        self.av = MatMul("pv")
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        torch.random.set_rng_state(gen_state)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.conv1(x))
        h = nn.functional.gelu(self.conv2(h)).transpose(1, 2)  # [B, T', d]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = torch.softmax(self.qk(q, k.transpose(1, 2)) / math.sqrt(self.d), dim=-1)
        h = h + self.proj(self.av(att, v))
        h = h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))
        return self.head(self.ln_out(h).mean(dim=1))


def make_audio_batches(num_batches: int = 3, batch: int = 4, n_mels: int = 16, frames: int = 40, seed: int = 0) -> list[torch.Tensor]:
    """Seeded log-mel-like batches ``[batch, n_mels, frames]`` (smooth in time, offset per band)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        x = torch.randn(batch, n_mels, frames, generator=g)
        x = 0.6 * x + 0.4 * torch.roll(x, 1, dims=2)  # some temporal correlation
        x = x + torch.linspace(-1.0, 1.0, n_mels).view(1, -1, 1)
        out.append(x)
    return out


@pytest.fixture
def tiny_audio_model() -> TinyAudioModel:
    """A fresh float :class:`TinyAudioModel` with seeded random weights (eval mode)."""
    return TinyAudioModel().eval()


@pytest.fixture
def tiny_audio_batches() -> list[torch.Tensor]:
    """Three seeded feature batches ``[4, 16, 40]`` for :class:`TinyAudioModel`."""
    return make_audio_batches()
