"""YAMNet's log-mel patch front end (upstream ``features.py``), batched in torch.

16 kHz mono, zero-padded at the end like ``pad_waveform`` (at least one full patch, then whole patch
hops), frames of 25 ms (400 samples) every 10 ms (160), periodic Hann window, ``|rfft|`` with
512 points (magnitude, not power), TensorFlow's ``linear_to_mel_weight_matrix`` (64 bands,
125-7500 Hz, HTK mel, triangles linear in mel, DC bin zeroed), ``log(mel + 0.001)``, patches of
96 frames with a hop of 48 frames (0.96 s / 0.48 s). Batched over clips without Python loops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
