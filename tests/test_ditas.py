"""DiTAS: searched-alpha smoothing and low-rank weight-error compensation (esc.ptq.ditas)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.calibrators.weights import calibrate_weights
from esc.ptq.ditas import DiTAS, LowRankLinear, QuantLowRankLinear
from esc.ptq.smoothquant import SmoothQuant
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import QuantizationError
from ptq_models import TinyConvTransformer, make_data, max_calibrate, model_forward

torch.set_num_threads(1)
W4 = QuantSpec(4, True, "channel")
A8 = QuantSpec(8, True, "tensor")
GROUPS = {f"blocks.{i}.norm{j}": [f"blocks.{i}.{'qkv' if j == 1 else 'fc1'}"] for i in range(2) for j in (1, 2)}


def outlier_model() -> TinyConvTransformer:
    """The tiny conv transformer with two planted outlier channels (gain 20) in every LayerNorm."""
    return TinyConvTransformer(outlier_channels=2).eval()


@pytest.mark.parametrize("rank", [0, 8])
def test_ditas_keeps_the_fp32_function(rank):
    model, data = outlier_model(), make_data(16, 8)
    smoothed = copy.deepcopy(model)
    method = DiTAS(W4, A8, rank=rank)
    method.apply(smoothed, data)
    assert method.groups == GROUPS and set(method.alphas) == set(GROUPS)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert method.compensated == (linears if rank else [])
    assert all(isinstance(smoothed.get_submodule(n), LowRankLinear) for n in method.compensated)
    with torch.no_grad():
        for b in data.batches:
            ref = model(b)
            torch.testing.assert_close(smoothed(b), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def group_errors(model: nn.Module, data: CalibrationData) -> dict[str, float]:
    """Per LayerNorm group, the output MSE of its quantized Linear on its float input (W4 per channel, A8 max-calibrated on
    the float model), against that Linear's float output: the per-layer quantization error, measured with the harness's quantizers."""
    qmodel = quantize_model(model, W4, A8)
    with qmodel.quant_state(weights=False):
        max_calibrate(qmodel, data)
    errors = {}
    for norm, (lin,) in GROUPS.items():
        layer = qmodel.model.get_submodule(lin)
        inputs = []
        handle = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        with qmodel.quant_state(weights=False, activations=False), torch.no_grad():
            for b in data.batches:
                qmodel(b)
        handle.remove()
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
        with torch.no_grad():
            quantized = layer(x)
            with qmodel.quant_state(weights=False, activations=False):
                target = layer(x)
        errors[norm] = float((quantized - target).pow(2).mean())
    return errors


def test_searched_alpha_is_no_worse_than_smoothquant_half_per_layer():
    model, data = outlier_model(), make_data(16, 8)
    ditas_model, sq_model = copy.deepcopy(model), copy.deepcopy(model)
    method = DiTAS(W4, A8, rank=0)
    method.apply(ditas_model, data)
    SmoothQuant(alpha=0.5).apply(sq_model, data)
    ditas, sq = group_errors(ditas_model, data), group_errors(sq_model, data)
    for norm in GROUPS:
        # the search's error (all 128 rows of the calibration set) is the harness's measured error
        assert ditas[norm] == pytest.approx(method.errors[norm][method.alphas[norm]], rel=1e-4)
        assert sq[norm] == pytest.approx(method.errors[norm][0.5], rel=1e-4)
        assert ditas[norm] <= sq[norm] * (1 + 1e-6), norm
    assert any(ditas[n] < 0.8 * sq[n] for n in GROUPS), (ditas, sq)
    assert set(method.alphas.values()) != {0.5}


def single_linear(out_features: int = 48, in_features: int = 32) -> tuple[nn.Module, CalibrationData]:
    """A seeded Linear with heavy-tailed weights, and calibration rows for it."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(out_features, in_features, generator=g) ** 3 / 5)
    return model, CalibrationData(list(torch.randn(16, in_features, generator=g).split(8)), model_forward)


@pytest.mark.parametrize("weight_clip", ["minmax", "mse"])
def test_low_rank_compensation_lowers_the_weight_error_monotonically_in_rank(weight_clip):
    model, data = single_linear()
    w = model[0].weight.detach().clone()
    errors = []
    for rank in (0, 1, 2, 4, 8, 16, 32):
        compensated = copy.deepcopy(model)
        method = DiTAS(W4, None, weight_clip=weight_clip, rank=rank)
        method.apply(compensated, data)
        qmodel = quantize_model(compensated, W4, None)
        calibrate_weights(qmodel, weight_clip)
        layer = qmodel.model[0]
        with torch.no_grad():
            w_hat = layer.quantized_weight()
        if rank:
            assert isinstance(layer, QuantLowRankLinear) and layer.left.shape == (48, rank)
            torch.testing.assert_close(w_hat, method.quantize_weight(layer.weight.detach()))  # the search's q is the pipeline's
            w_hat = w_hat + layer.left @ layer.right
        errors.append(float((w - w_hat).norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * errors[0]  # full rank: the branch holds the whole quantization error


def test_quantized_low_rank_linear_computes_the_definition():
    model, data = single_linear()
    DiTAS(W4, A8, rank=4).apply(model, data)
    qmodel = quantize_model(model, W4, A8)
    max_calibrate(qmodel, data)
    layer, x = qmodel.model[0], data.batches[0]
    xq = layer.input_quantizer(x)
    expected = F.linear(xq, layer.weight_quantizer(layer.weight), layer.bias) + xq @ layer.right.T @ layer.left.T
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), expected)
    qmodel.measure_level_utilisation(data.batches, data.forward)  # the harness's post-PTQ step still works
    assert {r["name"] for r in qmodel.summary()} == {"0.input_quantizer", "0.weight_quantizer"}


def test_ditas_rejects_bad_settings_and_a_quantized_model():
    with pytest.raises(QuantizationError, match="rank >= 0"):
        DiTAS(W4, A8, rank=-1)
    with pytest.raises(QuantizationError, match="weight_clip"):
        DiTAS(W4, A8, weight_clip="bogus")
    with pytest.raises(QuantizationError, match="per tensor"):
        DiTAS(W4, QuantSpec(8, True, "channel"))
    model = outlier_model()
    with pytest.raises(QuantizationError, match="float model"):
        DiTAS(W4, A8).apply(quantize_model(model), make_data(4, 4))


@pytest.mark.parametrize("precision", ["w4a8", "w4"])
def test_hydra_config_instantiates_with_the_runs_precision(precision):
    from hydra.utils import instantiate

    from esc.config import compose

    cfg = compose(["ptq=ditas", f"precision={precision}", "seed=3", "calibration.weights=mse"])
    method = instantiate(cfg.ptq)
    assert (method.name, method.stage, method.seed, method.weight_clip) == ("ditas", "before", 3, "mse")
    assert method.weight == QuantSpec(4, True, "channel")
    assert method.activation == (A8 if precision == "w4a8" else None)
    assert (method.grid[1], len(method.grid), method.rank, method.iterations) == (0.05, 21, 32, 10)
