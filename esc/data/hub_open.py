"""One split of a Hugging Face hub data set or a local copy as a ``datasets.Dataset`` (audio left undecoded).

``path`` is a hub id (only the requested split is downloaded, see :func:`load_split`), a local
checkout of a hub repository (a folder with a ``README.md`` declaring its configs), or a local
data set: a ``save_to_disk`` folder, a ``.parquet`` / ``.arrow``
file or a folder of them, or a folder of audio files laid out like ``audiofolder`` (class
sub-folders become ``label``, ``metadata.csv`` adds columns such as ``text``; read by
:func:`folder_dataset`, since datasets' own ``audiofolder`` builder needs torchcodec to encode). Tests write such small local sets shaped like the
hub rows and run them through the same code.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from esc.data.hub_access import hub_access

log = logging.getLogger(__name__)

PARQUET_REVISION = "refs/convert/parquet"  # the hub's automatic parquet export of script-based data sets


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
