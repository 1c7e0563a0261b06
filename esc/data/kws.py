"""Synthetic Speech-Commands-V2-style keyword data, spoken by eSpeak NG (offline, deterministic).

What is generated (all constants are fields of :class:`KWSConfig`):

* the 35 Speech Commands V2 words (:data:`WORDS`), 1 s clips at 16 kHz, int16 on disk;
* speakers ("voices") are an English eSpeak NG language voice (accent: en, en-us, en-gb-x-rp,
  ...) combined with a voice variant (``voices/!v``: m1..m7, f1..f5, klatt, croak, ... plus the
  language's own default). The variants are partitioned between the splits first
  (``valid_variants`` and ``test_variants`` of them go to valid and test, the rest to train),
  then each split draws ``num_voices[split]`` (accent, variant) voices from its own partition,
  so test speakers are unseen in training: no variant (voice timbre) is shared across splits;
* each voice has a base speaking rate (``rate_range`` wpm), base pitch (``pitch_range``, 0..100)
  and intonation range (``intonation_range``); every clip jitters rate by up to
  ``rate_jitter`` (relative) and pitch by up to ``pitch_jitter`` (absolute);
* post-processing of each clip: the utterance is trimmed of leading/trailing silence (samples
  under ``trim_threshold`` of the peak), placed at a uniformly random offset in the 1 s window
  (centre-cropped if longer), scaled to a random peak level of ``peak_db`` dBFS, and, with
  probability ``noise_prob``, mixed with white, pink (1/f power) or brown (1/f^2 power) noise at
  an SNR uniform in ``snr_db`` (relative to the speech RMS over the utterance); finally clipped
  to [-1, 1] and stored as int16;
* everything is drawn from ``numpy.random.Generator(SeedSequence([seed, split_index]))``, and every
  eSpeak NG utterance is a pure function of its request (:mod:`esc.data.espeak`), so a config gives
  the same bytes every time, in any process (tested across processes).

The data set is cached as a folder ``<data_dir>/kws_<hash>/`` (hash of the config) of ``.npy``
arrays (``<split>_<field>.npy``) plus ``meta.json``, which records a content hash of every split
(:func:`split_hash`: SHA-256 over its audio, labels and voices; result rows record it); audio is
memory-mapped on load, so a run reads only the clips it uses. It is generated on first use by :func:`load_kws` or ahead of time by
``python -m esc.data.kws``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchaudio
from tqdm import tqdm

from esc.core.files import RefusedFileError
from esc.data import espeak
from esc.data.audio import content_hash, float_to_pcm, pcm_to_float

log = logging.getLogger(__name__)

WORDS = ("backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
         "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
         "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero")
SPLITS = ("train", "valid", "test")
DEFAULT_VARIANT = "default"  # the language voice without a variant
FORMAT_VERSION = 2  # 2: deterministic eSpeak synthesis (one forked child per utterance)


@dataclass(frozen=True)
class KWSConfig:
    """Every parameter of the synthetic keyword data set (see the module docstring)."""

    words: tuple[str, ...] = WORDS
    num_voices: tuple[int, int, int] = (360, 24, 72)  # train, valid, test
    clips_per_word: tuple[int, int, int] = (2, 1, 1)  # per voice, train, valid, test
    valid_variants: int = 10
    test_variants: int = 22
    languages: tuple[str, ...] = espeak.ENGLISH_LANGUAGES
    seed: int = 0
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    rate_range: tuple[float, float] = (130.0, 230.0)
    rate_jitter: float = 0.12
    pitch_range: tuple[float, float] = (20.0, 80.0)
    pitch_jitter: float = 8.0
    intonation_range: tuple[float, float] = (10.0, 90.0)
    trim_threshold: float = 0.02
    peak_db: tuple[float, float] = (-20.0, -1.0)
    noise_prob: float = 0.9
    snr_db: tuple[float, float] = (5.0, 35.0)
    noise_types: tuple[str, ...] = ("white", "pink", "brown")

    def __post_init__(self) -> None:
        for name in ("words", "num_voices", "clips_per_word", "languages", "rate_range", "pitch_range",
                     "intonation_range", "peak_db", "snr_db", "noise_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.num_voices) != 3 or len(self.clips_per_word) != 3:
            raise ValueError("num_voices and clips_per_word need three entries: (train, valid, test)")
        unknown = [w for w in self.words if not w.strip()]
        if unknown or len(set(self.words)) != len(self.words):
            raise ValueError(f"words must be distinct non-empty strings, got {self.words}")
        bad = set(self.noise_types) - {"white", "pink", "brown"}
        if bad:
            raise ValueError(f"unknown noise types {sorted(bad)}; use white, pink, brown")

    def digest(self) -> str:
        """Short hash naming the cache file of this config."""
        blob = json.dumps({"v": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def num_samples(self) -> int:
        """Samples per clip."""
        return int(round(self.sample_rate * self.clip_seconds))


@dataclass
class KWSSplit:
    """One split: ``pcm`` int16 ``[N, samples]``, ``labels`` int64 ``[N]``, ``voice_ids`` int64 ``[N]`` into ``voices``.

    The audio stays int16 in memory; :meth:`audio` / :attr:`waveforms` give float32.
    """

    pcm: np.ndarray
    labels: np.ndarray
    voice_ids: np.ndarray
    voices: list[str]
    words: tuple[str, ...] = field(default=WORDS)
    digest: Optional[str] = None  # content hash from the data set's manifest (computed when absent)

    @property
    def sha256(self) -> str:
        """The split's content hash (:func:`split_hash`), read from the manifest when the split was loaded from one."""
        if self.digest is None:
            self.digest = split_hash(self)
        return self.digest

    def __len__(self) -> int:
        return len(self.labels)

    def audio(self, index=slice(None)) -> np.ndarray:
        """Float32 waveforms ``[n, samples]`` of the clips selected by ``index`` (a slice or index array)."""
        return pcm_to_float(self.pcm[index])

    @property
    def waveforms(self) -> np.ndarray:
        """All clips as float32 ``[N, samples]`` (a fresh array; prefer :meth:`audio` for subsets)."""
        return self.audio()


# ----------------------------------------------------------------------------------- generation
def split_voices(config: KWSConfig) -> dict[str, list[str]]:
    """The voices of each split: variants partitioned across splits, then voices drawn per split."""
    variants = [DEFAULT_VARIANT, *espeak.list_variants()]
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 99]))
    order = [variants[i] for i in rng.permutation(len(variants))]
    n_test, n_valid = config.test_variants, config.valid_variants
    if n_test < 1 or n_valid < 1 or n_test + n_valid >= len(order):
        raise ValueError(f"test_variants={n_test} and valid_variants={n_valid} must be >= 1 and leave train variants "
                         f"out of the {len(order)} available")
    parts = {"test": order[:n_test], "valid": order[n_test:n_test + n_valid], "train": order[n_test + n_valid:]}
    out = {}
    for i, split in enumerate(SPLITS):
        pool = [lang if v == DEFAULT_VARIANT else f"{lang}+{v}" for v in parts[split] for lang in config.languages]
        n = config.num_voices[i]
        if not 1 <= n <= len(pool):
            raise ValueError(f"num_voices for {split} is {n} but its {len(parts[split])} variants x "
                             f"{len(config.languages)} languages give {len(pool)} voices; lower it or raise {split}_variants")
        out[split] = [pool[j] for j in sorted(rng.choice(len(pool), size=n, replace=False))]
    return out


def _noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Unit-RMS noise of ``n`` samples with a white (flat), pink (1/f) or brown (1/f^2) power spectrum."""
    white = rng.standard_normal(n)
    if kind != "white":
        spec = np.fft.rfft(white)
        f = np.arange(spec.size, dtype=np.float64)
        f[0] = 1.0
        spec /= np.sqrt(f) if kind == "pink" else f
        spec[0] = 0.0
        white = np.fft.irfft(spec, n)
    return white / max(float(np.sqrt(np.mean(white ** 2))), 1e-12)


def _place(rng: np.random.Generator, speech: np.ndarray, config: KWSConfig) -> tuple[np.ndarray, np.ndarray]:
    """Trim, shift and level one utterance into a ``num_samples`` window; returns (clip, speech mask)."""
    n = config.num_samples
    peak = float(np.abs(speech).max())
    loud = np.flatnonzero(np.abs(speech) > config.trim_threshold * peak)
    speech = speech[loud[0]:loud[-1] + 1]
    if speech.size > n:
        start = (speech.size - n) // 2
        speech = speech[start:start + n]
    offset = int(rng.integers(0, n - speech.size + 1))
    clip = np.zeros(n, dtype=np.float64)
    clip[offset:offset + speech.size] = speech
    clip *= 10 ** (rng.uniform(*config.peak_db) / 20) / max(float(np.abs(speech).max()), 1e-12)
    mask = np.zeros(n, dtype=bool)
    mask[offset:offset + speech.size] = True
    return clip, mask


def generate_split(config: KWSConfig, split: str, voices: list[str], progress: bool = True) -> KWSSplit:
    """Synthesise one split (see the module docstring for every step)."""
    idx = SPLITS.index(split)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, idx]))
    per_word = config.clips_per_word[idx]
    jobs = []  # (voice id, label, rate, pitch, intonation)
    for v in range(len(voices)):
        base_rate = rng.uniform(*config.rate_range)
        base_pitch = rng.uniform(*config.pitch_range)
        intonation = rng.uniform(*config.intonation_range)
        for label in range(len(config.words)):
            for _ in range(per_word):
                rate = base_rate * (1 + rng.uniform(-config.rate_jitter, config.rate_jitter))
                pitch = float(np.clip(base_pitch + rng.uniform(-config.pitch_jitter, config.pitch_jitter), 0, 100))
                jobs.append((v, label, int(round(rate)), int(round(pitch)), int(round(intonation))))
    native = espeak.native_sample_rate()
    n = config.num_samples
    out = np.zeros((len(jobs), n), dtype=np.int16)
    chunk = 256
    bar = tqdm(total=len(jobs), desc=f"kws {split}", disable=not progress, unit="clip")
    for start in range(0, len(jobs), chunk):
        batch = jobs[start:start + chunk]
        pcms = [espeak.synthesize_native(config.words[lab], voices[v], rate=r, pitch=p, pitch_range=it)
                for v, lab, r, p, it in batch]
        width = max(p.size for p in pcms)
        padded = np.zeros((len(pcms), width), dtype=np.float32)
        for i, p in enumerate(pcms):
            padded[i, :p.size] = pcm_to_float(p)
        res = torchaudio.functional.resample(torch.from_numpy(padded), native, config.sample_rate).numpy()
        for i, p in enumerate(pcms):
            speech = res[i, :int(np.ceil(p.size * config.sample_rate / native))].astype(np.float64)
            clip, mask = _place(rng, speech, config)
            if rng.random() < config.noise_prob:
                kind = config.noise_types[int(rng.integers(len(config.noise_types)))]
                snr = rng.uniform(*config.snr_db)
                rms = float(np.sqrt(np.mean(clip[mask] ** 2)))
                clip = clip + _noise(rng, kind, n) * rms * 10 ** (-snr / 20)
            out[start + i] = float_to_pcm(clip)
        bar.update(len(batch))
    bar.close()
    labels = np.array([j[1] for j in jobs], dtype=np.int64)
    voice_ids = np.array([j[0] for j in jobs], dtype=np.int64)
    return KWSSplit(out, labels, voice_ids, list(voices), config.words)


def cache_path(data_dir: str | Path, config: KWSConfig) -> Path:
    """The folder where the data set of ``config`` is cached."""
    return Path(data_dir) / f"kws_{config.digest()}"


def split_hash(split: KWSSplit) -> str:
    """Content hash of a split: its audio, labels, voice ids and voice names (:func:`esc.data.audio.content_hash`)."""
    return content_hash(np.asarray(split.pcm), split.labels, split.voice_ids, list(split.voices))


def generate_kws(data_dir: str | Path, config: KWSConfig = KWSConfig(), progress: bool = True) -> Path:
    """Synthesise all splits of ``config`` and write them (atomically) to :func:`cache_path`.

    ``meta.json`` records the words, the config and each split's :func:`split_hash`.
    """
    path = cache_path(data_dir, config)
    start = time.perf_counter()
    voices = split_voices(config)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hashes = {}
    for split in SPLITS:
        s = generate_split(config, split, voices[split], progress)
        for name, array in (("waveforms", s.pcm), ("labels", s.labels), ("voice_ids", s.voice_ids)):
            np.save(tmp / f"{split}_{name}.npy", array)
        (tmp / f"{split}_voices.json").write_text(json.dumps(list(s.voices)))
        hashes[split] = split_hash(s)
        log.info("kws %s: %d clips, %d voices (%d variants), %d words, sha256 %s", split, len(s), len(s.voices),
                 len({v.partition('+')[2] or DEFAULT_VARIANT for v in s.voices}), len(config.words), hashes[split])
    (tmp / "meta.json").write_text(json.dumps({"words": list(config.words), "config": dataclasses.asdict(config),
                                               "sha256": hashes}, sort_keys=True))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same data set first
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in path.iterdir())
    log.info("kws data set written to %s (%.1f MB) in %.1f s", path, size / 1e6, time.perf_counter() - start)
    return path


def load_kws(data_dir: str | Path, config: KWSConfig = KWSConfig(), generate: bool = True,
             progress: bool = True, splits: tuple[str, ...] = SPLITS) -> dict[str, KWSSplit]:
    """The ``splits`` of ``config`` (int16 audio memory-mapped), generated into ``data_dir`` on first use."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown kws splits {sorted(unknown)}; choose among {SPLITS}")
    path = cache_path(data_dir, config)
    if not path.is_dir():
        if not generate:
            raise FileNotFoundError(f"no kws data set at {path}; run `python -m esc.data.kws --data-dir {data_dir}` (make data)")
        log.info("kws data set %s not found; generating it", path)
        generate_kws(data_dir, config, progress)
    try:
        meta = json.loads((path / "meta.json").read_text())
        words = tuple(meta["words"])
        out = {s: KWSSplit(np.load(path / f"{s}_waveforms.npy", mmap_mode="r"), np.load(path / f"{s}_labels.npy"),
                           np.load(path / f"{s}_voice_ids.npy"), json.loads((path / f"{s}_voices.json").read_text()), words,
                           meta["sha256"][s])
               for s in splits}
    except Exception as e:
        raise RefusedFileError(f"kws cache {path} is unreadable ({e}); delete it and rerun `python -m esc.data.kws`") from e
    return out


def config_from_kwargs(**kwargs) -> KWSConfig:
    """A :class:`KWSConfig` from keyword arguments (lists from YAML become tuples; ``None`` values are ignored)."""
    clean = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if v is not None}
    names = {f.name for f in dataclasses.fields(KWSConfig)}
    unknown = set(clean) - names
    if unknown:
        raise ValueError(f"unknown kws data parameters {sorted(unknown)}; valid ones: {sorted(names)}")
    return KWSConfig(**clean)


def main(argv: Optional[list[str]] = None) -> None:
    """CLI: ``python -m esc.data.kws [--data-dir data/kws] [--seed 0] [--num-voices 360 24 72] [--clips-per-word 2 1 1]``."""
    ap = argparse.ArgumentParser(description="Generate the synthetic keyword-spotting data set (eSpeak NG).")
    ap.add_argument("--data-dir", default="data/kws")
    ap.add_argument("--seed", type=int, default=KWSConfig.seed)
    ap.add_argument("--num-voices", type=int, nargs=3, default=KWSConfig.num_voices, metavar=("TRAIN", "VALID", "TEST"))
    ap.add_argument("--clips-per-word", type=int, nargs=3, default=KWSConfig.clips_per_word, metavar=("TRAIN", "VALID", "TEST"))
    ap.add_argument("--config-json", help="a full KWSConfig as JSON (overrides --seed/--num-voices/--clips-per-word)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--force", action="store_true", help="regenerate even if the cache exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.config_json:
        config = config_from_kwargs(**json.loads(args.config_json))
    else:
        config = KWSConfig(seed=args.seed, num_voices=tuple(args.num_voices), clips_per_word=tuple(args.clips_per_word))
    path = cache_path(args.data_dir, config)
    if path.is_dir() and not args.force:
        log.info("kws data set already at %s (use --force to regenerate)", path)
        return
    shutil.rmtree(path, ignore_errors=True)
    generate_kws(args.data_dir, config, progress=not args.no_progress)


if __name__ == "__main__":
    main()
