"""Tiny stand-in models and calibration helpers for the PTQ-method tests and timing benchmark."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.calibrators.minmax import MinMaxCalibrator
from esc.models.yamnet import YAMNet
from esc.quant.model import QuantizedModel
from esc.quant.modules import MatMul


class TinyAttentionBlock(nn.Module):
    """Pre-LN transformer encoder block (attention products as ``MatMul`` quantization points)."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.scores = MatMul("qk")
        self.context = MatMul("pv")
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ff)
        self.fc2 = nn.Linear(ff, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(self.scores(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj(self.context(att, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class OneBlock(nn.Module):
    """One pre-LN transformer block (the BRECQ/QDrop reconstruction unit), seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = TinyAttentionBlock(32, 2, 64)

    def forward(self, x):
        return self.block(x)


class TinyConvTransformer(nn.Module):
    """Log-mel features ``[B, n_mels, frames]`` -> two strided Conv1d -> transformer blocks -> mean pool -> logits."""

    def __init__(self, n_mels: int = 16, dim: int = 32, heads: int = 2, ff: int = 64, depth: int = 2,
                 n_classes: int = 5, seed: int = 0, outlier_channels: int = 0, outlier_gain: float = 20.0) -> None:
        super().__init__()
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv1d(n_mels, dim, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(TinyAttentionBlock(dim, heads, ff) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        if outlier_channels:  # a few LayerNorm channels with large gains: SmoothQuant's target
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.LayerNorm):
                        m.weight[:outlier_channels] *= outlier_gain
                        m.bias.normal_(0.0, 0.1)
        torch.random.set_rng_state(rng_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def tiny_yamnet(seed: int = 0) -> YAMNet:
    """YAMNet's structure (:class:`esc.models.yamnet.YAMNet`) in miniature: SAME-padded Conv2d 3x3/2 (8 channels),
    two depthwise-separable layers (depthwise 3x3 with ``groups=channels``, stride 1 then 2, each followed by a
    pointwise 1x1 to 16 channels; ReLU after every conv), global average pooling, Linear 16 -> 5, sigmoid.
    Input: log-mel-like patches ``[B, frames, mels]``. He-normal weights and biases of std 0.5 (BatchNorm folded
    into them, as in YAMNet), seeded."""
    model = YAMNet((("conv", 2, 8), ("sep", 1, 16), ("sep", 2, 16)), num_classes=5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel()))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def model_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``CalibrationData.forward`` for models taking one tensor."""
    return model(batch)


def tensor_data(x: torch.Tensor, batch: int = 8) -> CalibrationData:
    """Calibration data made of the rows of ``x``."""
    return CalibrationData(list(x.split(batch)), model_forward)


def correlated(n: int, t: int, c: int, seed: int, mean: float = 0.0) -> torch.Tensor:
    """``[n, t, c]`` inputs with correlated channels, plus a per-channel offset of scale ``mean`` when it is non-zero
    (a realistic layer input)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, c, generator=g) @ (torch.randn(c, c, generator=g) / c ** 0.5)
    return x + mean * torch.randn(c, generator=g) if mean else x


def make_data(num_clips: int = 16, batch_size: int = 8, n_mels: int = 16, frames: int = 32, seed: int = 0,
              mean: float = 0.0) -> CalibrationData:
    """Random "feature" clips (a shared per-channel offset ``mean``-scaled) as calibration batches."""
    g = torch.Generator().manual_seed(seed)
    offset = mean * torch.randn(n_mels, 1, generator=g)
    clips = torch.randn(num_clips, n_mels, frames, generator=g) + offset
    return CalibrationData(list(clips.split(batch_size)), model_forward)


def max_calibrate(qmodel: QuantizedModel, data: CalibrationData) -> None:
    """Max calibration of every activation quantizer (``esc.calibrators.minmax.MinMaxCalibrator``)."""
    MinMaxCalibrator().calibrate(qmodel, data)
