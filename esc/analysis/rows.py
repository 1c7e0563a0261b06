"""Helpers for the notebooks in ``notebooks/``: where rows and figures live, reading rows, notes.

Notebooks never rerun a sweep: they read the rows of a study from ``$ESC_ROWS`` (default
``results/<study>/rows``, where curated rows are committed) and write PNG figures to
``$ESC_FIGURES`` (default ``results/figures``). Without ``$ESC_ROWS`` and without committed rows, the
raw rows of a local sweep (``experiments/rows/<study>``) are read instead. ``$ESC_ROWS`` is read
recursively, so it may point at one study's rows or at a folder of studies (rows carry their ``study``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from esc.config import project_root
from esc.report import CALIBRATOR_ORDER
from esc.results import read_rows

ROOT = Path(project_root())


def rows_dir(study: str) -> Path:
    """The rows folder to read: ``$ESC_ROWS`` if set, else ``results/<study>/rows`` (committed rows), else
    ``experiments/rows/<study>`` (raw rows of a sweep not yet archived) when only that exists."""
    env = os.environ.get("ESC_ROWS")
    if env:
        return Path(env)
    committed, raw = ROOT / "results" / study / "rows", ROOT / "experiments" / "rows" / study
    return raw if raw.exists() and not committed.exists() else committed


def figures_dir() -> Path:
    """Where figures go (created): ``$ESC_FIGURES`` if set, else ``results/figures``."""
    path = Path(os.environ.get("ESC_FIGURES") or ROOT / "results" / "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def note(message: str) -> None:
    """Print a visible note in the notebook output (used instead of raising when data is missing)."""
    print(f"NOTE: {message}")


def load_rows(study: str, studies: Iterable[str] | None = None) -> tuple[list[dict], Path]:
    """Successful rows of ``study`` and the folder they came from (a note when there are none).

    With ``studies`` given, only rows whose ``study`` field is one of them are kept (useful when
    ``$ESC_ROWS`` points at a folder holding several studies).
    """
    folder = rows_dir(study)
    if not folder.exists():
        note(f"no rows folder {folder} (set ESC_ROWS, or run the study and commit its rows there)")
        return [], folder
    rows = [r for r in read_rows([folder]) if r.get("status") == "ok"]
    if studies is not None:
        keep = set(studies)
        rows = [r for r in rows if r.get("study") in keep]
    if not rows:
        note(f"no successful rows under {folder}" + (f" for studies {sorted(set(studies))}" if studies is not None else ""))
    return rows, folder


def save_figure(fig, name: str) -> Path:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` and print the path."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
    return path


def axis(row: dict, *path: str, default: Any = None) -> Any:
    """A value from the row's resolved config axes, e.g. ``axis(row, "calibrator", "generations")``."""
    node: Any = row.get("axes", {})
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def activation_bits(row: dict) -> int | None:
    """Activation bit width of a row (None: activations stay float)."""
    act = axis(row, "precision", "activation")
    return int(act["bits"]) if isinstance(act, dict) and act.get("bits") is not None else None


def weight_bits(row: dict) -> int | None:
    """Weight bit width of a row (None: weights stay float)."""
    w = axis(row, "precision", "weight")
    return int(w["bits"]) if isinstance(w, dict) and w.get("bits") is not None else None


def calibrator_sort_key(name: str) -> int:
    """Position of a calibrator in the report's order (unknown names last)."""
    return CALIBRATOR_ORDER.index(name) if name in CALIBRATOR_ORDER else len(CALIBRATOR_ORDER)


def frame(rows: list[dict], extra: dict[str, Any] | None = None) -> pd.DataFrame:
    """Headline columns of the rows as a DataFrame; ``extra`` maps a column name to ``f(row)``."""
    cols = ["study", "task", "model", "precision", "calibrator", "ptq", "seed", "metric", "higher_is_better",
            "fp32", "quantized", "drop", "calib_seconds", "calib_samples", "n_act_quantizers", "key"]
    data = [{c: r.get(c) for c in cols} | {k: f(r) for k, f in (extra or {}).items()} for r in rows]
    return pd.DataFrame(data, columns=cols + list(extra or {}))


def mean_std(values: pd.Series) -> tuple[float, float, int]:
    """Mean, sample std (0 for one value) and count of a series."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def short_name(name: str, width: int = 28) -> str:
    """A quantizer name shortened for tick labels (suffix ``_quantizer`` dropped, middle elided)."""
    name = name.replace(".input_quantizer", ".in").replace(".output_quantizer", ".out").replace("_quantizer", "")
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width // 2):]
