"""Reading audio files (soundfile decoding, mono mixdown, resampling, errors that name the file) and content hashes of data sets."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio


class AudioLoadError(ValueError):
    """An audio file is missing, unreadable or empty."""


def float_to_pcm(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] -> int16 PCM (``round(x * 32768)``, clipped at full scale). Stored data sets pass
    through this grid, so ULP-level differences of float maths between CPUs (numpy's SIMD ``sin``) vanish."""
    return np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1) (float input is returned as float32)."""
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    return pcm.astype(np.float32, copy=False)


def load_audio(path: str | Path, sample_rate: int = 16000, mono: bool = True) -> np.ndarray:
    """Read ``path`` as float32 in [-1, 1] at ``sample_rate``.

    Multichannel audio is mixed down to mono by averaging the channels (``mono=True``, result
    ``[samples]``); with ``mono=False`` the result is ``[channels, samples]``. Resampling uses
    ``torchaudio.functional.resample`` (windowed sinc).

    Raises:
        AudioLoadError: the file does not exist, cannot be decoded, or holds no samples.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"audio file not found: {path} (check the path or regenerate the data set)")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on bad input
        raise AudioLoadError(f"could not decode audio file {path}: {e} (the file is corrupt or not a soundfile-readable format)") from e
    if data.size == 0:
        raise AudioLoadError(f"audio file {path} holds no samples (empty recording); remove or replace it")
    wav = torch.from_numpy(np.ascontiguousarray(data.T))  # [channels, samples]
    if mono:
        wav = wav.mean(dim=0)
    if sr != sample_rate:
        wav = torchaudio.functional.resample(wav, int(sr), int(sample_rate))
    return wav.numpy().astype(np.float32, copy=False)


def content_hash(*parts: Any) -> str:
    """SHA-256 (16 hex digits) of arrays and JSON-able values, in order: the content identity of a data split.

    Arrays contribute their dtype, shape and bytes (C order); anything else its sorted-key JSON.
    Result rows record these hashes, so two rows on the same split name the same bytes.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype.str}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]
