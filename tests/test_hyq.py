"""HyQ: QADS folded into the float model (exact, lowers per-tensor quantization error) and the integer
softmax with a linear exponential (known answers worked by hand, float-limit bound, scope option)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from esc.calibrators.base import CalibrationData, use_unsigned_for_nonnegative
from esc.calibrators.minmax import MinMaxCalibrator
from esc.ptq.hyq import HyQ, fold, input_channel_factor
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import QuantizationError
from esc.quant.scope import build_scope
from esc.quant.softmax import IntSoftmaxSpec, LinearSoftmaxQuantizer, float_error_bound, linear_int_exp, log_int_softmax, score_gaps
from ptq_models import TinyConvTransformer, make_data, model_forward, tiny_yamnet

SPEC = IntSoftmaxSpec()  # the official constants


# ------------------------------------------------------------------------------------------ softmax
def test_linear_int_exp_known_answer():
    """S = 1/4: x0 = floor(-0.6931 / 0.25) = -3, b_int = floor(1.35471 / 0.25) = 5. Scores t = 0, -1, -3, -7:
    q = 0, 0, 1, 2; r = 0, -1, 0, -1; z = 5, 4, 5, 4; E = z 2^(30 - q) = (20, 16, 10, 4) 2^28."""
    e = linear_int_exp(torch.tensor([[0.0, -1.0, -3.0, -7.0]]), torch.tensor(0.25), SPEC)
    assert torch.equal(e, torch.tensor([[20.0, 16.0, 10.0, 4.0]]) * 2**28)
    # far below the max the score saturates at shift * x0 = -90: q = 30, r = 0, E = 5
    assert linear_int_exp(torch.tensor([-100.0]), torch.tensor(0.25), SPEC).item() == 5.0


def test_log_int_softmax_known_answer():
    """sum(E) / E = 50/20, 50/16, 50/10, 50/4 round (half to even) to 2, 3, 5, 12; log_round gives k = 1, 2, 2, 4
    (3 - 2 >= 1 and 12 - 8 >= 4 round up); the output is 2^-k; a zero exponential gives 0."""
    e = torch.tensor([[20.0, 16.0, 10.0, 4.0, 0.0]])
    assert torch.equal(log_int_softmax(e, 4), torch.tensor([[0.5, 0.25, 0.25, 0.0625, 0.0]]))
    assert torch.equal(log_int_softmax(e, 1), torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0]]))  # k >= 2^bits -> 0


def test_quantizer_reads_probabilities_and_gives_the_known_answers():
    scores = torch.tensor([[0.0, -0.25, -0.75, -1.75], [3.0, 2.75, 2.25, 1.25]])  # the same row shifted by 3
    p = torch.softmax(scores, -1)
    assert torch.allclose(score_gaps(p), torch.tensor([0.0, 0.25, 0.75, 1.75]).expand(2, 4), atol=1e-6)
    for grid, expected in (("log2", [0.5, 0.25, 0.25, 0.0625]), ("uniform", [102 / 255, 82 / 255, 51 / 255, 20 / 255])):
        q = LinearSoftmaxQuantizer(8, grid, IntSoftmaxSpec(output_bits=4 if grid == "log2" else 8), "probs")
        q.set_signed(False)
        q.set_scale(0.25)
        assert torch.equal(q(p), torch.tensor(expected).expand(2, 4)), grid  # E / sum(E) = 0.4, 0.32, 0.2, 0.08


def test_float_limit_error_is_within_the_linear_fit_bound():
    """On a fine grid every probability E / sum(E) is within the factor max h / min h = 1.0775 of the float
    softmax, so is the ratio's spread within a row, and the bound is nearly reached; rows of the uniform
    output sum to 1 within half a level per entry."""
    assert float_error_bound(SPEC) == pytest.approx(1.0775, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(8 * torch.rand(64, 32, generator=g), -1)
    step = torch.tensor(2.0**-10)
    e = linear_int_exp(-torch.round(score_gaps(p) / step), step, SPEC)
    ratio = e / e.sum(-1, keepdim=True) / p
    bound = 1.0775 * 1.005  # 0.5 %: the official ln2 = 0.6931 and x0 = floor(-ln2 / S) on the grid S = 2^-10
    assert 1 / bound <= ratio.min() and ratio.max() <= bound
    spread = ratio.amax(-1) / ratio.amin(-1)
    assert spread.max() <= bound and spread.max() > 1.05
    q = LinearSoftmaxQuantizer(16, "uniform", IntSoftmaxSpec(output_bits=8), "probs")
    q.set_signed(False)
    q.set_scale(step)
    assert (q(p).sum(-1) - 1).abs().max() <= 32 * 0.5 / 255


def test_paper_hyq_scope_puts_the_integer_softmax_on_attention_probs():
    from omegaconf import OmegaConf

    from esc.config import compose

    cfg = OmegaConf.to_container(compose(["scope=paper_hyq"]).scope, resolve=True)
    model, data = TinyConvTransformer().eval(), make_data()
    qmodel = quantize_model(model, QuantSpec(8, True, "channel"), QuantSpec(8, True, "tensor"), scope=build_scope(cfg, 8))
    probs = {n: q for n, q in qmodel.all_activation_quantizers.items() if q.role == "attention_probs"}
    assert len(probs) == 2 and all(isinstance(q, LinearSoftmaxQuantizer) for q in probs.values())
    use_unsigned_for_nonnegative(qmodel, data)
    MinMaxCalibrator().calibrate(qmodel, data)
    assert all(not q.signed and q.scale.item() > 0 for q in probs.values())  # calibrated on the gaps (>= 0)
    seen = []
    for q in probs.values():
        q.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        out = qmodel(data.batches[0])
    assert torch.isfinite(out).all()
    levels = torch.cat([torch.exp2(-torch.arange(16.0)), torch.zeros(1)])
    assert all(torch.isin(o, levels).all() for o in seen)  # 4-bit log2 outputs
    cfg["roles"]["head"]["softmax"] = {}
    with pytest.raises(QuantizationError, match="attention_probs role only"):
        build_scope(cfg, 8)


# --------------------------------------------------------------------------------------------- QADS
def planted_block(seed: int = 0) -> nn.Sequential:
    """Conv 3x3 -> ReLU -> pointwise Conv whose hidden channels carry gains 10^U(-1, 1), compensated in the
    pointwise weights (inter-channel variance of the pointwise input, a fixed float function)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
    fold(block[0], block[2], 10 ** (1 - 2 * torch.rand(16, generator=g)))
    return block.eval()


def image_data(n: int, seed: int, batch: int = 16) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    return CalibrationData(list(torch.randn(n, 4, 12, 12, generator=g).split(batch)), model_forward)


def relative_error(model: nn.Module, data: CalibrationData, test: torch.Tensor, bits: int) -> float:
    """Relative output MSE of ``model`` at W8 per channel and A``bits`` per tensor (max calibration)."""
    qmodel = quantize_model(model, QuantSpec(8, True, "channel"), QuantSpec(bits, True, "tensor"))
    use_unsigned_for_nonnegative(qmodel, data)
    MinMaxCalibrator().calibrate(qmodel, data)
    with torch.no_grad():
        ref = model(test)
        return float(((qmodel(test) - ref) ** 2).mean() / (ref**2).mean())


def test_input_channel_factor_maps_grouped_weights():
    conv = nn.Conv2d(4, 6, 1, groups=2)  # 2 input channels per group, 3 outputs per group
    factor = input_channel_factor(conv, torch.tensor([1.0, 2.0, 3.0, 4.0])).reshape(6, 2)
    assert torch.equal(factor, torch.tensor([[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 3))


def test_qads_keeps_the_fp32_function_of_a_yamnet():
    model, g = tiny_yamnet(), torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, 16, generator=g)
    with torch.no_grad():
        ref = model(x)
    hyq = HyQ(iterations=30, lr=0.1)
    hyq.apply(model, CalibrationData(list(x[:8].split(4)), model_forward))
    assert set(hyq.stats) == {f"features.layer{i}.{k}" for i in (2, 3) for k in ("depthwise", "pointwise")}
    assert hyq.stats["features.layer3.depthwise"]["producer"] == "features.layer2.pointwise"
    assert all(s["loss_scaled"] <= s["loss_identity"] for s in hyq.stats.values())
    with torch.no_grad():
        assert (model(x) - ref).abs().max() <= 1e-4 * ref.abs().max()  # held-out clips too


@pytest.mark.parametrize("bits", [4, 8])
def test_qads_lowers_per_tensor_error_of_a_block_with_inter_channel_variance(bits):
    data, test = image_data(32, 1), torch.randn(64, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    model = planted_block()
    before = relative_error(model, data, test, bits)
    HyQ(iterations=150, lr=0.1, act_bits=bits).apply(model, data)
    after = relative_error(model, data, test, bits)
    assert after < 0.25 * before, (before, after)


def test_qads_refuses_a_model_without_a_qualifying_convolution():
    """TinyConvTransformer's conv1 reads the features and conv2 reads a GELU: nothing to fold into."""
    with pytest.raises(QuantizationError, match="no convolution qualifies"):
        HyQ(iterations=2).apply(TinyConvTransformer().eval(), make_data())
    block = planted_block()
    with pytest.raises(QuantizationError, match="no convolution qualifies"):
        HyQ(iterations=2, layers=["nothing*"]).apply(block, image_data(16, 0))
    with pytest.raises(QuantizationError, match="stage='before'"):
        HyQ().apply(quantize_model(block), image_data(16, 0))


def test_hydra_config_takes_the_precision_bits():
    from hydra.utils import instantiate

    from esc.config import compose

    method = instantiate(compose(["ptq=hyq", "precision=w8a4", "seed=3"]).ptq)
    assert (method.name, method.stage, method.act_bits, method.weight_bits, method.seed) == ("hyq", "before", 4, 8, 3)
    assert (method.iterations, method.lr) == (1000, 1e-2)  # the official values
    assert instantiate(compose(["ptq=hyq", "precision=w4"]).ptq).act_bits == 8  # weight-only: the official 8
