"""Result rows: one JSON file per run, written atomically, keyed by a hash of the run's config.

A row's key hashes exactly the axes that define a run (model, task, precision, calibrator, ptq,
calibration settings, seed), so rerunning a sweep skips every finished row and a killed sweep
resumes where it stopped. Rows that ended in an error are recorded too (``status: "error"``) and
are retried on the next run.
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

RUN_AXES = ("model", "task", "precision", "calibrator", "ptq", "calibration", "seed")
VERSIONED_PACKAGES = ("torch", "torchaudio", "evotorch", "cma", "hydra-core", "transformers", "numpy")


def run_key(axes: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of the run-defining config axes."""
    blob = json.dumps({k: axes[k] for k in RUN_AXES if k in axes}, sort_keys=True, default=str)
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
    """Library versions, Python, platform and git commit, recorded in every row."""
    versions = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": git_commit()}


def git_commit() -> str | None:
    """``HEAD`` of the repository this package lives in (with ``-dirty`` if modified), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None
