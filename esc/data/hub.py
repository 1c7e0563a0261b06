"""Hugging Face hub data sets (the paper's rows; need internet) as the arrays the offline tasks use.

* :func:`load_speech_commands` -> :class:`esc.data.kws.KWSSplit` (``google/speech_commands``, config
  ``v0.02``): the 35 words (``_silence_`` rows dropped), label *names* kept in ``words`` so the KWS
  task maps them by name onto the model's ``id2label``; 1 s clips padded/cropped to 16000 samples.
  Note: the hub's ``test`` split is the separately released v0.02 test archive (4,890 clips,
  dominated by the 10 command words, other words marked ``is_unknown``), not the 11,005-clip
  ``testing_list.txt`` of the AST paper; ``validation`` (``validation_list.txt``) covers all words.
* :func:`load_librispeech` -> list of :class:`esc.data.asr.Clip` (``openslr/librispeech_asr``,
  config ``clean`` / ``other``, split ``test``): waveform, reference text, speaker.
* :func:`load_esc50` -> :class:`esc.data.tagging.TaggingSet` (``ashraq/esc50``): ESC-50 clips with
  one-hot targets over AudioSet display names (:data:`ESC50_TO_AUDIOSET`), for zero-shot tagging
  with an AudioSet model. Categories without an AudioSet counterpart are dropped.

Decoding: every loader casts the audio column to ``datasets.Audio(decode=False)`` and decodes the
``{"bytes", "path"}`` entries with ``soundfile`` itself (:func:`decode_audio`: mono mixdown, then
``torchaudio.functional.resample`` to 16 kHz), so neither torchcodec nor FFmpeg is needed (datasets
5.x decodes audio only through torchcodec). Formats: whatever libsndfile reads (WAV, FLAC, OGG...);
a row that fails raises :class:`esc.data.audio.AudioLoadError` naming the row and its file.

``path`` is a hub id or a local data set (:mod:`esc.data.hub_open`); a hub that cannot be
reached raises :class:`esc.data.hub_access.HubUnavailableError`. ``max_samples`` takes a seeded
random subset (sorted, so the order stays the data set's).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torchaudio
from tqdm import tqdm

from esc.data.audio import AudioLoadError
from esc.data.hub_open import open_dataset

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000

#: ESC-50 category -> AudioSet display name (the names of AST-AudioSet's ``id2label`` and YAMNet's
#: class map). Categories left out have no AudioSet class: drinking_sipping, can_opening, washing_machine.
ESC50_TO_AUDIOSET: dict[str, str] = {
    "dog": "Dog", "rooster": "Crowing, cock-a-doodle-doo", "pig": "Pig", "cow": "Cattle, bovinae", "frog": "Frog",
    "cat": "Cat", "hen": "Chicken, rooster", "insects": "Insect", "sheep": "Sheep", "crow": "Crow",
    "rain": "Rain", "sea_waves": "Waves, surf", "crackling_fire": "Fire", "crickets": "Cricket",
    "chirping_birds": "Bird vocalization, bird call, bird song", "water_drops": "Drip", "wind": "Wind",
    "pouring_water": "Pour", "toilet_flush": "Toilet flush", "thunderstorm": "Thunderstorm",
    "crying_baby": "Baby cry, infant cry", "sneezing": "Sneeze", "clapping": "Clapping", "breathing": "Breathing",
    "coughing": "Cough", "footsteps": "Walk, footsteps", "laughing": "Laughter", "brushing_teeth": "Toothbrush",
    "snoring": "Snoring", "door_wood_knock": "Knock", "mouse_click": "Clicking", "keyboard_typing": "Typing",
    "door_wood_creaks": "Creak", "vacuum_cleaner": "Vacuum cleaner", "clock_alarm": "Alarm clock",
    "clock_tick": "Tick", "glass_breaking": "Shatter", "helicopter": "Helicopter", "chainsaw": "Chainsaw",
    "siren": "Siren", "car_horn": "Vehicle horn, car horn, honking", "engine": "Engine", "train": "Train",
    "church_bells": "Church bell", "airplane": "Fixed-wing aircraft, airplane", "fireworks": "Fireworks",
    "hand_saw": "Sawing",
}


def subset_indices(n: int, max_samples: Optional[int], seed: int = 0) -> np.ndarray:
    """All of ``range(n)``, or ``max_samples`` of them drawn without replacement with ``seed`` (sorted)."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    if max_samples < 1:
        raise ValueError(f"max_samples={max_samples}; give a positive number or null for all {n} rows")
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_samples), replace=False))


# ------------------------------------------------------------------------------ decoding
def decode_audio(entry: Any, sample_rate: int = SAMPLE_RATE, where: str = "row") -> np.ndarray:
    """Decode one ``Audio(decode=False)`` entry (``{"bytes", "path"}``) with soundfile to mono float32 at ``sample_rate``.

    Bytes win over the path (hub parquet rows carry bytes; the path is then only a name).

    Raises:
        AudioLoadError: no data, undecodable bytes/file, or no samples; the message names ``where`` and the file.
    """
    import soundfile as sf

    if isinstance(entry, Mapping):
        data, file = entry.get("bytes"), entry.get("path")
    elif isinstance(entry, (str, Path)):
        data, file = None, str(entry)
    else:
        raise AudioLoadError(f"{where}: audio entry of type {type(entry).__name__}; expected {{'bytes', 'path'}} "
                             "(cast the column to datasets.Audio(decode=False))")
    label = f"{where} ({file})" if file else where
    try:
        if data is not None:
            wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        elif file:
            if not Path(file).is_file():
                raise AudioLoadError(f"audio file not found: {file}")
            wav, sr = sf.read(file, dtype="float32", always_2d=True)
        else:
            raise AudioLoadError("no audio bytes and no path")
    except AudioLoadError as e:
        raise AudioLoadError(f"could not read the audio of {label}: {e}") from e
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on bad input
        raise AudioLoadError(f"could not decode the audio of {label}: {e} (corrupt, or not a format libsndfile "
                             "reads; remove the row or re-encode it as WAV/FLAC)") from e
    if wav.size == 0:
        raise AudioLoadError(f"the audio of {label} holds no samples; remove the row")
    mono = torch.from_numpy(np.ascontiguousarray(wav.mean(axis=1)))
    if sr != sample_rate:
        mono = torchaudio.functional.resample(mono, int(sr), int(sample_rate))
    return mono.numpy().astype(np.float32, copy=False)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Zero-pad at the end or crop to ``num_samples``."""
    if len(wave) >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - len(wave)))


def _decode_rows(ds, idx: np.ndarray, audio_column: str, source: str, sample_rate: int, progress: bool,
                 skipped: Optional[list[str]] = None):
    """``(row index, row, wave)`` for the rows ``idx``; an undecodable row raises, or with a ``skipped``
    list is logged, appended to it (its message) and left out."""
    rows = ds.select(idx.tolist()) if len(idx) != len(ds) else ds
    for k, row in enumerate(tqdm(rows, total=len(idx), desc=f"decoding {source}", disable=not progress)):
        try:
            wave = decode_audio(row[audio_column], sample_rate, f"{source} row {int(idx[k])}")
        except AudioLoadError as e:
            if skipped is None:
                raise AudioLoadError(f"{e}; or set task.skip_bad_files=true to leave such rows out") from e
            log.warning("skipping %s", e)
            skipped.append(str(e))
            continue
        yield int(idx[k]), row, wave


def label_names(ds, column: str) -> list[str]:
    """Names of a label column's values: ClassLabel names, else the values themselves (as strings)."""
    feature = ds.features[column]
    names = getattr(feature, "names", None)
    values = ds[column]
    return [names[int(v)] for v in values] if names is not None else [str(v) for v in values]


# ------------------------------------------------------------------------------ loaders
def load_speech_commands(path: str = "google/speech_commands", name: Optional[str] = "v0.02", split: str = "test",
                         words: Optional[Sequence[str]] = None, max_samples: Optional[int] = None, seed: int = 0,
                         clip_samples: int = 16000, sample_rate: int = SAMPLE_RATE, revision: Optional[str] = None,
                         cache_dir: Optional[str] = None, label_column: str = "label", audio_column: str = "audio",
                         progress: bool = True, revisions: Optional[dict[str, str]] = None,
                         skipped: Optional[list[str]] = None):
    """Speech Commands rows as a :class:`esc.data.kws.KWSSplit` (``words`` = label names, default the 35 words).

    Rows whose label is not in ``words`` (``_silence_``) are dropped before ``max_samples`` is drawn.
    ``voice_ids`` index ``voices`` (the ``speaker_id`` column, or one ``unknown`` voice). ``revisions``
    gets the resolved commit of a hub data set (:func:`esc.data.hub_open.load_split`), as in every loader here; with a
    ``skipped`` list, undecodable rows are left out and their messages appended (else they raise).
    """
    from esc.data.kws import WORDS, KWSSplit

    words = tuple(words) if words is not None else WORDS
    ds = open_dataset(path, name, split, revision, cache_dir, audio_column, revisions)
    if label_column not in ds.column_names:
        raise ValueError(f"{path} has no label column {label_column!r}; its columns are {ds.column_names}")
    names = label_names(ds, label_column)
    keep = np.array([i for i, w in enumerate(names) if w in words], dtype=np.int64)
    if len(keep) == 0:
        raise ValueError(f"no row of {path} [{split}] has a label in {list(words)[:5]}...; its labels are {sorted(set(names))[:10]}")
    idx = keep[subset_indices(len(keep), max_samples, seed)]
    speakers = ds["speaker_id"] if "speaker_id" in ds.column_names else None
    waves, labels, voice_ids, voices = [], [], [], {}
    source = f"{path}[{split}]"
    for i, row, wave in _decode_rows(ds, idx, audio_column, source, sample_rate, progress, skipped):
        waves.append(fit_length(wave, clip_samples))
        labels.append(words.index(names[int(i)]))
        spk = str(speakers[int(i)]) if speakers is not None else "unknown"
        voice_ids.append(voices.setdefault(spk, len(voices)))
    log.info("%s: %d clips of %d words", source, len(waves), len(set(labels)))
    return KWSSplit(np.stack(waves).astype(np.float32), np.asarray(labels, dtype=np.int64),
                    np.asarray(voice_ids, dtype=np.int64), list(voices), words)


def load_librispeech(path: str = "openslr/librispeech_asr", name: Optional[str] = "clean", split: str = "test",
                     max_samples: Optional[int] = None, seed: int = 0, sample_rate: int = SAMPLE_RATE,
                     revision: Optional[str] = None, cache_dir: Optional[str] = None, text_column: str = "text",
                     audio_column: str = "audio", progress: bool = True, revisions: Optional[dict[str, str]] = None,
                     skipped: Optional[list[str]] = None):
    """LibriSpeech rows as a list of :class:`esc.data.asr.Clip` (wave float32 at 16 kHz, reference text, speaker)."""
    from esc.data.asr import Clip

    ds = open_dataset(path, name, split, revision, cache_dir, audio_column, revisions)
    if text_column not in ds.column_names:
        raise ValueError(f"{path} has no transcript column {text_column!r}; its columns are {ds.column_names}")
    idx = subset_indices(len(ds), max_samples, seed)
    source = f"{path}/{name or ''}[{split}]"
    clips = []
    for i, row, wave in _decode_rows(ds, idx, audio_column, source, sample_rate, progress, skipped):
        clips.append(Clip(wave=wave, text=str(row[text_column]), voice=str(row.get("speaker_id", "unknown")),
                          meta={"row": int(i), "id": row.get("id")}))
    log.info("%s: %d utterances, %.1f min", source, len(clips), sum(len(c.wave) for c in clips) / sample_rate / 60)
    return clips


def load_esc50(path: str = "ashraq/esc50", split: str = "train", folds: Optional[Sequence[int]] = None,
               class_map: Optional[Mapping[str, str]] = None, max_samples: Optional[int] = None, seed: int = 0,
               clip_samples: int = 5 * SAMPLE_RATE, sample_rate: int = SAMPLE_RATE, revision: Optional[str] = None,
               cache_dir: Optional[str] = None, category_column: str = "category", fold_column: str = "fold",
               audio_column: str = "audio", progress: bool = True, revisions: Optional[dict[str, str]] = None,
               skipped: Optional[list[str]] = None):
    """ESC-50 rows of ``folds`` as a :class:`esc.data.tagging.TaggingSet` over AudioSet names.

    ``class_map`` (ESC-50 category -> AudioSet display name, default :data:`ESC50_TO_AUDIOSET`)
    defines ``classes`` (its values, in order of first appearance); rows of unmapped categories are
    dropped. Clips are padded/cropped to ``clip_samples`` (ESC-50 clips are 5 s).
    """
    from esc.data.tagging import TaggingSet

    class_map = dict(ESC50_TO_AUDIOSET if class_map is None else class_map)
    classes = tuple(dict.fromkeys(class_map.values()))
    ds = open_dataset(path, None, split, revision, cache_dir, audio_column, revisions)
    if category_column not in ds.column_names:
        raise ValueError(f"{path} has no category column {category_column!r}; its columns are {ds.column_names}")
    cats = label_names(ds, category_column)
    fold_of = ds[fold_column] if folds is not None else None
    if folds is not None and fold_of is None:
        raise ValueError(f"{path} has no fold column {fold_column!r}; set folds: null")
    keep = np.array([i for i, c in enumerate(cats) if c in class_map and (folds is None or int(fold_of[i]) in folds)],
                    dtype=np.int64)
    if len(keep) == 0:
        raise ValueError(f"no row of {path} [{split}] in folds {folds} has a category of class_map")
    idx = keep[subset_indices(len(keep), max_samples, seed)]
    waves, labels = [], []
    source = f"{path}[{split}]"
    for i, row, wave in _decode_rows(ds, idx, audio_column, source, sample_rate, progress, skipped):
        waves.append(fit_length(wave, clip_samples))
        labels.append(np.eye(len(classes), dtype=np.float32)[classes.index(class_map[cats[int(i)]])])
    labels = np.stack(labels) if labels else np.zeros((0, len(classes)), dtype=np.float32)
    log.info("%s folds %s: %d clips, %d classes", source, folds, len(waves), int((labels.sum(0) > 0).sum()))
    return TaggingSet(np.stack(waves).astype(np.float32), labels, classes, sample_rate)
