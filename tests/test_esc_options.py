"""ESC search options: the local step alone (generations=0), monitoring the search mean, resuming, the cheaper
local step and automatic population batching."""
from __future__ import annotations

import math

import pytest
import torch

from esc.calibrators.esc import ESCCalibrator
from esc.calibrators.local_step import local_mse_scales
from esc.quant.quantizer import QuantizationError
from esc.quant.model import QuantSpec, quantize_model

from models import TinyTransformer, classification_data

W4A4 = dict(weight=QuantSpec(4, True, "channel"), activation=QuantSpec(4, True, "tensor"))


def _setup():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    data = classification_data(model, torch.randn(16, 8, 10, generator=torch.Generator().manual_seed(1)), batch_size=8)
    return model, data


def test_zero_generations_is_the_local_step_alone():
    model, data = _setup()
    qmodel = quantize_model(model, **W4A4)
    result = ESCCalibrator(generations=0, progress=False).calibrate(qmodel, data)
    expected, _ = local_mse_scales(quantize_model(model, **W4A4), data)
    assert torch.allclose(qmodel.activation_scales(), expected)
    assert result.history["best"] == [] and result.history["final_fitness"] == result.history["local_fitness"]


def test_monitor_records_the_search_mean_without_changing_the_result():
    model, data = _setup()
    plain = quantize_model(model, **W4A4)
    ESCCalibrator(generations=6, progress=False, seed=3).calibrate(plain, data)
    calls = []
    monitored = quantize_model(model, **W4A4)
    esc = ESCCalibrator(generations=6, progress=False, seed=3, monitor_every=3)
    esc.monitor = lambda: calls.append(monitored.activation_scales().clone()) or float(len(calls))
    history = esc.calibrate(monitored, data).history
    assert history["monitor_generation"] == [1.0, 3.0, 6.0]
    assert history["monitor_metric"] == [1.0, 2.0, 3.0]
    assert all(s.dim() == 1 for s in calls)  # the monitor sees one scale vector (the mean), not a population
    assert len(history["monitor_fitness"]) == 3
    assert torch.allclose(plain.activation_scales(), monitored.activation_scales())


@pytest.mark.parametrize("backend", ["evotorch", "pycma"])
def test_killed_search_resumes_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, backend):
    from esc.calibrators import fitness

    model, data = _setup()
    settings = dict(generations=7, progress=False, seed=5, backend=backend, save_every=2)
    whole = quantize_model(model, **W4A4)
    expected = ESCCalibrator(**settings).calibrate(whole, data)
    state = tmp_path / "esc-state.pt"

    calls = [0]
    original = fitness.FitnessEvaluator.__call__

    def dies_at_generation_6(self, scales):  # call 1: the local start; calls 2..: one per generation
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt("killed")
        return original(self, scales)

    monkeypatch.setattr(fitness.FitnessEvaluator, "__call__", dies_at_generation_6)
    with pytest.raises(KeyboardInterrupt):
        ESCCalibrator(**settings, state_path=state).calibrate(quantize_model(model, **W4A4), data)
    assert state.is_file()  # generations 1-4 saved (every 2), the 5th lost with the kill
    monkeypatch.setattr(fitness.FitnessEvaluator, "__call__", original)

    evaluated = [0]
    monkeypatch.setattr(fitness.FitnessEvaluator, "__call__",
                        lambda self, scales: evaluated.__setitem__(0, evaluated[0] + 1) or original(self, scales))
    resumed_model = quantize_model(model, **W4A4)
    resumed = ESCCalibrator(**settings, state_path=state).calibrate(resumed_model, data)
    assert torch.equal(resumed_model.activation_scales(), whole.activation_scales())
    assert {k: v for k, v in resumed.history.items()} == expected.history
    assert evaluated[0] == 1 + 3 + 1  # local start, generations 5-7 live, the final mean: no replayed generation evaluated
    assert expected.timings["generations_run"] == 7 and resumed.timings["generations_run"] == 3  # 4 replayed
    for t in (expected.timings, resumed.timings):
        assert t["popsize"] == 4 + int(3 * math.log(len(whole.activation_quantizers)))
        assert 0 < t["forward"] <= t["fitness"] and t["seconds_per_generation"] > 0 and t["fp32_pass"] > 0
    assert not state.exists()  # removed once the search ended


def test_cheap_local_step_and_auto_batch_options():
    """``local_search``/``local_samples`` reach the local step (and its pass count); ``max_batch="auto"`` leaves the
    search exactly as it is with the whole population batched (bit-identical fitness on this model) and records
    its choice."""
    model, data = _setup()
    cheap = quantize_model(model, **W4A4)
    result = ESCCalibrator(generations=0, progress=False, local_search="coarse_fine", local_samples=2**20).calibrate(cheap, data)
    expected, _ = local_mse_scales(quantize_model(model, **W4A4), data, search="coarse_fine", samples=2**20)
    assert torch.equal(cheap.activation_scales(), expected)
    assert result.forward_passes == 1 + 1  # the one local pass (rows kept in the max pass) + the local fitness
    plain = ESCCalibrator(generations=3, progress=False, seed=2).calibrate(quantize_model(model, **W4A4), data).history
    auto = ESCCalibrator(generations=3, progress=False, seed=2, max_batch="auto").calibrate(quantize_model(model, **W4A4), data).history
    assert auto.pop("population_chunk")[0] in (1.0, 2.0, 4.0) and auto == plain  # popsize 11: probe chunks 1, 2, 4, 4
    with pytest.raises(QuantizationError, match="local_search"):
        ESCCalibrator(local_search="bisect")


def test_non_finite_fitness_at_the_start_is_named():
    model, data = _setup()
    bad = type(data)(data.batches, data.forward, loss=lambda out, batch: torch.full((out.shape[0],), float("nan")))
    with pytest.raises(Exception, match="fitness of the local start is inf"):
        ESCCalibrator(generations=2, progress=False).calibrate(quantize_model(model, **W4A4), bad)
