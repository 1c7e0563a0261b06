"""Tiny float models and calibration data for fast calibrator tests (no downloads, CPU, < 1 s each).

* :class:`TinyMLP`: Linear -> ReLU -> Linear, for heavy-tailed inputs where max calibration fails.
* :class:`TinyTransformer`: Conv1d front end, one attention block whose products are
  :class:`esc.quant.modules.MatMul` modules, LayerNorms, a classification head; exercises every
  kind of quantization point (Linear, Conv, LayerNorm, MatMul operands).
* :func:`classification_data`: calibration data whose labels are the float model's own
  predictions (pseudo-labels), with a per-sample cross-entropy task loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.quant.modules import MatMul


class TinyMLP(nn.Module):
    """``Linear(d_in, hidden) -> ReLU -> Linear(hidden, classes)`` (head weights scaled by ``logit_gain``)."""

    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 8, logit_gain: float = 4.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)
        with torch.no_grad():  # confident predictions, so the task loss sees quantization damage
            self.fc2.weight.mul_(logit_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TinyTransformer(nn.Module):
    """``[B, F, T]`` features -> Conv1d embedding -> 1 pre-LN attention+MLP block -> mean pool -> head.

    The head weights are scaled by ``logit_gain`` (confident predictions).
    """

    def __init__(self, feats: int = 8, dim: int = 16, heads: int = 2, classes: int = 5, logit_gain: float = 8.0,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv1d(feats, dim, kernel_size=3, padding=1)
        self.ln1, self.ln2, self.ln_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.qk, self.av = MatMul("qk"), MatMul("pv")
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)
        self.heads = heads
        with torch.no_grad():  # confident predictions, so the task loss sees quantization damage
            self.head.weight.mul_(logit_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(1, 2)  # [B, T, D]
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(self.qk(q, k.transpose(-1, -2)) / (d // self.heads) ** 0.5, dim=-1)
        h = h + self.proj(self.av(att, v).transpose(1, 2).reshape(b, t, d))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(self.ln_out(h).mean(1))


def heavy_tailed(shape: tuple[int, ...], outlier_scale: float = 60.0, outlier_rate: float = 0.002, seed: int = 0) -> torch.Tensor:
    """Gaussian values with a rare, very large outlier (the wide ranges that break max calibration)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < outlier_rate
    return torch.where(mask, x.sign() * outlier_scale, x)


def classification_data(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> CalibrationData:
    """Batches ``(x, label)`` with ``label`` = argmax of the float ``model``; loss = per-sample cross-entropy."""
    with torch.no_grad():
        labels = model(inputs).argmax(-1)
    batches = [(inputs[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return CalibrationData(batches, forward=lambda m, b: m(b[0]),
                           loss=lambda out, b: F.cross_entropy(out, b[1], reduction="none"))
