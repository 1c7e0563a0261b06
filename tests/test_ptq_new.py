"""PTQ methods of issue 16 (QDrop, NoisyQuant, rotation): defining properties, each a check that can fail."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from esc.ptq.adaround import dropped_quantization
from esc.ptq.brecq import BRECQ, QDrop
from esc.ptq.common import quantized_layers
from esc.ptq.noisyquant import NoisyInput, NoisyQuant
from esc.ptq.rotation import QuantRotatedLinear, RotatedLinear, Rotation, hadamard, hadamard_transform, random_rotation, rotate
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import QuantizationError, UniformQuantizer
from models import heavy_tailed
from ptq_models import OneBlock, TinyConvTransformer, correlated, make_data, max_calibrate, tensor_data

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
W4 = QuantSpec(4, True, "channel")
A4 = QuantSpec(4, True, "tensor")
A6 = QuantSpec(6, True, "tensor")


def block_setup():
    """The one-block model, its calibration data and a W4A4 max-calibrated copy."""
    model = OneBlock().eval()
    data = tensor_data(correlated(32, 12, 32, seed=6))
    qmodel = quantize_model(model, W4, A4)
    max_calibrate(qmodel, data)
    return model, data, qmodel


def output_error(qmodel, model, data) -> float:
    """Summed mean squared difference between the quantized and the float model's outputs."""
    with torch.no_grad():
        return sum(float((qmodel(b) - model(b)).pow(2).mean()) for b in data.batches)


def weights(qmodel) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in quantized_layers(qmodel).values()]


# -------------------------------------------------------------------------------------------- QDrop
def test_dropped_quantization_keeps_x_with_probability_p_and_restores_after():
    """Catches a reversed convention (p the keep probability, as in the official code), a mask not applied, or
    hooks left behind: inside, each element is x (fraction ~p) or Q(x); outside, every element is Q(x)."""
    q = UniformQuantizer(4, name="q")
    q.set_scale(0.3)
    holder = nn.Sequential(q)
    x = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    qx = q(x)
    moved = qx != x
    assert moved.float().mean() > 0.99
    with dropped_quantization(holder, 0.2, torch.Generator().manual_seed(1)):
        out = holder(x)
    assert torch.equal(torch.where(out == x, x, qx), out)  # every element is x or Q(x)
    assert 0.18 < float((out == x)[moved].float().mean()) < 0.22
    assert torch.equal(holder(x), qx)


def test_qdrop_lowers_block_output_error_and_lands_on_grid():
    """The defining property (QDrop lowers the block error vs round-to-nearest) on a W4A4 transformer block."""
    model, data, qmodel = block_setup()
    rtn = output_error(qmodel, model, data)
    method = QDrop(iterations=200, batch_size=8)
    method.apply(qmodel, data)
    assert output_error(qmodel, model, data) < 0.9 * rtn
    assert method.stats["model.block"]["learned"] < method.stats["model.block"]["nearest"]
    for layer in quantized_layers(qmodel).values():
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)


def test_qdrop_without_drop_is_brecq_and_with_drop_differs():
    """drop_prob=0 gives BRECQ's rounding bit for bit under the same seed (catches QDrop passing other settings
    to the machinery, or its mask generator shifting the minibatch sequence); drop_prob=0.5 changes it (catches
    the drop not reaching the optimisation)."""
    _, data, base = block_setup()
    runs = {}
    for name, method in {"brecq": BRECQ(iterations=60, batch_size=8, keep_better=False),
                         "qdrop0": QDrop(drop_prob=0.0, iterations=60, batch_size=8, keep_better=False),
                         "qdrop": QDrop(iterations=60, batch_size=8, keep_better=False)}.items():
        qmodel = copy.deepcopy(base)
        method.apply(qmodel, data)
        runs[name] = weights(qmodel)
    assert all(torch.equal(a, b) for a, b in zip(runs["brecq"], runs["qdrop0"]))
    assert not all(torch.equal(a, b) for a, b in zip(runs["brecq"], runs["qdrop"]))


def test_qdrop_rejects_a_probability_outside_0_1():
    with pytest.raises(QuantizationError, match="drop_prob"):
        QDrop(drop_prob=1.5)


# --------------------------------------------------------------------------------------- NoisyQuant
def coherent_heavy_tailed(n: int, c: int, seed: int) -> torch.Tensor:
    """``[n, 4, c]`` rows ``a * v + small noise``: a heavy-tailed per-row amplitude ``a`` (Gaussian with rare 60x
    outliers) on one channel profile ``v``, i.e. correlated channels, whose rounding errors add up coherently."""
    g = torch.Generator().manual_seed(seed)
    v = 1.0 + 0.3 * torch.randn(c, generator=torch.Generator().manual_seed(99))
    return heavy_tailed((n, 4, 1), seed=seed) * v + 0.05 * torch.randn(n, 4, c, generator=g)


def coherent_linear(c: int = 64, out: int = 32) -> nn.Sequential:
    """A Linear whose rows have a common positive component (so the input's rounding errors do not cancel)."""
    g = torch.Generator().manual_seed(7)
    layer = nn.Linear(c, out)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(out, c, generator=g) + 0.3) / c ** 0.5)
    return nn.Sequential(layer).eval()


def test_noisyquant_lowers_the_layer_error_on_held_out_heavy_tailed_input():
    """The defining property: on a heavy-tailed input, 6-bit max calibration, the searched noisy bias lowers the
    layer's output error against the float layer on clips the search never saw (catches a search that does not
    pick the best amplitude, noise not removed after the layer, a wrongly folded bias)."""
    model = coherent_linear()
    x, x_test = coherent_heavy_tailed(512, 64, seed=1), coherent_heavy_tailed(512, 64, seed=2)
    data = tensor_data(x, batch=128)
    qmodel = quantize_model(model, None, A6)
    max_calibrate(qmodel, data)

    def error(inp):
        with torch.no_grad():
            return float((qmodel(inp) - model(inp)).pow(2).mean())

    before, before_test = error(x), error(x_test)
    method = NoisyQuant()
    method.apply(qmodel, data)
    stats = method.stats["0.input_quantizer"]
    assert stats["amplitude"] > 0
    assert error(x) < 0.7 * before
    assert error(x_test) < 0.7 * before_test
    torch.testing.assert_close(stats["error_noisy"], error(x), rtol=1e-4, atol=0)  # the searched error is the model's


def test_noisyquant_model_computes_the_definition():
    """The layer computes ``W_q (Q(x + n) - n) + b`` (by hand, with the quantizer's own scale), and with activation
    quantization off it is the weight-quantized layer again: the noise is exactly removed through the bias."""
    model = coherent_linear()
    x = coherent_heavy_tailed(64, 64, seed=3)
    data = tensor_data(x, batch=32)
    qmodel = quantize_model(model, W4, A6)
    max_calibrate(qmodel, data)
    with torch.no_grad():
        weight_only = qmodel.model[0].quantized_weight().clone()
        ref_off = torch.nn.functional.linear(x, weight_only, model[0].bias)
    NoisyQuant(steps=50).apply(qmodel, data)
    layer = qmodel.model[0]
    assert isinstance(layer.input_quantizer, NoisyInput)
    n, q = layer.input_quantizer.noise, layer.input_quantizer.quantizer
    assert n.abs().max() > 0
    s = float(q.scale)
    hand = ((x + n) / s).round().clamp(-31, 31) * s - n
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), hand @ weight_only.T + model[0].bias, rtol=1e-5, atol=1e-5)
        with qmodel.quant_state(activations=False):
            torch.testing.assert_close(qmodel(x), ref_off, rtol=1e-5, atol=1e-5)


def test_noisyquant_with_zero_amplitude_leaves_the_model_unchanged():
    """max_amplitude=0: every output equals the calibrated model's bit for bit (catches noise or a bias change
    that does not vanish with the amplitude); every block Linear is treated, the head (its own role) is not."""
    model = TinyConvTransformer().eval()
    data = make_data(8, 4, mean=1.0)
    qmodel = quantize_model(model, W4, A6, head=["head"])
    max_calibrate(qmodel, data)
    with torch.no_grad():
        ref = [qmodel(b) for b in data.batches]
    method = NoisyQuant(max_amplitude=0.0, steps=3)
    method.apply(qmodel, data)
    assert set(method.stats) == {f"blocks.{i}.{n}.input_quantizer" for i in (0, 1) for n in ("qkv", "proj", "fc1", "fc2")}
    with torch.no_grad():
        assert all(torch.equal(qmodel(b), r) for b, r in zip(data.batches, ref))


class SharedReaders(nn.Module):
    """A LayerNorm read by three Linears (Hugging Face's separate query/key/value projections)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.q(h), self.k(h), self.v(h)], -1)


def test_noisyquant_gives_a_shared_tensor_one_noise_and_folds_each_readers_bias():
    """A LayerNorm output shared by three Linears gets one NoisyInput (one noise) in all four slots, and each reader's
    bias (one added to the bias-less ``v``) removes it: with activation quantization off the outputs are the
    weight-quantized ones (catches a slot left unwrapped, which double-quantizes, or a reader left unfolded)."""
    model = SharedReaders().eval()
    data = tensor_data(correlated(16, 6, 16, seed=4))
    qmodel = quantize_model(model, W4, A4)
    qmodel.share_quantizers(lambda: qmodel(data.batches[0]))
    max_calibrate(qmodel, data)
    with torch.no_grad(), qmodel.quant_state(activations=False):
        ref = [qmodel(b) for b in data.batches]
    assert qmodel.model.q.input_quantizer is qmodel.model.norm.output_quantizer  # one quantizer, kept at the norm
    method = NoisyQuant(steps=40, roles=["layernorm_output"])
    method.apply(qmodel, data)
    slots = [qmodel.model.norm.output_quantizer] + [getattr(qmodel.model, n).input_quantizer for n in "qkv"]
    assert isinstance(slots[0], NoisyInput) and all(s is slots[0] for s in slots)
    assert list(method.stats) == ["norm.output_quantizer"] and method.stats["norm.output_quantizer"]["amplitude"] > 0
    assert qmodel.model.v.bias is not None
    with torch.no_grad(), qmodel.quant_state(activations=False):
        for b, r in zip(data.batches, ref):
            torch.testing.assert_close(qmodel(b), r, rtol=1e-5, atol=1e-5)


class ResidualReader(nn.Module):
    """A LayerNorm output read by a Linear and by a residual add (a reader no bias can denoise)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc(h)


def test_noisyquant_reverts_a_tensor_with_a_hidden_reader():
    """The residual add would keep the noise: the check reverts that tensor and the model is left as calibrated."""
    model = ResidualReader().eval()
    data = tensor_data(correlated(16, 6, 16, seed=5))
    qmodel = quantize_model(model, W4, A4)
    qmodel.share_quantizers(lambda: qmodel(data.batches[0]))
    max_calibrate(qmodel, data)
    with torch.no_grad():
        ref = [qmodel(b) for b in data.batches]
    method = NoisyQuant(steps=40, roles=["layernorm_output"])
    method.apply(qmodel, data)
    assert method.stats == {} and isinstance(qmodel.model.fc.input_quantizer, UniformQuantizer)
    with torch.no_grad():
        assert all(torch.equal(qmodel(b), r) for b, r in zip(data.batches, ref))


def test_noisyquant_rejects_unknown_roles():
    with pytest.raises(QuantizationError, match="roles"):
        NoisyQuant(roles=["linear"])


# ----------------------------------------------------------------------------------------- Rotation
@pytest.mark.parametrize("dim,kind", [(32, "hadamard"), (24, "hadamard"), (32, "orthogonal")])
def test_rotation_keeps_the_fp32_function(dim, kind):
    """FP32 outputs unchanged to 1e-4 after rotating every Linear (24: not a power of two, the orthogonal fallback);
    the rotations are orthogonal and the Hadamard one has entries +-1/sqrt(d) (catches a non-orthogonal R, a weight
    rotated on the wrong side, a forward that forgets to rotate)."""
    model = TinyConvTransformer(dim=dim, ff=2 * dim, outlier_channels=2).eval()
    data = make_data(8, 4)
    rotated = copy.deepcopy(model)
    method = Rotation(kind=kind)
    method.apply(rotated, data)
    assert len(method.rotated) == 9 and all(isinstance(rotated.get_submodule(n), RotatedLinear) for n in method.rotated)
    r = rotated.blocks[0].fc2.rotation
    torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0]), rtol=0, atol=1e-5)
    if kind == "hadamard" and dim == 32:
        torch.testing.assert_close(r.abs(), torch.full_like(r, r.shape[0] ** -0.5), rtol=0, atol=1e-6)
    with torch.no_grad():
        for b in data.batches:
            ref = model(b)
            torch.testing.assert_close(rotated(b), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_rotation_shrinks_static_ranges_of_outlier_channel_inputs():
    """The LayerNorm outputs with two 20x channels feed qkv and fc1: after rotation, max calibration of those inputs
    gives scales at least 2x smaller; the quantized model with every quantizer off is still the float model."""
    model = TinyConvTransformer(outlier_channels=2).eval()
    data = make_data(8, 4)
    rotated = copy.deepcopy(model)
    Rotation().apply(rotated, data)
    q_plain, q_rot = quantize_model(model, W4, A6, head=["head"]), quantize_model(rotated, W4, A6, head=["head"])
    assert isinstance(q_rot.model.blocks[0].fc1, QuantRotatedLinear)
    assert q_rot.model.head.input_quantizer.role == "head"  # same paths, same roles
    max_calibrate(q_plain, data)
    max_calibrate(q_rot, data)
    plain, rot = q_plain.all_activation_quantizers, q_rot.all_activation_quantizers
    for name in [f"blocks.{i}.{n}.input_quantizer" for i in (0, 1) for n in ("qkv", "fc1")]:
        assert float(rot[name].scale) < 0.5 * float(plain[name].scale), name
    with torch.no_grad(), q_rot.quant_state(weights=False, activations=False):
        for b in data.batches:
            torch.testing.assert_close(q_rot(b), model(b), rtol=0, atol=1e-4 * float(model(b).abs().max()))


class WeightReader(nn.Module):
    """Reads its Linear's weight outside the Linear's forward (a tied use)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + x @ self.fc.weight


def test_rotation_refuses_a_model_whose_float_function_it_would_change():
    data = tensor_data(correlated(8, 4, 8, seed=1))
    with pytest.raises(QuantizationError, match="outside"):
        Rotation().apply(WeightReader().eval(), data)
    Rotation(exclude=["fc"]).apply(WeightReader().eval(), data)  # the way out the message names


def test_fast_hadamard_transform_is_the_dense_product():
    """``hadamard_transform`` (two Kronecker factors) against the dense Sylvester matrix, whose order 4 is written
    out; a randomised Hadamard rotation through its diagonal equals ``x @ R`` (the path RotatedLinear takes)."""
    assert torch.equal(hadamard(4), torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]).double())
    g = torch.Generator().manual_seed(0)
    for d in (1, 2, 8, 32, 128, 2048):
        x = torch.randn(3, 5, d, generator=g)
        torch.testing.assert_close(hadamard_transform(x), (x.double() @ hadamard(d)).float(), rtol=0, atol=1e-4 * d ** 0.5)
        r = random_rotation(d, "hadamard", g)
        torch.testing.assert_close(rotate(x, r, r[:, 0]), x @ r, rtol=0, atol=1e-5)
    for dim, expected in ((32, True), (24, False)):  # 24 is no power of two: the orthogonal fallback, dense
        model = TinyConvTransformer(dim=dim, ff=2 * dim).eval()
        Rotation().apply(model, make_data(8, 4))
        assert {m.hadamard_diagonal is not None for m in model.modules() if isinstance(m, RotatedLinear)} == {expected}


def test_random_rotation_is_seeded():
    a = random_rotation(16, "hadamard", torch.Generator().manual_seed(0))
    assert torch.equal(a, random_rotation(16, "hadamard", torch.Generator().manual_seed(0)))
    assert not torch.equal(a, random_rotation(16, "hadamard", torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", ["qdrop", "noisyquant", "rotation"])
def test_new_hydra_configs_instantiate(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 3, "ptq": OmegaConf.load(ROOT / "conf" / "ptq" / f"{name}.yaml")})
    method = instantiate(cfg.ptq)
    assert method.name == name
    assert method.stage == ("before" if name == "rotation" else "after")
    assert method.seed == 3
