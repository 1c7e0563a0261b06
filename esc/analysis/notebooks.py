"""Execute the analysis notebooks (jupytext percent ``.py`` files in ``notebooks/``) headless.

``python -m esc.analysis.notebooks [NAME ...] [--save-ipynb DIR]`` runs each notebook in a fresh
Jupyter kernel (jupytext -> in-memory notebook -> nbclient) with the current environment, so
``ESC_ROWS``, ``ESC_FIGURES``, ``ESC_STUDY``, ``ESC_SENSITIVITY`` apply; by default every notebook
reads the committed ``results/<study>/rows`` and writes PNGs to ``results/figures/``. Prints each
notebook's notes and written figures; exits non-zero if a notebook raised.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esc.config import project_root

NOTEBOOK_DIR = Path(project_root()) / "notebooks"


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_*.py``), or those whose file name starts with one of ``names``."""
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
    return [p for p in paths if not names or any(p.name.startswith(n) for n in names)]


def execute_notebook(path: Path, timeout: int = 600, save: Path | None = None) -> str:
    """Execute one percent-format notebook in a fresh kernel; return the text it printed."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, save / f"{path.stem}.ipynb")
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook name prefixes, e.g. 01 03 (default: all)")
    parser.add_argument("--save-ipynb", type=Path, help="also write the executed notebooks (.ipynb) here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = []
    for path in notebook_paths(args.names):
        print(f"== {path.name}", flush=True)
        try:
            text = execute_notebook(path, args.timeout, args.save_ipynb)
        except Exception as exc:  # report and go on with the other notebooks
            failed.append(path.name)
            print(f"FAILED: {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
            continue
        for line in text.splitlines():
            if line.startswith(("NOTE:", "wrote ")):
                print("  " + line, flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
