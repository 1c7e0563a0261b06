"""Resumable rows: a killed sweep keeps its finished rows, error rows are retried, rows made on other data rerun."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from esc.data.asr import clips_hash
from esc.report import build_report
from esc.results import read_rows, write_json_atomic
from esc.tasks.asr import ASRTask
from sweeps import sweep


def test_killed_sweep_keeps_finished_rows_and_resumes(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=basic", wait=False)
    rows_dir = tmp_path / "rows" / "tiny"
    deadline = time.time() + 240
    while time.time() < deadline and not list(rows_dir.glob("*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = read_rows([rows_dir])
    assert 1 <= len(first) < 4 and all(r["status"] == "ok" for r in first)
    sweep(tmp_path, "hydra/launcher=basic")
    rows = read_rows([rows_dir])
    assert len(rows) == 4
    kept = {r["key"]: r["finished_at"] for r in first}
    assert all(r["finished_at"] == kept[r["key"]] for r in rows if r["key"] in kept)


def test_failing_job_writes_error_row_sweep_goes_on_and_exits_nonzero(tmp_path):
    # a checkpoint that does not exist makes every run fail; the sweep must still finish, then say so
    proc = sweep(tmp_path, "hydra/launcher=basic", "model=ast_kws", f"model.checkpoint={tmp_path}/missing.pt", rc=1)
    rows = read_rows([tmp_path / "rows" / "tiny"])
    assert len(rows) == 4 and all(r["status"] == "error" for r in rows)
    assert all("make models" in r["error"] for r in rows)
    assert "4 run(s) of this sweep failed" in proc.stderr and proc.stderr.count("calibrator=") == 4
    with pytest.raises(SystemExit, match="all 4 runs"):  # nothing to tabulate, and the report says why
        build_report(tmp_path / "rows" / "tiny", tmp_path / "report")


def test_error_rows_are_retried(tmp_path):
    sweep(tmp_path, "hydra/launcher=basic", "precision=w8a8", "calibrator=minmax")
    (row_file,) = (tmp_path / "rows" / "tiny").glob("*.json")
    row = json.loads(row_file.read_text())
    write_json_atomic(row_file, {"key": row["key"], "status": "error", "error": "RuntimeError: boom"})
    write_json_atomic(row_file.with_name("other.json"), {**row, "key": "other"})
    build_report(tmp_path / "rows" / "tiny", tmp_path / "report")
    assert "RuntimeError: boom" in (tmp_path / "report" / "failed.md").read_text()  # the report lists the failure
    row_file.with_name("other.json").unlink()
    sweep(tmp_path, "hydra/launcher=basic", "precision=w8a8", "calibrator=minmax")
    again = json.loads(row_file.read_text())
    assert again["status"] == "ok" and again["quantized"] == pytest.approx(row["quantized"])


def test_finished_row_made_on_other_data_runs_again(tmp_path):
    """A row key hashes the config, not the data: a finished row whose ``data_hashes`` differ from the data the
    task loads now (a new generator version, replaced files) is run again; a row on the same data is skipped."""
    grid = ("hydra/launcher=basic", "precision=w8a8", "calibrator=minmax")
    sweep(tmp_path, *grid)
    (path,) = (tmp_path / "rows" / "tiny").glob("*.json")
    row = json.loads(path.read_text())
    sweep(tmp_path, *grid)
    assert json.loads(path.read_text())["finished_at"] == row["finished_at"]  # same data: skipped
    write_json_atomic(path, {**row, "data_hashes": {**row["data_hashes"], "test": "0" * 16}})
    proc = sweep(tmp_path, *grid)
    again = json.loads(path.read_text())
    assert again["finished_at"] != row["finished_at"] and again["data_hashes"] == row["data_hashes"]
    assert "splits test changed" in proc.stdout + proc.stderr


def test_asr_data_hashes_are_known_before_preparing(tmp_path):
    """What the runner compares with a finished row is what ``prepare`` records (synthesised clips, no model)."""
    task = ASRTask(data_dir=str(tmp_path), voices=("espeak",), num_test=2, num_train=3, progress=False)
    before = task.load_data_hashes()
    task.load_clips()
    assert before == task.data_hashes == {"test": clips_hash(task.test_clips), "train": clips_hash(task.train_clips)}
    assert len(task.test_clips) == 2 and before["test"] != before["train"]
