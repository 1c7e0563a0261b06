"""Whisper's log-mel front end, batched in torch (exactly ``WhisperFeatureExtractor``'s features).

Whisper's log-mel spectrogram as ``WhisperFeatureExtractor`` computes it (16 kHz, n_fft 400, hop
160, Slaney mel filters, log10, clamp to max - 8, ``(x + 4) / 4``). Audio is zero-padded / trimmed
to 30 s, the 3000-frame mel is then cut to ``frames`` frames (default 3000; the model's
``encoder_frames``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class WhisperLogMel(nn.Module):
    """Batched Whisper log-mel: ``[B, samples]`` 16 kHz waveforms -> ``[B, n_mels, frames]``.

    Identical to ``WhisperFeatureExtractor`` (``padding="max_length"``, 30 s): pad/trim each
    waveform to ``chunk_seconds``, STFT (Hann 400, hop 160, centred, reflect), drop the last frame,
    power -> Slaney mel filters (transformers' ``mel_filter_bank``), ``log10(max(., 1e-10))``,
    floor at the per-sample max - 8, ``(x + 4) / 4``; then keep the first ``frames`` frames.
    Waveforms shorter than the batch width must be zero-padded (zeros are what Whisper pads with).
    """

    def __init__(self, n_mels: int = 80, frames: int = 3000, sample_rate: int = 16000, n_fft: int = 400,
                 hop_length: int = 160, chunk_seconds: int = 30) -> None:
        super().__init__()
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sample_rate, hop_length=hop_length,
                                     chunk_length=chunk_seconds, n_fft=n_fft)
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.n_fft, self.hop, self.n_samples = n_fft, hop_length, chunk_seconds * sample_rate
        self.frames = frames
        if frames > self.n_samples // hop_length:
            raise ValueError(f"frames={frames} exceeds the {chunk_seconds} s window ({self.n_samples // hop_length} frames)")

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav[None]
        if wav.shape[1] >= self.n_samples:
            wav = wav[:, : self.n_samples]
        else:
            wav = nn.functional.pad(wav, (0, self.n_samples - wav.shape[1]))
        stft = torch.stft(wav, self.n_fft, self.hop, window=self.window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self.mel_filters.T @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        return log_spec[..., : self.frames].contiguous()
