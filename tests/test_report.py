"""Reports keep rows on different data apart: a label in the tables, and no paired interval across them."""
from __future__ import annotations

import numpy as np

from esc.report import pair_table, setting_labels


def kws_row(tmp_path, key: str, calibrator: str, correct: np.ndarray, test_hash: str) -> dict:
    np.savez(tmp_path / f"{key}.samples.npz", **{"quantized/correct": correct})
    axes = {"model": {"name": "m"}, "task": {"name": "kws"}, "precision": "w8a8", "calibrator": {"_target_": calibrator},
            "ptq": "none", "calibration": {"num_samples": 8}, "seed": 0}
    return {"key": key, "status": "ok", "model": "m", "task": "kws", "precision": "w8a8", "calibrator": calibrator,
            "ptq": "none", "seed": 0, "metric": "accuracy", "quantized": 100.0 * correct.mean(), "axes": axes,
            "task_class": "esc.tasks.kws.KeywordSpottingTask", "data_hashes": {"test": test_hash, "train": "t0"}}


def test_rows_on_other_data_are_labelled_and_never_paired(tmp_path):
    rng = np.random.default_rng(0)
    same = [kws_row(tmp_path, "a", "minmax", rng.random(50) < 0.5, "new"), kws_row(tmp_path, "b", "mse", rng.random(50) < 0.7, "new")]
    stale = kws_row(tmp_path, "c", "mse", rng.random(50) < 0.9, "old")  # an older data generator, same config
    assert setting_labels(same) == {"a": "", "b": ""}
    labels = setting_labels([*same, stale])
    assert labels["c"] == "data.test=old" and labels["b"] == "data.test=new"
    pairs = pair_table([*same, stale], tmp_path, n_boot=200)
    assert pairs[["value", "versus"]].values.tolist() == [["mse (data.test=new)", "minmax"]]  # only the rows on the same clips
    expected = same[1]["quantized"] - same[0]["quantized"]
    assert abs(pairs["diff"][0] - expected) < 1e-9
