"""Tests of the ESC calibrator (esc.calibrators.esc) and its fitness functions (esc.calibrators.fitness).

Tiny models from tests/models.py; every test runs in a few seconds on one CPU core.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.calibrators.esc import ESCCalibrator
from esc.calibrators.fitness import FitnessEvaluator, choose_chunk, kl_per_sample, mse_per_sample, probe_chunks
from esc.calibrators.local_objective import LocalObjective
from esc.calibrators.local_step import local_coarse_indices, local_grid_fractions, local_mse_scales, local_output_mse
from esc.calibrators.row_sample import RowSample
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.modules import MatMul
from esc.quant.quantizer import QuantizationError

from models import TinyMLP, TinyTransformer, classification_data, heavy_tailed
from ptq_models import make_data, tiny_yamnet

W4A4 = dict(weight=QuantSpec(4, True, "channel"), activation=QuantSpec(4, True, "tensor"))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def transformer_setup():
    model = TinyTransformer().eval()
    data = classification_data(model, torch.randn(24, 8, 10, generator=torch.Generator().manual_seed(1)), batch_size=8)
    return model, data


def _esc(**kw) -> ESCCalibrator:
    kw.setdefault("generations", 8)
    kw.setdefault("progress", False)
    return ESCCalibrator(**kw)


# ----------------------------------------------------------------------------------- fitness
def test_kl_and_mse_per_sample_known_values():
    ref = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    assert torch.allclose(kl_per_sample(ref, ref), torch.zeros(2), atol=1e-7)
    out = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]])  # softmax (3/4, 1/4) vs reference (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_per_sample(out, ref)[0].item() == pytest.approx(expected, rel=1e-5)
    assert kl_per_sample(out, ref)[1].item() == pytest.approx(0.0, abs=1e-6)
    pop = torch.stack([ref, out])  # [P=2, B=2, C]
    assert kl_per_sample(pop, ref).shape == (2, 2)
    assert torch.allclose(mse_per_sample(pop, ref)[1], torch.tensor([math.log(3.0) ** 2 / 2, 0.0]))


@pytest.mark.parametrize("kind", ["task", "kl", "mse"])
def test_batched_and_one_by_one_fitness_agree(transformer_setup, kind):
    model, data = transformer_setup
    qmodel = quantize_model(model, **W4A4)
    s_local, _ = local_mse_scales(qmodel, data, grid=20)
    g = torch.Generator().manual_seed(3)
    population = s_local * torch.exp(0.3 * torch.randn(6, len(s_local), generator=g))
    batched = FitnessEvaluator(qmodel, data, kind, batched=True)(population)
    one_by_one = FitnessEvaluator(qmodel, data, kind, batched=False)(population)
    chunked = FitnessEvaluator(qmodel, data, kind, batched=True, max_batch=20)(population)  # chunks of 2 candidates
    assert batched.shape == (6,)
    assert torch.allclose(batched, one_by_one, rtol=1e-5, atol=1e-7)
    assert torch.allclose(batched, chunked, rtol=1e-5, atol=1e-7)
    assert batched.std() > 0  # the candidates really differ


def test_auto_chunk_choice_is_never_slower_than_one_by_one_on_its_probe():
    assert probe_chunks(15) == [1, 2, 4, 8] and probe_chunks(6) == [1, 2, 3] and probe_chunks(2) == [1, 1]
    assert probe_chunks(17) == [1, 2, 4, 8, 2]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):  # fake timings: per-chunk seconds ~ c^e with random e in [0, 2] and random noise
        measured = {}
        for c in probe_chunks(int(torch.randint(2, 40, (1,), generator=g))):
            seconds, n = measured.get(c, (0.0, 0))
            noise, e = torch.rand(2, generator=g).tolist()
            measured[c] = (seconds + (0.5 + noise) * c ** (2 * e), n + c)
        per_candidate = {c: t / n for c, (t, n) in measured.items()}
        chosen = choose_chunk(measured)
        assert per_candidate[chosen] <= per_candidate[1] and per_candidate[chosen] == min(per_candidate.values())
    assert choose_chunk({1: (2.0, 1), 2: (4.0, 2), 4: (8.0, 4)}) == 1  # ties: the smaller chunk
    with pytest.raises(QuantizationError, match="one-by-one"):
        choose_chunk({2: (1.0, 2)})


@pytest.mark.parametrize("cost, expected", [(lambda n: 1.0 + 0.01 * n, 8), (lambda n: 0.01 * n * n, 1)],
                         ids=["batching_pays", "batching_slower"])
def test_auto_batch_follows_its_probe_and_keeps_the_unbatched_fitness(transformer_setup, cost, expected):
    """Fake timings (a clock advanced by ``cost(samples)`` per forward): the probe of the first population (15
    candidates in chunks 1, 2, 4, 8) picks the fastest per candidate; every fitness value equals one by one's."""
    model, data = transformer_setup
    qmodel = quantize_model(model, **W4A4)
    s_local, _ = local_mse_scales(qmodel, data, grid=20)
    now = [0.0]

    def forward(m, batch):
        now[0] += cost(len(batch[0]))
        return data.forward(m, batch)
    auto = FitnessEvaluator(qmodel, CalibrationData(data.batches, forward, data.loss), "task", max_batch="auto",
                            clock=lambda: now[0])
    one_by_one = FitnessEvaluator(qmodel, data, "task", batched=False)
    assert torch.equal(auto(s_local), one_by_one(s_local)) and auto.chunk is None  # one candidate: no probe
    for seed in range(3):
        population = s_local * torch.exp(0.3 * torch.randn(15, len(s_local), generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(auto(population), one_by_one(population))
    assert auto.chunk == expected and list(auto.probe) == [1, 2, 4, 8]
    with pytest.raises(QuantizationError, match="max_batch"):
        FitnessEvaluator(qmodel, data, "task", max_batch="fast")


def test_fp_reference_is_float_model(transformer_setup):
    model, data = transformer_setup
    qmodel = quantize_model(model, **W4A4)
    ev = FitnessEvaluator(qmodel, data, "mse")
    with torch.no_grad():
        assert torch.allclose(ev.reference[0], model(data.batches[0][0]), atol=1e-6)
    assert all(q.enabled for q in qmodel.weight_quantizers.values())  # states restored


# ------------------------------------------------------------------------------- local step
@pytest.mark.parametrize("make_layer, shape", [
    (lambda: nn.Linear(12, 6), (40, 12)),          # fewer outputs than inputs: the weight itself
    (lambda: nn.Linear(6, 15), (40, 6)),           # more outputs than inputs: the QR-reduced error map
    (lambda: nn.Conv1d(4, 8, 3, padding=1), (40, 4, 10)),
], ids=["linear", "linear_wide", "conv1d"])
def test_local_step_matches_brute_force(make_layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(make_layer())
    x = heavy_tailed(shape, outlier_scale=20.0, outlier_rate=0.01, seed=2)
    data = CalibrationData([x[:16], x[16:]], forward=lambda m, b: m(b))
    qmodel = quantize_model(model, **W4A4)
    grid, min_fraction = 50, 1e-2
    scales, maxima = local_mse_scales(qmodel, data, grid=grid, min_fraction=min_fraction)
    assert maxima[0].item() == pytest.approx(x.abs().max().item())

    layer = qmodel.model[0]
    q = layer.input_quantizer
    with torch.no_grad():
        q.enabled = False
        fp = layer(x)
        q.enabled = True
        errors = []
        candidates = (local_grid_fractions(grid, min_fraction) * x.abs().max().double() / q.qmax).float()
        for s in candidates:  # one candidate at a time, full layer output (bias included)
            q.set_scale(s)
            errors.append(((layer(x) - fp) ** 2).mean().item())
    best = int(torch.tensor(errors).argmin())
    assert scales[0].item() == pytest.approx(candidates[best].item(), rel=1e-6)
    assert 0 < best < grid - 1  # the heavy tail makes clipping pay off: an interior optimum


def test_local_step_on_conv2d_and_depthwise_brute_force():
    """YAMNet's structure: each Conv2d / depthwise / pointwise / Linear input quantizer gets the candidate scale
    whose layer-output MSE, written out here with F.conv2d (groups included) on the FP input, is smallest, so
    never above the MSE of max calibration (the largest candidate)."""
    data = make_data(12, 6, n_mels=24, frames=16, mean=1.0)
    qmodel = quantize_model(tiny_yamnet(), **W4A4)
    grid = 30
    scales, maxima = local_mse_scales(qmodel, data, grid=grid)
    layers = {n.removesuffix(".input_quantizer"): q for n, q in qmodel.activation_quantizers.items()}
    inputs = {n: [] for n in layers}
    handles = [qmodel.get_submodule(f"model.{n}").register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0]))
               for n in layers]
    qmodel.set_quant_state(activations=False)  # FP inputs; weights stay quantized, as the local step has them
    with torch.no_grad():
        for b in data.batches:
            qmodel(b)
    for h in handles:
        h.remove()
    for i, (name, q) in enumerate(layers.items()):
        layer = qmodel.get_submodule(f"model.{name}")
        x, w = torch.cat(inputs[name]), layer.quantized_weight().detach()
        if isinstance(layer, nn.Linear):
            out = lambda t: F.linear(t, w)  # noqa: E731
        else:
            out = lambda t: F.conv2d(t, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)  # noqa: E731
        assert maxima[i].item() == pytest.approx(x.abs().max().item())
        candidates = (local_grid_fractions(grid, 1e-3) * x.abs().max().double() / q.qmax).float()
        errors = torch.stack([((out(torch.clamp(torch.round(x / s), q.qmin, q.qmax) * s) - out(x)) ** 2).mean()
                              for s in candidates])
        assert scales[i].item() == pytest.approx(candidates[int(errors.argmin())].item(), rel=1e-6), name
        assert errors[int(errors.argmin())] <= errors[-1], name
    assert qmodel.get_submodule("model.features.layer2.depthwise").groups == 8


def test_local_step_matmul_operands_and_layernorm_brute_force():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.mm = nn.LayerNorm(8), MatMul("qk")

        def forward(self, a, b):
            return self.mm(self.ln(a), b)

    a = heavy_tailed((6, 5, 8), outlier_scale=30.0, outlier_rate=0.02, seed=4)
    b = heavy_tailed((6, 8, 3), outlier_scale=30.0, outlier_rate=0.02, seed=5)
    data = CalibrationData([(a, b)], forward=lambda m, batch: m(*batch))
    qmodel = quantize_model(Model(), **W4A4)
    names = list(qmodel.activation_quantizers)
    assert names == ["ln.output_quantizer", "mm.a_quantizer", "mm.b_quantizer"]
    grid = 40
    scales, _ = local_mse_scales(qmodel, data, grid=grid)
    with torch.no_grad():
        a_ln = F.layer_norm(a, (8,), qmodel.model.ln.weight, qmodel.model.ln.bias)
    quantizers = qmodel.activation_quantizers
    targets = {"ln.output_quantizer": (a_ln, lambda t: t),
               "mm.a_quantizer": (a_ln, lambda t: t @ b),
               "mm.b_quantizer": (b, lambda t: a_ln @ t)}
    for i, name in enumerate(names):
        q = quantizers[name]
        t, layer = targets[name]
        candidates = (local_grid_fractions(grid, 1e-3) * t.abs().max().double() / q.qmax).float()
        errors = []
        for s in candidates:
            q.set_scale(s)
            q.enabled = True
            errors.append(((layer(q(t)) - layer(t)) ** 2).mean().item())
        assert scales[i].item() == pytest.approx(candidates[int(torch.tensor(errors).argmin())].item(), rel=1e-6), name


def _test_model(name):
    """The two test models of the local-step equivalence test, quantized W4A4, with their calibration data."""
    if name == "transformer":
        model = TinyTransformer().eval()
        return quantize_model(model, **W4A4), classification_data(model, torch.randn(24, 8, 10, generator=torch.Generator().manual_seed(1)), 8)
    return quantize_model(tiny_yamnet(), **W4A4), make_data(12, 6, n_mels=24, frames=16, mean=1.0)


@pytest.mark.parametrize("model_name", ["transformer", "yamnet"])
@pytest.mark.parametrize("options", [dict(search="coarse_fine"), dict(search="coarse_fine", stride=20, refine=1),
                                     dict(search="coarse_fine", samples=2**20)], ids=["coarse_fine", "stride20", "captured"])
def test_cheap_local_step_within_one_percent_of_exhaustive(model_name, options):
    """Every quantizer's layer-output MSE (whole calibration set) at the cheaper search's scale is within 1% of its
    MSE at the exhaustive grid's scale (``captured``: the errors from rows kept in the max pass, here all of them)."""
    qmodel, data = _test_model(model_name)
    exhaustive, maxima = local_mse_scales(qmodel, data)
    cheap, cheap_maxima = local_mse_scales(qmodel, data, **options)
    assert torch.equal(cheap_maxima, maxima)
    mse = local_output_mse(qmodel, data, torch.stack([exhaustive, cheap], dim=1))
    assert (mse[:, 1] <= 1.01 * mse[:, 0]).all(), (mse[:, 1] / mse[:, 0]).tolist()
    qmax = torch.tensor([q.qmax for q in qmodel.activation_quantizers.values()])
    grid = (local_grid_fractions(100, 1e-3)[None] * maxima.double()[:, None] / qmax[:, None]).float()
    assert torch.allclose(local_output_mse(qmodel, data, grid).min(1).values, mse[:, 0], rtol=1e-6)  # exhaustive = grid min


def test_coarse_fine_candidates_on_a_two_minimum_curve(monkeypatch):
    """The candidates on an error curve like the KWS AST's first fc2 input (falling to the last grid point, with a
    narrow dip at 88 between the coarse points 80 and 90): ``refine=1`` searches the bracket of the best coarse point
    only and misses the dip; ``refine=2`` (the default) also searches around the second best, 90, and finds it."""
    assert local_coarse_indices(100, 10).tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    data = CalibrationData([heavy_tailed((64, 4), seed=3)], forward=lambda m, b: m(b))
    qmodel = quantize_model(nn.Sequential(nn.Linear(4, 3)), **W4A4)
    maxima = local_mse_scales(qmodel, data, grid=2)[1]
    grid = (local_grid_fractions(100, 1e-3) * maxima[0].double() / 7).float()
    curve = 10.0 - torch.linspace(0, 1, 100, dtype=torch.float64)
    curve[88] = 1.0
    evaluated = []

    def fake_sse(self, scales):
        idx = {name: torch.searchsorted(grid, s) for name, s in scales.items()}
        evaluated.extend(i for ix in idx.values() for i in ix.tolist())
        return {name: SimpleNamespace(sse=curve[ix]) for name, ix in idx.items()}

    monkeypatch.setattr(LocalObjective, "sse", fake_sse)
    one, _ = local_mse_scales(qmodel, data, search="coarse_fine", refine=1)
    assert sorted(evaluated) == [*range(0, 91, 10), *range(91, 100)]  # the coarse points, then the bracket (90, 99)
    assert one[0] == grid[99]
    assert local_mse_scales(qmodel, data, search="coarse_fine")[0][0] == grid[88]


def test_row_sample_is_the_seeded_bottom_k_of_the_stream():
    rows, ids = torch.randn(50, 3), torch.arange(50.0)[:, None]
    sample = RowSample(samples=30, seed=7)  # at most 30 elements of 3-element rows: k = 10
    for a, b in ((0, 17), (17, 18), (18, 50)):
        sample.add(rows[a:b], ids[a:b])  # rows and their ids are kept together
    keys = torch.rand(50, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = torch.sort(torch.argsort(keys)[:10]).values
    (kept, kept_ids), = sample.groups()
    assert sample.k == 10 and torch.equal(kept, rows[expected]) and torch.equal(kept_ids[:, 0], expected.float())
    whole = RowSample(samples=30, seed=7)
    whole.add(rows, ids)
    assert torch.equal(whole.groups()[0][0], kept)  # the same stream in other batches: the same sample
    other_seed = RowSample(samples=30, seed=8)
    other_seed.add(rows, ids)
    assert not torch.equal(other_seed.groups()[0][0], kept)


@pytest.mark.parametrize("model_name", ["transformer", "yamnet"])
def test_local_row_sample_covering_the_data_equals_the_two_pass_step(model_name):
    """Rows kept in the max pass give the streamed answer when they are all of them; a smaller sample is a seeded
    subsample (it saw fewer rows: its errors differ, the maxima do not) and takes one pass."""
    qmodel, data = _test_model(model_name)
    streamed, maxima = local_mse_scales(qmodel, data, grid=30)
    captured, _ = local_mse_scales(qmodel, data, grid=30, samples=2**20)
    assert torch.equal(captured, streamed)
    calls = [0]
    forward = data.forward
    data.forward = lambda m, b: calls.__setitem__(0, calls[0] + 1) or forward(m, b)
    small, small_maxima = local_mse_scales(qmodel, data, grid=30, samples=64, seed=1)
    assert calls[0] == len(data.batches) and torch.equal(small_maxima, maxima)
    assert torch.equal(small, local_mse_scales(qmodel, data, grid=30, samples=64, seed=1)[0])


def test_local_step_does_not_change_model(transformer_setup):
    model, data = transformer_setup
    qmodel = quantize_model(model, **W4A4)
    local_mse_scales(qmodel, data, grid=10)
    assert all(not q.is_calibrated and q.enabled and q.observer is None for q in qmodel.activation_quantizers.values())


# ---------------------------------------------------------------------------------- ESC runs
def test_esc_not_worse_than_local_start_and_history(transformer_setup):
    model, data = transformer_setup
    qmodel = quantize_model(model, **W4A4)
    generations = 6
    result = _esc(generations=generations).calibrate(qmodel, data)
    h = result.history
    assert len(h["best"]) == len(h["mean"]) == len(h["sigma"]) == generations
    assert h["final_fitness"][0] <= h["local_fitness"][0]
    assert all(b <= m for b, m in zip(h["best"], h["mean"]))
    # the scales set on the model really have the reported fitness
    assert FitnessEvaluator(qmodel, data, "task")(qmodel.activation_scales())[0].item() == pytest.approx(h["final_fitness"][0], rel=1e-6)
    assert all(q.population_size == 0 for q in qmodel.activation_quantizers.values())
    n = len(qmodel.activation_quantizers)
    popsize = ESCCalibrator.default_popsize(n)
    assert popsize == 4 + int(math.floor(3 * math.log(n)))
    assert result.forward_passes == 2 + 1 + popsize * generations + 1  # local, local fitness, search, final mean
    assert result.seconds > 0


@pytest.mark.parametrize("init,calibrator", [("tensor_mse", "mse"), ("entropy", "entropy"), ("percentile", "percentile")])
def test_calibrator_init_starts_from_that_calibrator(transformer_setup, init, calibrator):
    from esc.calibrators import BY_NAME

    model, data = transformer_setup
    reference = quantize_model(model, **W4A4)
    BY_NAME[calibrator]().calibrate(reference, data)
    local_only = quantize_model(model, **W4A4)
    result = _esc(generations=0, init=init).calibrate(local_only, data)
    assert torch.equal(local_only.activation_scales(), reference.activation_scales())
    assert result.forward_passes == 1 + 1  # the calibrator's observation pass, the start's fitness
    searched = quantize_model(model, **W4A4)
    h = _esc(generations=4, init=init).calibrate(searched, data).history
    assert h["final_fitness"][0] <= h["local_fitness"][0]
    assert not torch.equal(searched.activation_scales(), reference.activation_scales())


@pytest.fixture(scope="module")
def mlp_setup():
    model = TinyMLP().eval()
    x = heavy_tailed((64, 16), seed=1)
    return model, x, classification_data(model, x, batch_size=16)


@pytest.mark.parametrize("backend", ["evotorch", "pycma"])
def test_backends_improve_on_local_start(mlp_setup, backend):
    model, _, data = mlp_setup
    qmodel = quantize_model(model, **W4A4)
    h = _esc(generations=15, backend=backend).calibrate(qmodel, data).history
    assert h["kept_local"] == [0.0]
    assert h["final_fitness"][0] < h["local_fitness"][0]


def test_same_seed_identical_results(transformer_setup):
    model, data = transformer_setup
    runs = []
    for seed in (5, 5, 6):
        qmodel = quantize_model(model, **W4A4)
        result = _esc(generations=4, seed=seed, fitness="kl").calibrate(qmodel, data)
        runs.append((qmodel.activation_scales(), result.history))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1]["best"] != runs[2][1]["best"]  # the seed matters


@pytest.mark.slow  # Ray's start dominates: 56 s on an idle core, 107 s on a busy one
def test_two_ray_actors_give_the_in_process_result(transformer_setup):
    """``num_actors=2`` (a local two-CPU Ray instance; Ray 2.60 has no local mode): each actor evaluates half of
    every population on its own copy of the model, and the search is the in-process one, scale for scale."""
    import ray  # evotorch's dependency

    model, data = transformer_setup

    def run(actors):
        qmodel = quantize_model(model, **W4A4)
        result = _esc(generations=3, seed=4, final="best", popsize=6, num_actors=actors).calibrate(qmodel, data)
        return qmodel.activation_scales(), result

    local, in_process = run(None)
    root = Path(__file__).resolve().parents[1]  # the workers import this checkout (tests/ holds the model's class)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}})
    try:
        remote, with_actors = run(2)
    finally:
        ray.shutdown()
    assert with_actors.history["best"] == in_process.history["best"] and len(in_process.history["best"]) == 3
    assert torch.equal(remote, local) and with_actors.forward_passes == in_process.forward_passes


def test_final_best_and_separable(transformer_setup):
    model, data = transformer_setup
    qmodel = quantize_model(model, **W4A4)
    h = _esc(generations=5, final="best", separable=True, fitness="mse", popsize=6).calibrate(qmodel, data).history
    assert h["final_fitness"][0] == pytest.approx(min(min(h["best"]), h["local_fitness"][0]))


def test_guard_keeps_local_scales_when_search_is_worse(transformer_setup, monkeypatch, caplog):
    model, data = transformer_setup
    qmodel = quantize_model(model, **W4A4)
    esc = _esc(generations=2)

    def bad_search(objective, n, popsize):  # a "search" whose final mean rounds everything to 0
        theta = torch.zeros(popsize, n)
        for _ in range(esc.generations):
            yield theta, objective(theta), 0.1, lambda: torch.full((n,), 8.0)

    monkeypatch.setattr(esc, "_run_evotorch", bad_search)
    s_local, _ = local_mse_scales(qmodel, data)
    with caplog.at_level("WARNING", logger="esc.calibrators.esc"):
        h = esc.calibrate(qmodel, data).history
    assert h["kept_local"] == [1.0]
    assert h["search_fitness"][0] > h["local_fitness"][0] == h["final_fitness"][0]
    assert torch.equal(qmodel.activation_scales(), s_local)
    assert "keeping the local scales" in caplog.text


def test_esc_beats_minmax_at_w4a4_on_heavy_tailed_activations(mlp_setup):
    model, x, data = mlp_setup
    qmodel = quantize_model(model, **W4A4)
    _, maxima = local_mse_scales(qmodel, data, grid=2)
    task = FitnessEvaluator(qmodel, data, "task")
    minmax_scales = maxima / 7  # max calibration: clip = observed max |x|, qmax = 7 at 4 bits
    minmax_loss = task(minmax_scales)[0].item()
    fp_loss = torch.cat([data.loss(model(b[0]), b) for b in data.batches]).mean().item()

    h = _esc(generations=30).calibrate(qmodel, data).history
    esc_loss = task(qmodel.activation_scales())[0].item()
    assert esc_loss == pytest.approx(h["final_fitness"][0], rel=1e-6)
    assert esc_loss < 0.8 * minmax_loss  # closes a clear part of the gap
    assert (minmax_loss - esc_loss) > 0.3 * (minmax_loss - fp_loss)

    def agreement(scales):
        qmodel.set_activation_scales(scales)
        with torch.no_grad():
            return (qmodel(x).argmax(-1) == model(x).argmax(-1)).float().mean().item()
    assert agreement(qmodel.activation_scales()) > agreement(minmax_scales) + 0.2


# ------------------------------------------------------------------------------------ errors
def test_bad_configurations_raise(transformer_setup):
    model, data = transformer_setup
    with pytest.raises(QuantizationError, match="fitness"):
        ESCCalibrator(fitness="accuracy")
    with pytest.raises(QuantizationError, match="backend"):
        ESCCalibrator(backend="nevergrad")
    with pytest.raises(QuantizationError, match="init"):
        ESCCalibrator(init="kl")
    no_loss = CalibrationData(data.batches, data.forward)
    with pytest.raises(QuantizationError, match="loss"):
        _esc().calibrate(quantize_model(model, **W4A4), no_loss)
    asym = quantize_model(model, weight=QuantSpec(4, True, "channel"), activation=QuantSpec(4, False, "tensor"))
    with pytest.raises(QuantizationError, match="asymmetric"):
        _esc().calibrate(asym, data)
