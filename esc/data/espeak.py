"""Offline speech synthesis with eSpeak NG through ``ctypes`` (no root, no network), deterministic.

The PyPI package ``espeakng-loader`` ships ``libespeak-ng`` (1.52) and its voice data. The library
is driven by a small synthesis server, :mod:`esc.data.espeak_worker`, started once per process:
``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...)`` with the package's data path, a synth callback
that collects the int16 PCM the engine produces at its native rate (22050 Hz),
``espeak_SetVoiceByName`` (a language voice plus an optional variant, ``"en-us+m3"``),
``espeak_SetParameter`` for rate / pitch / pitch range / volume, and ``espeak_Synth``. The result is
resampled with torchaudio to the requested rate (16 kHz default).

Determinism: every utterance is synthesised in a child forked from the freshly initialised server,
with eSpeak's noise generator seeded from the request itself (:func:`request_seed`), so the audio
is a pure function of ``(text, voice, rate, pitch, pitch_range, volume)``: the same call gives the
same bytes in any process, in any order, after any other synthesis (see the worker's docstring for
the two sources of run-to-run variation this removes). Calls are serialised by a lock; the module
is safe to call from several threads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchaudio

from esc.data.audio import pcm_to_float

log = logging.getLogger(__name__)

# English language voices shipped with espeak-ng (en-Shaw, the Shavian-script voice, is left out).
ENGLISH_LANGUAGES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
                     "en-gb-x-gbcwmd", "en-029", "en-us-nyc")


class SynthesisError(RuntimeError):
    """eSpeak NG could not be loaded or produced no audio."""


def request_seed(text: str, voice: str, rate: int, pitch: int, pitch_range: int, volume: int) -> int:
    """The seed of eSpeak's noise generator for one utterance: a 31-bit hash of the request."""
    blob = json.dumps([text, voice, int(rate), int(pitch), int(pitch_range), int(volume)]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF


class _Engine:
    """Client of the process-wide synthesis server (:mod:`esc.data.espeak_worker`, started once)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader  # noqa: F401
        except ImportError as e:  # pragma: no cover - pinned dependency
            raise SynthesisError("espeakng-loader is not installed; `pip install espeakng-loader==0.2.4`") from e
        self.proc = subprocess.Popen([sys.executable, "-m", "esc.data.espeak_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        header = self.proc.stdout.read(4)
        rate = struct.unpack("<i", header)[0] if len(header) == 4 else 0
        if rate <= 0:
            err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
            raise SynthesisError(f"the eSpeak NG synthesis server failed to start (espeak_Initialize returned {rate}): {err}")
        self.sample_rate = int(rate)
        self.lock = threading.Lock()
        log.debug("espeak-ng synthesis server %d at %d Hz", self.proc.pid, self.sample_rate)

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, volume: int) -> np.ndarray:
        """Native-rate int16 PCM of ``text`` spoken by ``voice`` (a pure function of the arguments)."""
        request = dict(text=text, voice=voice, rate=int(rate), pitch=int(pitch), pitch_range=int(pitch_range),
                       volume=int(volume), seed=request_seed(text, voice, rate, pitch, pitch_range, volume))
        blob = json.dumps(request).encode()
        with self.lock:
            try:
                self.proc.stdin.write(struct.pack("<I", len(blob)) + blob)
                self.proc.stdin.flush()
                head = self.proc.stdout.read(5)
                status, size = struct.unpack("<BI", head)
                payload = self.proc.stdout.read(size)
            except (OSError, struct.error) as e:
                raise SynthesisError(f"the eSpeak NG synthesis server stopped (exit code {self.proc.poll()}); "
                                     "rerun, and report it if it persists") from e
        if status != 0:
            raise SynthesisError(payload.decode(errors="replace"))
        return np.frombuffer(payload, dtype=np.int16).copy()


_ENGINE: Optional[_Engine] = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> _Engine:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def native_sample_rate() -> int:
    """The rate eSpeak NG synthesises at (22050 Hz)."""
    return _engine().sample_rate


@lru_cache(maxsize=None)
def list_variants() -> tuple[str, ...]:
    """Names of the voice variants shipped with the data (``voices/!v``), sorted."""
    import espeakng_loader

    vdir = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    return tuple(sorted((p.name for p in vdir.iterdir() if p.is_file() and " " not in p.name), key=str.lower))


def list_voices(languages: tuple[str, ...] = ENGLISH_LANGUAGES, variants: bool = True) -> list[str]:
    """English voices: each language voice alone and, with ``variants``, combined with every variant (``"en-us+m3"``)."""
    names = list(languages)
    if variants:
        names += [f"{lang}+{v}" for lang in languages for v in list_variants()]
    return names


def synthesize_native(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50,
                      volume: int = 100) -> np.ndarray:
    """Like :func:`synthesize` but returns the engine's int16 PCM at :func:`native_sample_rate` (for batched resampling)."""
    if not text or not text.strip():
        raise SynthesisError("synthesize() got empty text; give a word or sentence to speak")
    pcm = _engine().synth(text, voice, rate, pitch, pitch_range, volume)
    if pcm.size == 0 or not np.any(pcm):
        raise SynthesisError(f"eSpeak NG returned no audio for text {text!r} with voice {voice!r} "
                             f"(rate={rate}, pitch={pitch}); try another voice or check the espeak-ng data")
    return pcm


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50,
               volume: int = 100, sample_rate: int = 16000, normalize: bool = False) -> np.ndarray:
    """Speak ``text`` and return a mono float32 waveform in [-1, 1] at ``sample_rate``.

    Args:
        voice: an eSpeak NG voice name, optionally with a variant (``"en-gb-x-rp+f3"``).
        rate: speaking rate in words per minute (eSpeak's 80..450).
        pitch: base pitch, 0..100 (50 = the voice's default).
        pitch_range: pitch range (intonation), 0..100 (0 = monotone).
        volume: amplitude, 0..200 (100 = normal).
        sample_rate: output rate; the native 22050 Hz audio is resampled with torchaudio.
        normalize: scale the result to a peak of 1.

    Raises:
        SynthesisError: the voice is unknown or eSpeak produced no (or only silent) audio.
    """
    eng = _engine()
    pcm = synthesize_native(text, voice, rate, pitch, pitch_range, volume)
    wav = torch.from_numpy(pcm_to_float(pcm))
    if sample_rate != eng.sample_rate:
        wav = torchaudio.functional.resample(wav, eng.sample_rate, sample_rate)
    out = wav.numpy().astype(np.float32, copy=False)
    if normalize:
        out = out / max(float(np.abs(out).max()), 1e-8)
    return out
