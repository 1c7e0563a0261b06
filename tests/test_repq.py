"""RepQ-ViT: the post-LayerNorm scale reparameterisation and the log-sqrt(2) softmax grid, each a check that can fail."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.config import compose
from esc.ptq.repq import RepQViT
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import Log2Quantizer, QuantizationError
from esc.quant.scope import build_scope
from ptq_models import OneBlock, TinyConvTransformer, correlated, make_data, max_calibrate, tensor_data, tiny_yamnet

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
W4 = QuantSpec(4, True, "channel")


def outlier_block() -> OneBlock:
    """One pre-LN block whose two LayerNorms have planted outlier channels: 3 channels with 15x gains and 3 with
    large offsets (beta +6, -6, +4) on top of random betas, so the channels' ranges differ in width and centre."""
    model = OneBlock().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in (model.block.norm1, model.block.norm2):
            norm.weight[:3] *= 15.0
            norm.bias.copy_(torch.randn(32, generator=g))
            norm.bias[3:6] += torch.tensor([6.0, -6.0, 4.0])
    return model


def channel_ranges(model: nn.Module, norm: nn.Module, data: CalibrationData) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of ``norm``'s output over the calibration data (float64)."""
    outs = []
    h = norm.register_forward_hook(lambda m, a, o: outs.append(o.detach().reshape(-1, o.shape[-1]).double()))
    with torch.no_grad():
        for b in data.batches:
            model(b)
    h.remove()
    x = torch.cat(outs)
    return x.amin(0), x.amax(0)


def relative_output_error(qmodel, model, data) -> float:
    """Mean squared error of the quantized model's outputs relative to the float outputs' mean square."""
    with torch.no_grad():
        err = sum(float((qmodel(b) - model(b)).pow(2).mean()) for b in data.batches)
        return err / sum(float(model(b).pow(2).mean()) for b in data.batches)


# -------------------------------------------------------------------------------- reparameterisation
def test_repq_keeps_the_fp32_function_on_a_conv_transformer():
    """Every block LayerNorm is treated (the final one feeds a mean-pool, not a Linear) and FP32 outputs are unchanged
    to 1e-4 of their magnitude (catches a sign slip in b', r1 applied to W's rows instead of its columns, ...)."""
    model = TinyConvTransformer(outlier_channels=2).eval()
    data = make_data(16, 8)
    reparam = copy.deepcopy(model)
    method = RepQViT(bits=4)
    method.apply(reparam, data)
    assert method.groups == {f"blocks.{i}.norm{j}": [f"blocks.{i}.{'qkv' if j == 1 else 'fc1'}"] for i in range(2) for j in (1, 2)}
    with torch.no_grad():
        for b in data.batches:
            ref = model(b)
            torch.testing.assert_close(reparam(b), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert not torch.allclose(reparam.blocks[0].norm1.weight, model.blocks[0].norm1.weight)  # it did change something


def test_repq_parameters_follow_the_papers_formulas():
    """gamma/r1, (beta + s r2)/r1, W r1 (per input column) and b - W (s r2) with s, z from per-channel min/max
    (integer z), s~ = mean s and z~ = mean z, all computed here from the hooked LayerNorm output."""
    model = outlier_block()
    data = tensor_data(correlated(16, 12, 32, seed=6))
    norm, fc1 = model.block.norm2, model.block.fc1
    lo, hi = channel_ranges(model, norm, data)
    bits = 6
    s = (hi - lo) / (2 ** bits - 1)
    z = torch.round(-lo / s)
    r1, r2 = s / s.mean(), z - z.mean()
    gamma, beta = norm.weight.detach().double(), norm.bias.detach().double()
    w, b = fc1.weight.detach().double(), fc1.bias.detach().double()
    method = RepQViT(bits=bits)
    method.apply(model, data)
    rep = method.reparams["block.norm2"]
    assert float(rep["target_scale"]) == pytest.approx(float(s.mean()), rel=1e-6)
    assert float(rep["target_zero_point"]) == pytest.approx(float(z.mean()), rel=1e-6)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.detach().double(), gamma / r1, **close)
    torch.testing.assert_close(norm.bias.detach().double(), (beta + s * r2) / r1, **close)
    torch.testing.assert_close(fc1.weight.detach().double(), w * r1, **close)
    torch.testing.assert_close(fc1.bias.detach().double(), b - w @ (s * r2), **close)


def test_repq_gives_every_channel_one_range():
    """After the reparameterisation each channel of the LayerNorm output spans s~ (2^b - 1) and starts at -s~ z~ within
    half a step; before, the per-channel ranges differ by more than 10x (the planted outliers)."""
    model = outlier_block()
    data = tensor_data(correlated(16, 12, 32, seed=6))
    lo, hi = channel_ranges(model, model.block.norm1, data)
    spread_before = float((hi - lo).max() / (hi - lo).min())
    method = RepQViT(bits=4)
    method.apply(model, data)
    rep = method.reparams["block.norm1"]
    s_t, z_t = float(rep["target_scale"]), float(rep["target_zero_point"])
    lo, hi = channel_ranges(model, model.block.norm1, data)
    spread_after = float((hi - lo).max() / (hi - lo).min())
    assert spread_before > 10 and spread_after < 1.001
    torch.testing.assert_close(hi - lo, torch.full_like(lo, 15 * s_t), rtol=1e-4, atol=0)
    assert float((lo + s_t * z_t).abs().max()) <= 0.5 * s_t + 1e-5


@pytest.mark.parametrize("weight,activation,ratio", [(None, QuantSpec(4, True, "tensor"), 0.6),
                                                     (W4, QuantSpec(4, False, "tensor"), 0.8)])
def test_repq_lowers_the_per_tensor_quantization_error_of_the_block(weight, activation, ratio):
    """A4 (float weights, symmetric) and W4A4 (asymmetric, the official code's setting), every activation quantizer
    per-tensor with max calibration: the block's output error falls below ``ratio`` times the error without RepQ-ViT."""
    data = tensor_data(correlated(32, 12, 32, seed=6))
    errors = {}
    for name in ("plain", "repq"):
        model = outlier_block()
        ref = copy.deepcopy(model)
        if name == "repq":
            RepQViT(bits=activation.bits).apply(model, data)
        qmodel = quantize_model(model, weight, activation)
        max_calibrate(qmodel, data)
        errors[name] = relative_output_error(qmodel, ref, data)
    assert errors["repq"] < ratio * errors["plain"], errors


class SharedReaders(nn.Module):
    """A LayerNorm read by three Linears, one without bias (Hugging Face's query/key/value projections, Whisper's
    bias-less ``k_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
        with torch.no_grad():
            self.norm.weight[:2] *= 10.0

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.q(h), self.k(h), self.v(h)], -1)


def test_repq_treats_three_readers_as_one_group_and_adds_the_missing_bias():
    model = SharedReaders().eval()
    data = tensor_data(correlated(16, 6, 16, seed=4))
    reparam = copy.deepcopy(model)
    method = RepQViT()
    method.apply(reparam, data)
    assert method.groups == {"norm": ["q", "k", "v"]}
    assert reparam.k.bias is not None and reparam.k.bias.abs().max() > 0
    with torch.no_grad():
        for b in data.batches:
            torch.testing.assert_close(reparam(b), model(b), rtol=0, atol=1e-4 * float(model(b).abs().max()))


class HiddenConsumer(nn.Module):
    """A LayerNorm output read by a Linear and by a residual add (invisible to module hooks), then a clean
    LayerNorm -> bias-less Linear pair."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8, bias=False)
        self.norm2, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 4)
        with torch.no_grad():
            self.norm.weight[0] = self.norm2.weight[0] = 10.0

    def forward(self, x):
        h = self.norm(x)
        h = h + self.fc(h)
        return self.fc2(self.norm2(h))


def test_repq_reverts_a_group_with_a_hidden_consumer_and_its_added_bias():
    """The residual add would see the shifted LayerNorm output: that group is reverted (its added bias removed), the
    other one is kept, and the float function is unchanged."""
    model = HiddenConsumer().eval()
    data = tensor_data(correlated(16, 4, 8, seed=8))
    reparam = copy.deepcopy(model)
    method = RepQViT()
    method.apply(reparam, data)
    assert method.groups == {"norm2": ["fc2"]}
    assert reparam.fc.bias is None and torch.equal(reparam.norm.weight, model.norm.weight)
    with torch.no_grad():
        for b in data.batches:
            torch.testing.assert_close(reparam(b), model(b), rtol=1e-5, atol=1e-5)


def test_repq_rejects_a_model_without_layernorm_a_quantized_model_and_bad_settings():
    data = tensor_data(torch.randn(4, 32, 16), batch=4)
    with pytest.raises(QuantizationError, match="no LayerNorm whose output is read only by Linear"):
        RepQViT().apply(tiny_yamnet(), data)
    with pytest.raises(QuantizationError, match="float model"):
        RepQViT().apply(quantize_model(TinyConvTransformer().eval()), make_data(4, 4))
    for bad in ({"bits": 1}, {"eps": 0.0}):
        with pytest.raises(QuantizationError, match="need bits in 2..16"):
            RepQViT(**bad)


# ------------------------------------------------------------------------------------ log-sqrt(2) grid
def test_log_sqrt2_grid_known_answer():
    """3 bits, s = 1: levels 2^(-q/2), q = 0..7. By hand: -2 log2(0.6) = 1.47 -> 1 -> 2^-0.5; -2 log2(0.3) = 3.47 -> 3
    -> 2^-1.5; -2 log2(0.1) = 6.64 -> 7 -> 2^-3.5; -2 log2(0.07) = 7.67 -> 8 >= 2^3 -> 0; 2.0 lies above s -> s."""
    q = Log2Quantizer(3, grid="log_sqrt2")
    q.set_clip_range(torch.tensor(1.0))
    x = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.07, 0.0, 2.0])
    expected = [1.0, 2 ** -0.5, 2 ** -1.5, 2 ** -3.5, 0.0, 0.0, 1.0]
    assert q(x).tolist() == pytest.approx(expected, rel=1e-6, abs=0)
    q.set_clip_range(torch.tensor(0.5))
    assert q(torch.tensor([0.25, 0.2])).tolist() == pytest.approx([0.25, 0.5 * 2 ** -1.5], rel=1e-6)  # 2.64 -> 3
    with pytest.raises(QuantizationError, match="negative"):
        q(torch.tensor([-0.1]))


def test_log_sqrt2_values_are_the_papers_log2_inference_form():
    """RepQ-ViT's inference form of a level q: s * 2^(-ceil(q/2)) * (sqrt(2) if q is odd else 1), a shift per level."""
    q = Log2Quantizer(4, grid="log_sqrt2")
    q.set_clip_range(torch.tensor(0.8))
    x = torch.rand(2000, generator=torch.Generator().manual_seed(0)) ** 2
    out = q(x)
    level = q.levels(x, q.scale, q.zero_point).double()
    form = 0.8 * torch.exp2(-torch.ceil(level / 2)) * torch.where(level % 2 == 1, math.sqrt(2.0), 1.0)
    kept = out > 0
    assert kept.float().mean() > 0.8 and (level[~kept] == 15).all()
    torch.testing.assert_close(out[kept].double(), form[kept], rtol=1e-6, atol=0)


def test_log2_grid_is_unchanged_bit_for_bit():
    """The default grid computes the earlier log2 formula exactly: round(-log2(x / s)), 0 from 2^b on, else s 2^-q."""
    q = Log2Quantizer(4)
    q.set_clip_range(torch.tensor(0.7))
    x = torch.rand(5000, generator=torch.Generator().manual_seed(1)) ** 3
    e = torch.round(-torch.log2(x / q.scale))
    assert torch.equal(q(x), torch.where(e >= 16, torch.zeros_like(x), q.scale * torch.exp2(-e.clamp(min=0))))
    assert q.grid == "log2"
    with pytest.raises(QuantizationError, match="unknown logarithmic grid"):
        Log2Quantizer(4, grid="log3")


def test_scope_paper_log_sqrt2_puts_the_softmax_probabilities_on_the_log_sqrt2_grid():
    scope = build_scope(dict(compose(["scope=paper_log_sqrt2"]).scope), 4)
    qmodel = quantize_model(TinyConvTransformer().eval(), W4, QuantSpec(4, True, "tensor"), scope=scope, head=["head"])
    grids = {(r["role"], r["grid"]) for r in qmodel.summary() if r["kind"] == "activation"}
    assert ("attention_probs", "log_sqrt2") in grids
    assert {g for role, g in grids if role != "attention_probs"} == {"uniform"}
    with pytest.raises(QuantizationError, match="grid='log5'"):
        build_scope({**dict(compose(["scope=paper"]).scope), "roles": {**compose(["scope=paper"]).scope.roles,
                                                                         "attention_probs": {"grid": "log5"}}}, 4)


# --------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("precision,bits", [("w4a4", 4), ("w8a8", 8), ("w4", 8)])
def test_hydra_config_instantiates_with_the_runs_activation_bits(precision, bits):
    method = instantiate(compose(["ptq=repq_vit", f"precision={precision}"]).ptq)
    assert isinstance(method, RepQViT) and method.name == "repq_vit" and method.stage == "before"
    assert method.bits == bits


def test_end_to_end_run_on_the_tiny_ast(tmp_path):
    """``esc.pipeline.execute`` with ptq=repq_vit and scope=paper_log_sqrt2 (the whole of RepQ-ViT) at W4A4 on the tiny
    AST (no qualifying LayerNorm would be an error): the row has finite metrics, log-sqrt(2) softmax quantizers, PTQ time."""
    from esc.pipeline import execute, run_axes

    cfg = compose(["+experiment=tiny", "precision=w4a4", "ptq=repq_vit", "scope=paper_log_sqrt2", f"paths.root={tmp_path}",
                   f"paths.data={tmp_path}/data"])
    row = execute(cfg, run_axes(cfg))
    assert all(math.isfinite(v) for v in row["metrics"].values() if isinstance(v, float))
    probs = [q for q in row["quantizers"] if q["role"] == "attention_probs"]
    assert probs and all(q["grid"] == "log_sqrt2" for q in probs)
    assert row["ptq_seconds"] > 0
