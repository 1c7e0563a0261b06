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

``path`` is a hub id (only the requested split is downloaded, see :func:`load_split`), a local
checkout of a hub repository (a folder with a ``README.md`` declaring its configs), or a local
data set: a ``save_to_disk`` folder, a ``.parquet`` / ``.arrow``
file or a folder of them, or a folder of audio files laid out like ``audiofolder`` (class
sub-folders become ``label``, ``metadata.csv`` adds columns such as ``text``; read by
:func:`folder_dataset`, since datasets' own ``audiofolder`` builder needs torchcodec to encode). Tests write such small local sets shaped like the
hub rows and run them through the same code. ``max_samples`` takes a seeded random subset (sorted,
so the order stays the data set's).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torchaudio
from tqdm import tqdm

from esc.core.errors import UserError
from esc.data.audio import AudioLoadError


class HubUnavailableError(UserError):
    """A hub model or data set could not be loaded (offline, or not in the local cache)."""


LOCAL_HINT = "give a local save_pretrained directory as name_or_path"


@contextlib.contextmanager
def hub_access(kind: str, name_or_path: str, alternative: str = LOCAL_HINT):
    """Turn a failed hub download (offline, no network, not cached) into a :class:`HubUnavailableError` saying what is needed.

    Only ``OSError`` (what transformers, huggingface_hub and datasets raise for unreachable or
    uncached files, ``ConnectionError`` included) is translated, and only for a name that is not
    an existing local path.
    """
    try:
        yield
    except OSError as e:
        if os.path.exists(name_or_path):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        raise HubUnavailableError(
            f"could not load the {kind} {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"It needs internet access to the Hugging Face hub once (then it is cached under $HF_HOME)"
            f"{'; HF_HUB_OFFLINE=1 is set, so only the cache is read' if offline else ''}. "
            f"Otherwise {alternative}.") from e


log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
PARQUET_REVISION = "refs/convert/parquet"  # the hub's automatic parquet export of script-based data sets

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

HUB_DATASETS = {
    "speechcommands": ("google/speech_commands", "v0.02"),
    "librispeech_clean": ("openslr/librispeech_asr", "clean"),
    "librispeech_other": ("openslr/librispeech_asr", "other"),
    "esc50": ("ashraq/esc50", None),
}


# ------------------------------------------------------------------------------ opening
def _pick_split(dsd, split: str, source: str):
    """One split of a ``DatasetDict`` (an only split is taken whatever its name)."""
    from datasets import DatasetDict

    if not isinstance(dsd, DatasetDict):
        return dsd
    if split in dsd:
        return dsd[split]
    if len(dsd) == 1:
        only = next(iter(dsd))
        log.info("%s has one split (%s); using it for %r", source, only, split)
        return dsd[only]
    raise ValueError(f"{source} has no split {split!r}; it has {sorted(dsd)}")


def _local_files(root: Path, suffix: str, split: str) -> list[str]:
    files = sorted(root.rglob(f"*{suffix}")) if root.is_dir() else [root]
    preferred = [f for f in files if split in f.relative_to(root).parts or f.name.startswith(split)] if root.is_dir() else []
    return [str(f) for f in (preferred or files)]


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def folder_dataset(root: Path, split: str = "test", audio_column: str = "audio"):
    """A folder of audio files as a ``datasets.Dataset``, like ``audiofolder`` but without its torchcodec encoding step.

    Uses ``root/<split>`` when it exists. Each file's parent folder (below that root) becomes
    ``label``; a ``metadata.csv`` with a ``file_name`` column (relative path) adds its other columns
    (e.g. ``text``). The audio column holds ``{"bytes": None, "path": <file>}``.
    """
    import csv

    from datasets import Dataset

    base = root / split if (root / split).is_dir() else root
    files = sorted(f for f in base.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {base}")
    columns: dict[str, list] = {audio_column: [{"bytes": None, "path": str(f)} for f in files]}
    parents = [f.parent.relative_to(base).as_posix() for f in files]
    if any(p != "." for p in parents):
        columns["label"] = [p.split("/")[-1] for p in parents]
    meta_files = list(base.rglob("metadata.csv"))
    if meta_files:
        meta = {}
        for mf in meta_files:
            with open(mf, newline="") as fh:
                for row in csv.DictReader(fh):
                    meta[(mf.parent / row.pop("file_name")).resolve()] = row
        keys = sorted({k for row in meta.values() for k in row})
        for k in keys:
            columns[k] = [meta.get(f.resolve(), {}).get(k) for f in files]
    return Dataset.from_dict(columns)


def load_split(path: str, name: Optional[str], split: str, revision: Optional[str] = None,
               cache_dir: Optional[str] = None, revisions: Optional[dict[str, str]] = None):
    """One split of a hub data set, downloading only that split's files.

    ``revisions``, when given, gets ``{path: commit}``: the commit ``revision`` resolved to (the
    builder's hash: the hub commit, or offline the cached one), for a hub id (not a local folder).

    ``datasets.load_dataset(path, name, split=...)`` downloads and prepares *every* split of the
    config (LibriSpeech ``clean`` would fetch 30 GB of training audio to read the 350 MB test
    set). For parquet/arrow repositories this reads the config's file list with
    ``load_dataset_builder`` and loads only ``split``'s files with the packaged builder and the
    repository's features; other repositories fall back to ``load_dataset``.
    """
    import datasets

    builder = datasets.load_dataset_builder(path, name, revision=revision, cache_dir=cache_dir)
    if revisions is not None and not Path(path).expanduser().exists():
        revisions[path] = builder.hash
    data_files = getattr(builder.config, "data_files", None) or {}
    kind = type(builder).__module__.rsplit(".", 1)[-1]
    if kind in ("parquet", "arrow") and split in data_files and len(data_files) > 1:
        log.info("%s: loading only the %r split (%d files)", path, split, len(data_files[split]))
        return datasets.load_dataset(kind, data_files={split: list(data_files[split])}, split=split,
                                     features=builder.info.features, cache_dir=cache_dir)
    if data_files and split not in data_files:
        raise ValueError(f"{path} ({name or 'default'}) has no split {split!r}; it has {sorted(data_files)}")
    return datasets.load_dataset(path, name, split=split, revision=revision, cache_dir=cache_dir)


def open_dataset(path: str, name: Optional[str] = None, split: str = "test", revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, audio_column: str = "audio", revisions: Optional[dict[str, str]] = None):
    """A ``datasets.Dataset`` (one split) whose ``audio_column`` is ``Audio(decode=False)``.

    ``path`` is a hub id (``name`` = config, ``revision`` = branch, tag or commit; a script-based hub
    data set is retried on its ``refs/convert/parquet`` export) or a local data set (see the module
    docstring). ``revisions`` records the resolved commit of a hub id (:func:`load_split`).
    """
    import datasets
    from datasets import Audio

    local = Path(path).expanduser()
    repo_like = local.is_dir() and (local / "README.md").is_file()  # a hub repository checked out locally
    if local.exists() and not repo_like:
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
                               or (local / "state.json").is_file()):
            ds = _pick_split(datasets.load_from_disk(str(local)), split, str(local))
        elif (local.is_file() and local.suffix == ".parquet") or (local.is_dir() and any(local.rglob("*.parquet"))):
            ds = datasets.load_dataset("parquet", data_files=_local_files(local, ".parquet", split), split="train",
                                       cache_dir=cache_dir)
        elif (local.is_file() and local.suffix == ".arrow") or (local.is_dir() and any(local.rglob("*.arrow"))):
            ds = datasets.load_dataset("arrow", data_files=_local_files(local, ".arrow", split), split="train",
                                       cache_dir=cache_dir)
        elif local.is_dir():
            ds = folder_dataset(local, split, audio_column)
        else:
            raise ValueError(f"{local} is neither a data set folder nor a .parquet/.arrow file")
    else:

        where = f"{path}{'/' + name if name else ''}[{split}]"
        with hub_access("data set", where, "give path: a local copy (parquet / arrow files, a save_to_disk folder, "
                                           "or a folder of audio files)"):
            try:
                ds = load_split(path, name, split, revision, cache_dir, revisions)
            except RuntimeError as e:
                if "scripts are no longer supported" not in str(e) or revision is not None:
                    raise
                log.info("%s is script-based; loading its parquet export (%s)", path, PARQUET_REVISION)
                ds = load_split(path, name, split, PARQUET_REVISION, cache_dir, revisions)
    if audio_column not in ds.column_names:
        raise ValueError(f"data set {path} has no audio column {audio_column!r}; its columns are {ds.column_names}")
    return ds.cast_column(audio_column, Audio(decode=False))


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
    gets the resolved commit of a hub data set (:func:`load_split`), as in every loader here; with a
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
