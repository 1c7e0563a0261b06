"""Result rows: one JSON file per run, written atomically, keyed by a hash of what defines the run.

A row's key (:func:`run_key`) hashes :data:`KEY_SCHEMA` and the values that define a run (model,
task, precision, scope, calibrator, ptq, calibration settings, seed), so rerunning a sweep skips
every finished row and a killed sweep resumes where it stopped. Keys never depend on where the
checkout lives: paths under the configured roots are hashed as ``${paths.<root>}/<rest>``
(:func:`portable`), so a moved checkout, ``ESC_ROOT`` or ``paths.data=...`` finds its rows and caches.
An option added after rows exist is listed in :data:`NEUTRAL_DEFAULTS` with the value those rows
implicitly had; runs with that value hash as if the option were absent, so no finished row is
orphaned. Rows that ended in an error are recorded too (``status: "error"``) and are retried on
the next run.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

#: Version of the key scheme; bumped only when what a key means changes (all rows then rerun).
KEY_SCHEMA = 2
#: Dotted option -> the value every row had before the option existed (dropped from keys when equal).
NEUTRAL_DEFAULTS: dict[str, Any] = {"model.revision": None, "scope.float_prefix": False, "task.skip_bad_files": False,
                                    "calibrator.max_batch": None, "calibrator.local_search": "exhaustive",
                                    "calibrator.theta_bound": 10.0, "task.fitness_loss": "ce", "task.eos_margin": 1.0,
                                    "task.eos_weight": 1.0}
VERSIONED_PACKAGES = ("torch", "torchaudio", "evotorch", "cma", "hydra-core", "transformers", "numpy", "onnxruntime")


def portable(value: Any, roots: dict[str, str]) -> Any:
    """``value`` (nested dicts/lists) with every string path under one of ``roots`` (name -> absolute
    directory) written as ``${name}/<relative path>``; the longest matching root wins."""
    if isinstance(value, dict):
        return {k: portable(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, roots) for v in value]
    if isinstance(value, str):
        for name, root in sorted(roots.items(), key=lambda item: -len(item[1])):
            root = root.rstrip("/")
            if root and (value == root or value.startswith(root + "/")):
                return "${" + name + "}" + value[len(root):]
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view ``{"calibrator.generations": 10, ...}`` of nested dicts (lists stay values)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def run_key(values: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of :data:`KEY_SCHEMA` and ``values`` (nested; options equal to their
    :data:`NEUTRAL_DEFAULTS` entry left out). Give it portable values (:func:`portable`)."""
    flat = {k: v for k, v in flatten(values).items() if k not in NEUTRAL_DEFAULTS or NEUTRAL_DEFAULTS[k] != v}
    blob = json.dumps({"schema": KEY_SCHEMA, "values": flat}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def row_path(rows_dir: str | Path, key: str) -> Path:
    """Where the row with ``key`` lives."""
    return Path(rows_dir) / f"{key}.json"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_row(path: str | Path) -> dict | None:
    """The row at ``path``, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(rows_dir: str | Path, key: str) -> bool:
    """True when a successful row exists for ``key``."""
    row = read_row(row_path(rows_dir, key))
    return row is not None and row.get("status") == "ok"


def read_rows(rows_dirs: Iterable[str | Path]) -> list[dict]:
    """All rows under the given directories (recursively)."""
    rows = []
    for d in rows_dirs:
        for p in sorted(Path(d).rglob("*.json")):
            row = read_row(p)
            if row is not None and "key" in row:
                rows.append(row)
    return rows


def provenance() -> dict[str, Any]:
    """Library versions, Python, platform, git commit and (for a modified tree) a hash of the diff, recorded in every row."""
    versions = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit, diff = git_state()
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": commit, "git_diff_sha256": diff}


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def git_state() -> tuple[str | None, str | None]:
    """``(commit, diff_hash)``: ``HEAD`` of this checkout with ``-dirty`` when tracked files are
    modified, and then the SHA-256 (16 hex digits) of ``git diff HEAD`` (else ``None``); ``(None, None)`` outside git."""
    try:
        sha = _git("rev-parse", "HEAD").strip()
        diff = _git("diff", "HEAD", "--no-color")
    except (OSError, subprocess.CalledProcessError):
        return None, None
    if not diff:
        return sha, None
    return sha + "-dirty", hashlib.sha256(diff.encode()).hexdigest()[:16]
