"""The fitness <-> test-metric link analysis: Spearman known answers, perturbations, shared-pass fitness."""
from __future__ import annotations

import json
import math

import pytest
import torch

from esc.analysis.fitness_link import all_fitness, main, perturbations, spearman, spearman_interval
from esc.calibrators.base import CalibrationData
from esc.calibrators.fitness import FitnessEvaluator
from esc.calibrators.minmax import MinMaxCalibrator
from esc.quant.model import QuantSpec, quantize_model


def test_spearman_known_answers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (1.5, 1.5, 3, 4) vs y ranks (1..4) -> Pearson of the ranks
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant input has no ranking
    lo, hi = spearman_interval(list(range(20)), [v + (3 if v % 2 else 0) for v in range(20)])
    assert lo <= spearman(list(range(20)), [v + (3 if v % 2 else 0) for v in range(20)]) <= hi <= 1.0


def test_perturbations_start_at_the_calibrated_scales_and_are_seeded():
    s0 = torch.tensor([0.5, 1.0, 2.0])
    pts = perturbations(s0, [0.1, 0.4], per_sigma=3, seed=7)
    assert len(pts) == 7 and pts[0][0] == 0.0 and torch.equal(pts[0][1], s0)
    assert [s for s, _ in pts[1:]] == [0.1] * 3 + [0.4] * 3
    assert all((v > 0).all() for _, v in pts)
    again = perturbations(s0, [0.1, 0.4], per_sigma=3, seed=7)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(pts, again))
    spread = [float(torch.log(v / s0).std()) for _, v in pts[1:]]
    assert max(spread[:3]) < min(spread[3:])  # larger sigma, larger log-scale moves


def test_all_fitness_matches_the_definitions_and_each_evaluator(tiny_audio_model, tiny_audio_batches):
    labels = [torch.arange(b.shape[0]) % 10 for b in tiny_audio_batches]
    batches = [{"x": x, "y": y} for x, y in zip(tiny_audio_batches, labels)]
    data = CalibrationData(batches, forward=lambda m, b: m(b["x"]),
                           loss=lambda out, b: torch.nn.functional.cross_entropy(out, b["y"].repeat(out.shape[0] // len(b["y"])), reduction="none"))
    qmodel = quantize_model(tiny_audio_model, weight=QuantSpec(8, True, "channel"), activation=QuantSpec(4, True, "tensor"))
    qmodel.calibrate_weights()
    MinMaxCalibrator().calibrate(qmodel, data)
    evaluators = {k: FitnessEvaluator(qmodel, data, kind=k, batched=False) for k in ("task", "kl", "mse")}
    scales = qmodel.activation_scales() * 0.7
    shared = all_fitness(qmodel, evaluators, scales)
    # by hand, from the definitions: the float model's own logits are the reference, one value per sample
    with torch.no_grad():
        q_out = torch.cat([qmodel(b["x"]) for b in batches]).double()
        fp_out = torch.cat([tiny_audio_model(b["x"]) for b in batches]).double()
    y = torch.cat([b["y"] for b in batches])
    p_fp, p_q = fp_out.softmax(-1), q_out.softmax(-1)
    by_hand = {"task": float(-p_q[torch.arange(len(y)), y].log().mean()),
               "kl": float((p_fp * (p_fp.log() - p_q.log())).sum(-1).mean()),
               "mse": float(((q_out - fp_out) ** 2).mean())}
    assert by_hand["kl"] > 1e-4  # the perturbed scales do change the outputs
    for kind, ev in evaluators.items():
        assert shared[kind] == pytest.approx(by_hand[kind], rel=1e-4), kind
        assert shared[kind] == pytest.approx(float(ev(scales)[0]), rel=1e-5)  # one shared pass = each evaluator's own


def test_command_writes_csv_and_json(tmp_path):
    out = tmp_path / "link"
    summary = main(["--out", str(out), "--per-sigma", "2", "--sigmas", "0.2,0.5", "model=ast_tiny", "task=kws_tiny",
                    "precision=w4a4", "calibrator=minmax", "calibration.num_samples=8", "calibration.batch_size=4",
                    f"paths.cache={tmp_path}/cache", f"paths.data={tmp_path}/data"])
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert lines[0] == "index,sigma,fitness_task,fitness_kl,fitness_mse,metric" and len(lines) == 1 + 5
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["spearman_fitness_vs_test_error"].keys() == {"task", "kl", "mse"} == summary["spearman_fitness_vs_test_error"].keys()
    assert saved["precision"] == "w4a4" and saved["metric"] == "accuracy"
    assert {"rho", "ci_low", "ci_high", "rho_local", "ci_local_low", "ci_local_high"} == set(saved["spearman_fitness_vs_test_error"]["kl"])
