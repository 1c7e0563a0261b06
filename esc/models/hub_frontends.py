"""Batched float front ends of the hub models: AST's filterbank extractor and the wav2vec2-style normalisation.

Waveforms ``[B, samples]`` float at 16 kHz in; rows shorter than the batch width are zero-padded
at the end.
"""
from __future__ import annotations

import torch
from torch import nn

SAMPLE_RATE = 16000


class ASTFrontend(nn.Module):
    """``ASTFeatureExtractor`` batched: ``[B, samples]`` at 16 kHz -> ``[B, max_length, num_mel_bins]``.

    Kaldi fbank (25 ms Hann... as the extractor defines it), padded/cropped to ``max_length``
    frames, normalised with the extractor's dataset ``mean``/``std`` (``(x - mean) / (2 std)``).
    """

    def __init__(self, feature_extractor, sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__()
        self.fe = feature_extractor
        self.sample_rate = sample_rate

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav = _as_batch(wav)
        out = self.fe([w.numpy() for w in wav], sampling_rate=self.sample_rate, return_tensors="pt")
        return out["input_values"].float()


def valid_lengths(wav: torch.Tensor) -> torch.Tensor:
    """Per row, the index after the last non-zero sample (trailing exact zeros count as padding)."""
    nz = wav != 0
    idx = torch.arange(1, wav.shape[1] + 1, device=wav.device).expand_as(wav)
    return torch.where(nz, idx, torch.zeros_like(idx)).amax(dim=1)


class CTCFrontend(nn.Module):
    """wav2vec2-style front end: per-utterance zero-mean unit-variance normalisation, batched.

    ``[B, samples]`` -> ``{"input_values": [B, samples], "attention_mask": [B, samples]}`` (the mask
    only if ``attention_mask=True``, i.e. the checkpoint's feature extractor has
    ``return_attention_mask``). Rows shorter than the batch width must be zero-padded at the end:
    each row's length is taken as the position of its last non-zero sample (:func:`valid_lengths`),
    statistics use only that part (``(x - mean) / sqrt(var + eps)``, as
    ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``) and the padding stays 0. Without a mask
    (wav2vec2-base, group-norm feature encoder) the output is the tensor alone, as HF recommends
    for those checkpoints.
    """

    def __init__(self, do_normalize: bool = True, attention_mask: bool = False, eps: float = 1e-7) -> None:
        super().__init__()
        self.do_normalize, self.attention_mask, self.eps = do_normalize, attention_mask, eps

    @torch.no_grad()
    def forward(self, wav: torch.Tensor):
        wav = _as_batch(wav)
        lengths = valid_lengths(wav).clamp(min=1)
        mask = (torch.arange(wav.shape[1])[None, :] < lengths[:, None])
        x = wav
        if self.do_normalize:
            n = lengths[:, None].float()
            mean = (wav * mask).sum(1, keepdim=True) / n
            var = (((wav - mean) * mask) ** 2).sum(1, keepdim=True) / n
            x = (wav - mean) / torch.sqrt(var + self.eps) * mask
        if self.attention_mask:
            return {"input_values": x, "attention_mask": mask.long()}
        return x


def _as_batch(wav) -> torch.Tensor:
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(f"the front end expects waveforms [B, samples], got shape {tuple(wav.shape)}")
    return wav
