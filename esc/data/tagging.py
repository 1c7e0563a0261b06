"""Synthetic audio-tagging clips over AudioSet classes that code can produce faithfully.

Every clip is generated from ``numpy.random.default_rng([seed, clip_index])`` (so one clip does not
depend on the others or on the clip count), at ``sample_rate`` (16 kHz), ``clip_samples`` long
(default 23280 = 1.455 s: exactly two YAMNet patches with no end padding), on the 16-bit PCM grid
(float32 ``k / 32768``): numpy's transcendental functions differ in the last bit between CPUs (its
AVX-512 ``sin`` against the AVX2 one moves 8 float32 samples of 720 test clips by 1.5e-8), and the grid
absorbs that, so every machine writes the same bytes. Sets are cached as
``<cache_dir>/<split>-<hash>.npz`` (``data/tagging/`` by default; the hash covers every
generation parameter and :data:`GENERATOR_VERSION`); the file also stores the set's content hash
(:attr:`TaggingSet.sha256`), which result rows record.

Classes (AudioSet display names, the names of YAMNet's class map) and how each is made:

* ``Speech``: eSpeak NG (:mod:`esc.data.espeak`) reading 3-7 random common English words, with a
  random English voice/variant, rate 130-230 wpm, pitch 25-75; utterances are concatenated
  until the clip is full.
* ``Sine wave``: one steady sinusoid, frequency log-uniform in 150-4000 Hz, random phase.
* ``Beep, bleep``: tone bursts (500-3000 Hz, 80-350 ms on, 100-400 ms off, 5 ms ramps).
* ``Dial tone``: a continuous national dial tone: 350+440 Hz (North America), 350+450 Hz (UK),
  425 Hz (most of Europe) or 400+450 Hz.
* ``Telephone dialing, DTMF``: random keypad digits, each the sum of its row (697/770/852/941 Hz)
  and column (1209/1336/1477/1633 Hz) tones, 60-150 ms on and 50-120 ms off.
* ``White noise``: Gaussian samples.
* ``Pink noise``: Gaussian noise shaped to a 1/f power spectrum in the frequency domain.
* ``Clicking``: sharp clicks (white-noise bursts with a 0.3-1.5 ms exponential decay, 6 ms
  long) every 100-500 ms with +-20 % jitter, silence between them.
* ``Silence``: digital silence plus Gaussian dither at -90 dBFS RMS.

A fraction ``mixture_fraction`` of the clips are mixtures of two distinct non-silent classes
(their sum, the second at -6..+6 dB relative RMS), labelled with both classes (multi-label
targets); the others hold one class, cycling over the classes so each gets the same count.
Non-silent clips are set to an RMS of -35..-15 dBFS and scaled down if their peak exceeds 0.99.

Classes overlap acoustically (a dial tone *is* two sines, a beep is a gated sine, DTMF is two
gated sines): the labels say which generator made the clip, nothing more, so FP32 mAP stays
below 1 for a perfect tagger of real-world audio. The harness measures how quantization moves
the metric, not how good YAMNet is.

``python -m esc.data.tagging`` synthesises the default sets (test and calibration splits).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from esc.core.files import read_npz
from esc.data.audio import content_hash, float_to_pcm, pcm_to_float

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # 2: deterministic eSpeak speech (esc.data.espeak); 3: clips on the int16 PCM grid
CLASSES: tuple[str, ...] = ("Speech", "Sine wave", "Beep, bleep", "Dial tone", "Telephone dialing, DTMF",
                            "White noise", "Pink noise", "Clicking", "Silence")
DEFAULT_CLIP_SAMPLES = 23280  # 15600 (one 0.96 s YAMNet patch incl. the STFT window) + 7680 (one 0.48 s hop)

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact water room mother area money story night lot right study "
         "book word business issue side kind head house service friend father power hour game line end member law "
         "car city name team minute idea body back parent face level office door health art war history party "
         "result change morning reason research girl guy moment air teacher force education seven three green "
         "yellow open close bring carry walk listen quickly slowly tomorrow never always little large early").split()
DIAL_TONES = ((350.0, 440.0), (350.0, 450.0), (425.0,), (400.0, 450.0))
DTMF_ROWS, DTMF_COLS = (697.0, 770.0, 852.0, 941.0), (1209.0, 1336.0, 1477.0, 1633.0)


@dataclass(frozen=True)
class TaggingSpec:
    """Everything that determines a synthetic set (its cache key). See the module docstring."""

    num_clips: int = 720
    seed: int = 0
    classes: tuple[str, ...] = CLASSES
    clip_samples: int = DEFAULT_CLIP_SAMPLES
    sample_rate: int = 16000
    mixture_fraction: float = 0.3
    level_db: tuple[float, float] = (-35.0, -15.0)
    mix_gain_db: tuple[float, float] = (-6.0, 6.0)
    silence_dither_db: float = -90.0

    def key(self) -> str:
        """Short hash of the spec and the generator version."""
        blob = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass
class TaggingSet:
    """Clips ``waves [N, samples]`` (float32), multi-hot ``labels [N, C]`` over ``classes``."""

    waves: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    sample_rate: int
    spec: Optional[TaggingSpec] = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """Content hash of the clips and labels (:func:`esc.data.audio.content_hash`)."""
        return content_hash(self.waves, self.labels, list(self.classes), self.sample_rate)


# ------------------------------------------------------------------------------- generators
def _ramp(x: np.ndarray, sr: int, seconds: float = 0.005) -> np.ndarray:
    """Raised-cosine fade in and out of ``seconds`` (no onset clicks)."""
    n = min(int(sr * seconds), len(x) // 2)
    if n > 0:
        w = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
        x[:n] *= w
        x[-n:] *= w[::-1]
    return x


def _tones(freqs: Sequence[float], n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    return sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs)


def _gated(n: int, sr: int, rng: np.random.Generator, on: tuple[float, float], off: tuple[float, float],
           make: Callable[[int], np.ndarray]) -> np.ndarray:
    """Bursts ``make(length)`` of ``on`` seconds separated by ``off`` seconds, from a random start."""
    out = np.zeros(n)
    pos = int(rng.uniform(0, off[1]) * sr)
    while pos < n:
        length = int(rng.uniform(*on) * sr)
        burst = _ramp(make(length), sr)[: n - pos]
        out[pos:pos + len(burst)] = burst
        pos += length + int(rng.uniform(*off) * sr)
    return out


def sine_wave(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A steady sinusoid, log-uniform 150-4000 Hz."""
    return _tones([float(np.exp(rng.uniform(np.log(150), np.log(4000))))], n, sr, rng)


def beep(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Gated tone bursts, 500-3000 Hz."""
    f = rng.uniform(500, 3000)
    return _gated(n, sr, rng, (0.08, 0.35), (0.1, 0.4), lambda m: _tones([f], m, sr, rng))


def dial_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A continuous national dial tone."""
    return _tones(DIAL_TONES[rng.integers(len(DIAL_TONES))], n, sr, rng)


def dtmf(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Random DTMF digits."""
    return _gated(n, sr, rng, (0.06, 0.15), (0.05, 0.12),
                  lambda m: _tones([DTMF_ROWS[rng.integers(4)], DTMF_COLS[rng.integers(4)]], m, sr, rng))


def white_noise(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise."""
    return rng.standard_normal(n)


def pink_noise(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with a 1/f power spectrum (amplitude 1/sqrt(f), DC removed)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0.0
    return np.fft.irfft(spec, n)


def clicking(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sharp decaying noise clicks every 100-500 ms (+-20 % jitter)."""
    out = np.zeros(n)
    period = rng.uniform(0.1, 0.5)
    length = int(0.006 * sr)
    pos = rng.uniform(0, period)
    while int(pos * sr) < n:
        i = int(pos * sr)
        tau = rng.uniform(0.0003, 0.0015) * sr
        click = rng.standard_normal(length) * np.exp(-np.arange(length) / tau)
        out[i:i + length] += click[: n - i]
        pos += period * rng.uniform(0.8, 1.2)
    return out


def speech(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """eSpeak NG reading random words with a random English voice (see module docstring)."""
    from esc.data.espeak import list_voices, synthesize

    voices = list_voices()
    parts, total = [], 0
    while total < n:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
        wav = synthesize(text, voice=voices[int(rng.integers(len(voices)))], rate=int(rng.integers(130, 231)),
                         pitch=int(rng.integers(25, 76)), sample_rate=sr)
        nz = np.flatnonzero(np.abs(wav) > 1e-3)  # trim leading/trailing silence
        wav = wav[nz[0]:nz[-1] + 1] if nz.size else wav
        parts.append(wav)
        total += len(wav)
    return np.concatenate(parts)[:n].astype(np.float64)


GENERATORS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "Speech": speech, "Sine wave": sine_wave, "Beep, bleep": beep, "Dial tone": dial_tone,
    "Telephone dialing, DTMF": dtmf, "White noise": white_noise, "Pink noise": pink_noise, "Clicking": clicking,
}


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2)) + 1e-12)


def make_clip(spec: TaggingSpec, index: int, classes: Sequence[str]) -> np.ndarray:
    """One clip holding ``classes`` (one class, or two summed), from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([spec.seed, index])
    n, sr = spec.clip_samples, spec.sample_rate
    if list(classes) == ["Silence"]:
        return pcm_to_float(float_to_pcm(rng.standard_normal(n) * 10 ** (spec.silence_dither_db / 20)))
    mix = np.zeros(n)
    for k, name in enumerate(classes):
        if name not in GENERATORS:
            raise ValueError(f"no generator for class {name!r} (Silence cannot be mixed); known: {sorted(GENERATORS)}")
        x = GENERATORS[name](n, sr, rng)
        gain = 1.0 if k == 0 else 10 ** (rng.uniform(*spec.mix_gain_db) / 20)
        mix += gain * x / _rms(x)
    mix *= 10 ** (rng.uniform(*spec.level_db) / 20) / _rms(mix)
    peak = np.abs(mix).max()
    if peak > 0.99:
        mix *= 0.99 / peak
    return pcm_to_float(float_to_pcm(mix))


def clip_classes(spec: TaggingSpec) -> list[list[str]]:
    """Which classes each clip holds: single classes cycling, then mixtures of two distinct non-silent classes."""
    for c in spec.classes:
        if c != "Silence" and c not in GENERATORS:
            raise ValueError(f"unknown tagging class {c!r}; choose from {list(CLASSES)}")
    n_single = int(round(spec.num_clips * (1.0 - spec.mixture_fraction)))
    out = [[spec.classes[i % len(spec.classes)]] for i in range(n_single)]
    mixable = [c for c in spec.classes if c != "Silence"]
    if spec.num_clips > n_single and len(mixable) < 2:
        raise ValueError(f"mixtures need two non-silent classes; got {list(spec.classes)} (set mixture_fraction=0)")
    rng = np.random.default_rng([spec.seed, 2**31 - 1])
    for _ in range(spec.num_clips - n_single):
        a, b = rng.choice(len(mixable), size=2, replace=False)
        out.append([mixable[a], mixable[b]])
    return out


def generate(spec: TaggingSpec) -> TaggingSet:
    """Synthesise the set described by ``spec``."""
    from tqdm import tqdm

    members = clip_classes(spec)
    waves = np.zeros((spec.num_clips, spec.clip_samples), dtype=np.float32)
    labels = np.zeros((spec.num_clips, len(spec.classes)), dtype=np.uint8)
    for i, cls in enumerate(tqdm(members, desc=f"tagging clips (seed {spec.seed})", leave=False)):
        waves[i] = make_clip(spec, i, cls)
        labels[i, [spec.classes.index(c) for c in cls]] = 1
    return TaggingSet(waves, labels, tuple(spec.classes), spec.sample_rate, spec)


def load_or_generate(spec: TaggingSpec, cache_dir: str | Path = "data/tagging", split: str = "test") -> TaggingSet:
    """The set for ``spec``, from ``<cache_dir>/<split>-<hash>.npz`` or synthesised and cached there."""
    path = Path(cache_dir) / f"{split}-{spec.key()}.npz"
    if path.is_file():
        return read_npz(path, lambda z: TaggingSet(z["waves"], z["labels"], tuple(json.loads(str(z["classes"]))),
                                                   int(z["sample_rate"]), spec),
                        "delete it to synthesise the set again")
    log.info("synthesising %d tagging clips (%s, seed %d) -> %s", spec.num_clips, split, spec.seed, path)
    data = generate(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, waves=data.waves, labels=data.labels, classes=json.dumps(list(data.classes)),
             sample_rate=data.sample_rate, spec=json.dumps(asdict(spec)), sha256=data.sha256)
    tmp.replace(path)
    return data


def main() -> None:
    """Synthesise the default test (seed 0, 720 clips) and calibration (seed 1, 256 clips) sets."""
    logging.basicConfig(level=logging.INFO)
    for split, spec in (("test", TaggingSpec(720, 0)), ("calibration", TaggingSpec(256, 1))):
        data = load_or_generate(spec, "data/tagging", split)
        print(split, data.waves.shape, data.labels.sum(0).tolist())


if __name__ == "__main__":
    main()
