"""Notebooks and analyses: every notebook runs on a tiny result set and writes its figures; every
notebook degrades to a printed note on an empty one; the sensitivity script reproduces a row's
metric from its clip ranges; the breaks/ablation experiment configs compose."""
from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jupytext
import pandas as pd
import pytest

from esc.analysis.notebooks import execute_notebook

from esc.config import CONF_DIR, compose
from esc.results import read_rows

ROOT = CONF_DIR.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
# "does **not** show ...", "do **not** separate ...": the reading's own limitation (not "note", "cannot")
LIMITATION = re.compile(r"\b(?:does|do) \*\*not\*\*\s+[a-z]+")
NEW_EXPERIMENTS = ["breaks", "ablation_calib_size", "ablation_budget", "ablation_popsize", "ablation_fitness", "ablation_init"]


def esc_run(tmp: Path, *args: str, wait: bool = True):
    """One ``python -m esc.run -m`` call on the tiny experiment with all paths under ``tmp`` (basic launcher)."""
    cmd = [sys.executable, "-m", "esc.run", "-m", "+experiment=tiny", f"paths.rows={tmp}/rows", f"paths.cache={tmp}/cache",
           f"paths.data={tmp}/data", "hydra/launcher=basic", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> Path:
    """Tiny rows: {fp32, w4, a4, w4a4} x {minmax, mse}; ESC (3 generations, test metric monitored every
    generation) at w4a4 for seeds 0 and 1 (study tiny); ESC at 0 and 2 generations (study ablation_budget)."""
    tmp = tmp_path_factory.mktemp("nbresults")
    esc_run(tmp, "precision=fp32,w4,a4,w4a4", "calibrator=minmax,mse", f"hydra.sweep.dir={tmp}/mr1")  # also makes the data
    procs = [esc_run(tmp, "precision=w4a4", "calibrator=esc", "calibrator.generations=3", "calibration.monitor_every=1",
                     "seed=0,1", f"hydra.sweep.dir={tmp}/mr2", wait=False),
             esc_run(tmp, "precision=w4a4", "calibrator=esc", "calibrator.generations=0,2", "study=ablation_budget",
                     f"hydra.sweep.dir={tmp}/mr3", wait=False)]
    for proc in procs:
        finish(proc)
    rows = read_rows([tmp / "rows"])
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert len(rows) == 6 + 2 + 2
    return tmp


def execute(notebook: Path, env: dict[str, str], monkeypatch) -> str:
    """Execute a jupytext percent notebook in a Jupyter kernel with ``env`` set; return its printed output."""
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    return execute_notebook(notebook, timeout=180)


def run_script(notebook: Path, env: dict[str, str], monkeypatch, capsys) -> str:
    """Run a percent notebook as the Python script it also is (in this process: fast); return what it printed."""
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    runpy.run_path(str(notebook), run_name="__main__")
    return capsys.readouterr().out


def test_every_notebook_has_readings():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_activation_ranges.py", "02_where_it_breaks.py", "03_esc_search.py", "04_sensitivity.py",
                     "05_ablations.py", "06_significance.py"]
    for p in NOTEBOOKS:
        nb = jupytext.read(p)
        readings = [c.source for c in nb.cells if c.cell_type == "markdown" and "**Reading" in c.source]
        assert readings, p.name
        for text in readings:  # says what the figure shows, then a sentence on what it does **not** show
            assert LIMITATION.search(text), (p.name, text[:80])
            assert LIMITATION.search(text).start() > text.index("**Reading") + 40, (p.name, text[:80])


def test_sensitivity_script_reproduces_the_rows(results, tmp_path):
    from esc.analysis.sensitivity import main

    common = ["--study", "tiny", "--rows", str(results / "rows" / "tiny"), "--precision", "w4a4"]
    hydra = ["+experiment=tiny", f"paths.data={results}/data"]
    out = results / "sensitivity" / "ast_tiny.csv"
    df = main([*common, "--out", str(out), *hydra])
    rows = {r["calibrator"]: r for r in read_rows([results / "rows" / "tiny"]) if r["precision"] == "w4a4" and r["seed"] == 0}
    n_act = sum(q["kind"] == "activation" for q in rows["minmax"]["quantizers"])
    assert set(df["calibrator"]) == {"minmax", "esc"} and len(df) == 2 * (n_act + 1)
    assert (df["fp32"] == rows["minmax"]["fp32"]).all()  # every quantizer off = the float model on the same clips
    assert df["drop"].to_numpy() == pytest.approx((df["fp32"] - df["metric"]).to_numpy())
    assert list(pd.read_csv(out)["quantizer"]) == list(df["quantizer"])
    # with the row's weight quantization and every activation quantizer on, the script must reproduce each row's test loss
    both = main([*common, "--out", str(tmp_path / "w.csv"), "--with-weights", *hydra])
    for cal, r in rows.items():
        if cal in ("minmax", "esc"):
            loss = both[(both["calibrator"] == cal) & (both["quantizer"] == "ALL")]["loss"].item()
            assert loss == pytest.approx(r["metrics"]["loss"], rel=1e-4), cal
    assert (both["reference"] == "weights-only").all() and (df["reference"] == "fp32").all()


def test_sensitivity_takes_only_rows_with_the_runs_settings(results, tmp_path):
    """Rows of the same model and precision but another scope or calibration set are not the run's: refused, with the axis named."""
    from esc.analysis.sensitivity import main, matching_rows
    from esc.pipeline import run_axes

    rows = read_rows([results / "rows" / "tiny"])
    axes = run_axes(compose(["+experiment=tiny", f"paths.data={results}/data", "precision=w4a4"]))
    assert set(matching_rows(rows, axes, ["minmax", "mse", "esc"])) == {"minmax", "mse", "esc"}
    other = run_axes(compose(["+experiment=tiny", f"paths.data={results}/data", "precision=w4a4", "scope=linear"]))
    assert matching_rows(rows, other, ["minmax", "esc"]) == {}
    with pytest.raises(SystemExit, match="differ in calibration"):
        main(["--rows", str(results / "rows" / "tiny"), "--precision", "w4a4", "--out", str(tmp_path / "s.csv"),
              "+experiment=tiny", f"paths.data={results}/data", "calibration.num_samples=4"])


EXPECTED = {
    "01_activation_ranges.py": ["01_activation_ranges_ast_tiny_kws_tiny.png"],
    "02_where_it_breaks.py": ["02_where_it_breaks.png"],
    "03_esc_search.py": ["03_esc_search.png", "03_esc_overfitting.png"],
    "04_sensitivity.py": ["04_sensitivity_ast_tiny_kws_tiny.png"],
    "05_ablations.py": ["05_ablation_budget.png"],
    "06_significance.py": ["06_seed_spread.png", "06_paired_bootstrap.png"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_writes_its_figures(name, results, tmp_path, monkeypatch):
    if name == "04_sensitivity.py" and not (results / "sensitivity" / "ast_tiny.csv").exists():
        from esc.analysis.sensitivity import main

        main(["--study", "tiny", "--rows", str(results / "rows" / "tiny"), "--out", str(results / "sensitivity" / "ast_tiny.csv"),
              "+experiment=tiny", f"paths.data={results}/data"])
    rows = results / "rows" if name == "05_ablations.py" else results / "rows" / "tiny"
    figures = tmp_path / "figures"
    text = execute(ROOT / "notebooks" / name, {"ESC_ROWS": rows, "ESC_FIGURES": figures,
                                               "ESC_SENSITIVITY": results / "sensitivity", "ESC_BOOT": 200}, monkeypatch)
    for png in EXPECTED[name]:
        assert (figures / png).stat().st_size > 1000, (png, text[-2000:])
    if name == "05_ablations.py":  # the other ablations have no rows: a note, not a crash
        assert "ablation_fitness: no rows yet" in text and not (figures / "05_ablation_fitness.png").exists()
    if name == "01_activation_ranges.py":  # the observed range and each calibrator's clips were read
        assert "observed max|x| spans" in text and "esc" in text and "mse" in text


def test_notebooks_degrade_to_notes_without_rows(tmp_path, monkeypatch, capsys):
    (tmp_path / "rows").mkdir()
    for nb in NOTEBOOKS:
        text = run_script(nb, {"ESC_ROWS": tmp_path / "rows", "ESC_FIGURES": tmp_path / "fig",
                               "ESC_SENSITIVITY": tmp_path / "none"}, monkeypatch, capsys)
        assert "NOTE:" in text, nb.name
    assert not list((tmp_path / "fig").glob("*.png"))


def test_notebooks_degrade_without_esc_rows_or_seeds(results, tmp_path, monkeypatch, capsys):
    rows_dir = tmp_path / "rows"  # only the minmax/mse rows of seed 0: no ESC history, no monitor, one seed per cell
    rows_dir.mkdir()
    for r in read_rows([results / "rows" / "tiny"]):
        if r["calibrator"] != "esc":
            for suffix in (".json", ".samples.npz"):
                src = results / "rows" / "tiny" / f"{r['key']}{suffix}"
                if src.exists():
                    (rows_dir / src.name).write_bytes(src.read_bytes())
    env = {"ESC_ROWS": rows_dir, "ESC_FIGURES": tmp_path / "fig", "ESC_BOOT": 50}
    text = run_script(ROOT / "notebooks" / "03_esc_search.py", env, monkeypatch, capsys)
    assert "no ESC rows with a search history" in text
    text = run_script(ROOT / "notebooks" / "06_significance.py", env, monkeypatch, capsys)
    assert "single seed" in text and (tmp_path / "fig" / "06_paired_bootstrap.png").exists()
    assert not (tmp_path / "fig" / "06_seed_spread.png").exists()


@pytest.mark.parametrize("experiment", NEW_EXPERIMENTS)
def test_analysis_experiments_compose(experiment):
    cfg = compose([f"+experiment={experiment}"])
    assert cfg.study == experiment and cfg.hydra.sweeper.params
    if experiment != "breaks":
        assert cfg.precision.name == "w4a4"
    for key, values in cfg.hydra.sweeper.params.items():  # every swept value composes as a single run
        for value in str(values).split(","):
            compose([f"+experiment={experiment}", f"{key}={value}"])


COMMITTED = {
    "01_activation_ranges.py": ["01_activation_ranges_ast_kws_kws.png", "01_activation_ranges_yamnet_tagging.png"],
    "02_where_it_breaks.py": ["02_where_it_breaks.png"],
    "03_esc_search.py": ["03_esc_search.png", "03_esc_overfitting.png"],
    "04_sensitivity.py": ["04_sensitivity_ast_kws_kws.png"],
    "05_ablations.py": [f"05_ablation_{a}.png" for a in ("budget", "calib_size", "fitness", "popsize", "init")],
    "06_significance.py": ["06_paired_bootstrap.png"],  # the committed demo is seed 0 only: no spread to draw
}
SINGLE_SEED_NOTE = "every cell has a single seed"


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_notebook_runs_on_the_committed_results(name, tmp_path, monkeypatch):
    """Every notebook on the committed results/ (default row folders), so none can rot; figures go to a temporary folder."""
    figures = tmp_path / "figures"
    text = execute(ROOT / "notebooks" / name, {"ESC_FIGURES": figures, "ESC_BOOT": 50}, monkeypatch)
    for png in COMMITTED[name]:
        assert (figures / png).stat().st_size > 1000, (png, text[-2000:])
    notes = [line for line in text.splitlines() if "NOTE" in line and SINGLE_SEED_NOTE not in line]
    assert not notes, text[-2000:]
