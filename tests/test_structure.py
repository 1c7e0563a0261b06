"""The package's shape: one job per module, so no module under esc/ grows past MAX_LINES lines."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "esc"
MAX_LINES = 400


def test_no_module_exceeds_max_lines():
    """A module over ``MAX_LINES`` lines holds several jobs: split it along them (the issue "One pipeline, clean layers")."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split each by job): {long}"
