"""PTQ methods (bias correction, AdaRound, BRECQ, SmoothQuant): defining properties and composition."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esc.calibrators.weights import calibrate_weights
from esc.calibrators.base import CalibrationData
from esc.ptq.adaround import AdaRound, IOCache, SoftRounding
from esc.ptq.base import NoPTQ
from esc.ptq.bias_correction import BiasCorrection
from esc.ptq.brecq import BRECQ
from esc.ptq.common import float_layer_forward, quantized_layers
from esc.ptq.smoothquant import SmoothQuant
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import QuantizationError
from ptq_models import OneBlock, TinyConvTransformer, correlated, make_data, max_calibrate, model_forward, tensor_data, tiny_yamnet

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
W4 = QuantSpec(4, True, "channel")
A8 = QuantSpec(8, True, "tensor")


def on_grid(layer: nn.Module) -> bool:
    """Whether every weight is ``s * k`` with an integer ``k`` in the quantizer's range, reproduced exactly."""
    wq = layer.weight_quantizer
    s, z = wq._broadcast(layer.weight)
    k = layer.weight / s + z
    return bool(torch.allclose(k, k.round(), atol=1e-4) and k.min() >= wq.qmin - 1e-4 and k.max() <= wq.qmax + 1e-4
                and torch.equal(wq(layer.weight), layer.weight))


def float_biases(layers):
    """Each layer's current bias (zeros where it has none): the float reference after a correction."""
    return {n: (m.bias.detach().clone() if m.bias is not None else torch.zeros(m.weight.shape[0])) for n, m in layers.items()}


def run_hooked(qmodel, data, hooks):
    """One pass over the calibration batches with forward hooks ``{module: hook}`` attached, then removed."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        with torch.no_grad():
            for b in data.batches:
                data.forward(qmodel, b)
    finally:
        for h in handles:
            h.remove()


def layer_mean_errors(qmodel, data, layers, biases):
    """Per layer, ``mean over batch/positions of [layer(x) - float layer(x)]`` per channel on its actual input,
    the float layer using the float weight and the given (original) bias."""
    sums, counts, hooks = {}, {}, {}
    for name, layer in layers.items():
        dim = -1 if isinstance(layer, nn.Linear) else 1

        def hook(mod, args, out, name=name, dim=dim):
            shape = (-1,) if dim == -1 else (-1,) + (1,) * (out.dim() - 2)
            fp = float_layer_forward(mod, args[0]) - (0 if mod.bias is None else mod.bias.view(shape))
            err = (out - fp - biases[name].view(shape)).movedim(dim, -1)
            err = err.reshape(-1, err.shape[-1]).double()
            sums[name] = sums.get(name, 0) + err.sum(0)
            counts[name] = counts.get(name, 0) + err.shape[0]
        hooks[layer] = hook
    run_hooked(qmodel, data, hooks)
    return {n: sums[n] / counts[n] for n in sums}


# --------------------------------------------------------------------------------- bias correction
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_correction_zeroes_mean_output_error(kind):
    if kind == "linear":
        model = nn.Sequential(nn.Linear(24, 12))
        x = correlated(48, 10, 24, seed=1, mean=2.0)
    else:
        model = nn.Sequential(nn.Conv1d(24, 12, 3, padding=1, bias=False))  # no bias: one gets added
        x = correlated(48, 10, 24, seed=1, mean=2.0).transpose(1, 2)
    data = tensor_data(x, batch=16)
    qmodel = quantize_model(model.eval(), QuantSpec(3, True, "channel"), A8)
    max_calibrate(qmodel, data)
    layers = quantized_layers(qmodel)
    biases = float_biases(layers)
    before = layer_mean_errors(qmodel, data, layers, biases)["model.0"]
    BiasCorrection().apply(qmodel, data)
    after = layer_mean_errors(qmodel, data, layers, biases)["model.0"]
    assert before.abs().max() > 1e-2  # a real shift to remove
    assert after.abs().max() < 1e-5 * max(1.0, float(before.abs().max()))
    assert qmodel.model[0].bias is not None


def test_bias_correction_weight_mode_is_the_classical_formula():
    """error='weight': bias shift is exactly (W_q - W) E[x] for a Linear."""
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    x = correlated(32, 6, 16, seed=2, mean=1.5)
    data = tensor_data(x, batch=16)
    qmodel = quantize_model(model, QuantSpec(3, True, "channel"), A8)
    max_calibrate(qmodel, data)
    layer = qmodel.model[0]
    b0 = layer.bias.detach().clone()
    expected = (layer.quantized_weight() - layer.weight).detach() @ x.reshape(-1, 16).double().mean(0).float()
    BiasCorrection(error="weight").apply(qmodel, data)
    torch.testing.assert_close(b0 - layer.bias.detach(), expected, rtol=1e-4, atol=1e-5)


def test_bias_correction_forward_order_every_layer_centred():
    """Processed in forward order: after the pass every layer's own mean error on its final inputs is ~0."""
    model = TinyConvTransformer().eval()
    data = make_data(16, 8, mean=1.0)
    qmodel = quantize_model(model, W4, A8)
    max_calibrate(qmodel, data)
    layers = quantized_layers(qmodel)
    biases = float_biases(layers)
    before = layer_mean_errors(qmodel, data, layers, biases)
    BiasCorrection().apply(qmodel, data)
    after = layer_mean_errors(qmodel, data, layers, biases)
    assert set(after) == set(layers)
    for name in layers:
        assert after[name].abs().max() < 1e-4 * max(1.0, float(before[name].abs().max())), name


def yamnet_setup(weight: QuantSpec = W4):
    """The tiny YAMNet (Conv2d, depthwise, pointwise, Linear head), its calibration patches, and a max-calibrated copy."""
    model = tiny_yamnet()
    data = make_data(16, 8, n_mels=24, frames=16, mean=1.0)  # [B, 24 frames, 16 mels]
    qmodel = quantize_model(model, weight, A8)
    max_calibrate(qmodel, data)
    return model, data, qmodel


def written_out(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A Linear/Conv layer's float computation with ``torch.nn.functional`` (stride, padding, dilation, groups)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def channel_mean_shifts(qmodel, data, layers, weights, biases):
    """Per layer and output channel, the mean over batch and positions of ``layer(x) - written_out(x)`` with the
    float ``weights``/``biases``, ``x`` the layer's actual input in ``qmodel``."""
    sums, hooks = {}, {}
    for name, layer in layers.items():
        def hook(mod, args, out, name=name):
            err = (out - written_out(mod, args[0], weights[name], biases[name])).movedim(1 if out.dim() > 2 else -1, -1)
            sums.setdefault(name, []).append(err.reshape(-1, err.shape[-1]).double())
        hooks[layer] = hook
    run_hooked(qmodel, data, hooks)
    return {n: torch.cat(v).mean(0) for n, v in sums.items()}


def test_bias_correction_on_conv2d_and_depthwise():
    """YAMNet's layers: after the correction each layer's per-channel mean output shift (against its float
    computation written out with F.conv2d, groups included) is gone; the depthwise shifts were real."""
    _, data, qmodel = yamnet_setup()
    layers = quantized_layers(qmodel)
    assert [layers[n].groups for n in ("model.features.layer2.depthwise", "model.features.layer3.depthwise")] == [8, 16]
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    biases = {n: m.bias.detach().clone() for n, m in layers.items()}
    before = channel_mean_shifts(qmodel, data, layers, weights, biases)
    BiasCorrection().apply(qmodel, data)
    after = channel_mean_shifts(qmodel, data, layers, weights, biases)
    for name in layers:
        assert before[name].abs().max() > 1e-3, name
        assert after[name].abs().max() < 1e-4 * float(before[name].abs().max()), name
    for name, layer in layers.items():  # the correction went into the bias, per channel, nowhere else
        assert torch.equal(layer.weight.detach(), weights[name])
        assert not torch.equal(layer.bias.detach(), biases[name])


def test_bias_correction_weight_mode_on_depthwise_is_the_classical_formula():
    """error='weight' on a depthwise conv: ``delta_c = sum_k (W_q - W)[c, k] * mean of the input patch value at
    tap k of channel c``, with the patches taken by ``unfold`` (no convolution in the reference)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(24, 6, 8, 7) + torch.linspace(-2.0, 3.0, 6).view(1, 6, 1, 1)
    qmodel = quantize_model(nn.Sequential(conv).eval(), QuantSpec(3, True, "channel"), A8)
    data = tensor_data(x, batch=8)
    max_calibrate(qmodel, data)
    layer = qmodel.model[0]
    dw = (layer.quantized_weight() - layer.weight).detach().reshape(6, 9)
    patches = F.unfold(x, 3, padding=1).reshape(24, 6, 9, -1)  # [B, C, taps, positions]
    expected = (dw * patches.double().mean((0, 3)).float()).sum(1)
    b0 = layer.bias.detach().clone()
    BiasCorrection(error="weight").apply(qmodel, data)
    torch.testing.assert_close(b0 - layer.bias.detach(), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- AdaRound
def test_soft_rounding_starts_at_the_float_weight():
    layer = nn.Linear(16, 8)
    q = quantize_model(nn.Sequential(layer), W4, None).model[0]
    soft = SoftRounding(q.weight_quantizer, q.weight)
    torch.testing.assert_close(soft(q.weight), q.weight.detach(), rtol=0, atol=1e-6)  # h(V) = frac(W/s)
    soft.hard = True
    assert torch.equal(q.weight_quantizer(soft(q.weight)), soft(q.weight))


def test_adaround_beats_nearest_rounding_and_lands_on_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    x, x_test = correlated(128, 8, 32, seed=3).split(64)  # same distribution, disjoint samples
    data = tensor_data(x, batch=16)

    def error(qm, inp):
        with torch.no_grad():
            return float((qm(inp) - model(inp)).pow(2).mean())

    qmodel = quantize_model(model, W4, None)
    nearest_w = qmodel.model[0].quantized_weight().detach().clone()
    rtn, rtn_test = error(qmodel, x), error(qmodel, x_test)
    method = AdaRound(iterations=300, batch_size=16)
    method.apply(qmodel, data)
    layer = qmodel.model[0]
    assert on_grid(layer)
    assert not torch.equal(layer.weight.detach(), nearest_w)  # some rounding decisions flipped
    assert error(qmodel, x) < 0.9 * rtn
    assert error(qmodel, x_test) < rtn_test  # not just fitted to the calibration rows
    assert method.stats["model.0"]["learned"] < method.stats["model.0"]["nearest"]


@pytest.mark.parametrize("keep_better", [True, False])
def test_adaround_keeps_nearest_rounding_when_learning_makes_it_worse(keep_better):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    data = tensor_data(correlated(64, 8, 32, seed=3), batch=16)
    qmodel = quantize_model(model, W4, None)
    nearest_w = qmodel.model[0].quantized_weight().detach().clone()
    method = AdaRound(iterations=5, lr=20.0, reg_weight=0.0, batch_size=4, keep_better=keep_better)  # a wild step size
    method.apply(qmodel, data)
    stats = method.stats["model.0"]
    assert stats["learned"] > stats["nearest"] and stats["kept_nearest"] is keep_better
    assert on_grid(qmodel.model[0])
    assert torch.equal(qmodel.model[0].weight.detach(), nearest_w) is keep_better  # kept: round-to-nearest baked in


def test_adaround_with_quantized_inputs_and_conv():
    model = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 8, 3, padding=1)).eval()
    data = tensor_data(correlated(32, 20, 8, seed=5).transpose(1, 2), batch=8)
    qmodel = quantize_model(model, W4, A8)
    max_calibrate(qmodel, data)
    with torch.no_grad():
        ref = [model(b) for b in data.batches]
        rtn = sum(float((qmodel(b) - r).pow(2).mean()) for b, r in zip(data.batches, ref))
    AdaRound(iterations=150, batch_size=8).apply(qmodel, data)
    with torch.no_grad():
        ada = sum(float((qmodel(b) - r).pow(2).mean()) for b, r in zip(data.batches, ref))
    assert ada < rtn
    assert on_grid(qmodel.model[0]) and on_grid(qmodel.model[2])


def output_errors(qmodel, float_model, data, names):
    """Per module name (a path inside ``float_model``): mean squared difference between its output in ``qmodel``
    (its quantized-model input) and in ``float_model`` (float input), over the calibration data."""
    def outputs(model, prefix):
        outs, handles = {n: [] for n in names}, []
        for n in names:
            handles.append(model.get_submodule(prefix + n).register_forward_hook(lambda m, a, o, n=n: outs[n].append(o)))
        with torch.no_grad():
            for b in data.batches:
                data.forward(model, b)
        for h in handles:
            h.remove()
        return {n: torch.cat(v) for n, v in outs.items()}
    q, fp = outputs(qmodel, "model."), outputs(float_model, "")
    return {n: float((q[n] - fp[n]).pow(2).mean()) for n in names}


YAMNET_CONVS = ["features.layer1.conv", "features.layer2.depthwise", "features.layer2.pointwise",
                "features.layer3.depthwise", "features.layer3.pointwise"]


def test_adaround_on_conv2d_and_depthwise_beats_nearest_per_layer():
    """Every Conv2d (the depthwise ones included) reconstructs its float output better than round-to-nearest,
    measured here with hooks on the quantized and the float model, and its weights land on the grid."""
    model, data, qmodel = yamnet_setup()
    nearest = output_errors(qmodel, model, data, YAMNET_CONVS + ["classifier"])
    AdaRound(iterations=1000, batch_size=8, keep_better=False).apply(qmodel, data)  # 200 steps flip no weight of layer1
    learned = output_errors(qmodel, model, data, YAMNET_CONVS + ["classifier"])
    for name in YAMNET_CONVS:
        assert learned[name] < nearest[name], (name, learned[name], nearest[name])
        assert on_grid(qmodel.model.get_submodule(name)), name
    assert learned["classifier"] < nearest["classifier"]


def test_brecq_on_yamnet_layers_lowers_block_output_error():
    """BRECQ's blocks on YAMNet's structure are the conv layer and each depthwise-separable layer (the depthwise and
    pointwise convs learned jointly); every block's output gets closer to the float block's."""
    model, data, qmodel = yamnet_setup()
    blocks = ["features.layer1", "features.layer2", "features.layer3"]
    units = BRECQ().units(qmodel, data)
    assert [u.name for u in units] == [f"model.{b}" for b in blocks] + ["model.classifier"]
    assert [len(u.layers) for u in units] == [1, 2, 2, 1]
    nearest = output_errors(qmodel, model, data, blocks)
    BRECQ(iterations=1000, batch_size=8, keep_better=False).apply(qmodel, data)
    learned = output_errors(qmodel, model, data, blocks)
    for name in blocks:
        assert learned[name] < nearest[name], (name, learned[name], nearest[name])
    assert all(on_grid(layer) for layer in quantized_layers(qmodel).values())


def test_smoothquant_leaves_a_model_without_layernorm_unchanged():
    """YAMNet has no LayerNorm -> Linear pair: SmoothQuant finds no group and touches no parameter."""
    model = tiny_yamnet()
    data = make_data(8, 8, n_mels=24, frames=16)
    smoothed = copy.deepcopy(model)
    method = SmoothQuant()
    method.apply(smoothed, data)
    assert method.groups == {}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), smoothed.state_dict().values()))


def test_io_cache_groups_shapes_and_constants():
    calls = [((torch.randn(4, 5, 3), torch.ones(5, 5)), {}), ((torch.randn(2, 5, 3), torch.ones(5, 5)), {}),
             ((torch.randn(4, 7, 3), torch.ones(7, 7)), {}), ((torch.randn(4, 5, 3), torch.zeros(5, 5)), {})]
    targets = [c[0][0].sum(-1) for c in calls]
    cache = IOCache(calls, targets)
    assert len(cache) == 14 and len(cache.groups) == 3  # (5, ones) x6, (7, ones) x4, (5, zeros) x4
    seen = 0
    for (x, mask), kwargs, y in cache.chunks(3):
        torch.testing.assert_close(x.sum(-1), y)
        assert mask.shape == (x.shape[1], x.shape[1])
        seen += x.shape[0]
    assert seen == 14
    args, _, y = cache.sample(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(args[0].sum(-1), y)


# ------------------------------------------------------------------------------------------- BRECQ
def test_brecq_lowers_block_output_error():
    model = OneBlock().eval()
    data = tensor_data(correlated(32, 12, 32, seed=6), batch=8)
    qmodel = quantize_model(model, W4, A8)
    max_calibrate(qmodel, data)
    units = BRECQ().units(qmodel, data)
    assert [u.name for u in units] == ["model.block"]
    assert [id(m) for m in units[0].layers] == [id(qmodel.model.block.qkv), id(qmodel.model.block.proj),
                                                 id(qmodel.model.block.fc1), id(qmodel.model.block.fc2)]

    def error():
        with torch.no_grad():
            return sum(float((qmodel(b) - model(b)).pow(2).mean()) for b in data.batches)

    rtn = error()
    method = BRECQ(iterations=200, batch_size=8)
    method.apply(qmodel, data)
    assert error() < 0.9 * rtn
    assert all(on_grid(layer) for layer in units[0].layers)
    assert method.stats["model.block"]["learned"] < method.stats["model.block"]["nearest"]


def test_brecq_unit_detection_on_conv_transformer_and_torch_encoder_layer():
    qmodel = quantize_model(TinyConvTransformer().eval(), W4, A8)
    data = make_data(8, 4)
    max_calibrate(qmodel, data)
    names = [u.name for u in BRECQ().units(qmodel, data)]
    assert names == ["model.conv1", "model.conv2", "model.blocks.0", "model.blocks.1", "model.head"]
    assert [u.name for u in BRECQ(blocks=["Nothing"]).units(qmodel, data)] == \
        [u.name for u in AdaRound().units(qmodel, data)]

    torch.manual_seed(0)
    enc = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).eval()
    data = tensor_data(correlated(16, 6, 16, seed=7), batch=8)
    qenc = quantize_model(enc, W4, None)
    with torch.no_grad():  # quantize_model keeps the fused eval fast path from bypassing the quantizers
        assert not torch.allclose(qenc(data.batches[0]), enc(data.batches[0]))
    units = BRECQ().units(qenc, data)
    assert [u.name for u in units] == ["model.0"] and len(units[0].layers) == 2
    with torch.no_grad():
        rtn = sum(float((qenc(b) - enc(b)).pow(2).mean()) for b in data.batches)
    BRECQ(iterations=100, batch_size=8).apply(qenc, data)
    with torch.no_grad():
        assert sum(float((qenc(b) - enc(b)).pow(2).mean()) for b in data.batches) < rtn


# -------------------------------------------------------------------------------------- SmoothQuant
def linear_input_max(model, data, names):
    """Max |input| of the named Linears over the calibration data."""
    out, handles = {}, []
    for n in names:
        def hook(mod, args, n=n):
            out[n] = max(out.get(n, 0.0), float(args[0].abs().max()))
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in data.batches:
            model(b)
    for h in handles:
        h.remove()
    return out


def test_smoothquant_keeps_fp32_function_and_shrinks_ranges():
    model = TinyConvTransformer(outlier_channels=2).eval()
    data = make_data(16, 8)
    smoothed = copy.deepcopy(model)
    method = SmoothQuant(alpha=0.5)
    method.apply(smoothed, data)
    expected = {f"blocks.{i}.norm{j}": [f"blocks.{i}.{'qkv' if j == 1 else 'fc1'}"] for i in range(2) for j in (1, 2)}
    assert method.groups == expected  # final norm feeds a mean-pool, not a Linear
    with torch.no_grad():
        for b in data.batches:
            ref = model(b)
            torch.testing.assert_close(smoothed(b), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    linears = [v[0] for v in expected.values()]
    before, after = linear_input_max(model, data, linears), linear_input_max(smoothed, data, linears)
    for n in linears:
        assert after[n] < 0.5 * before[n], n


def test_smoothquant_scale_formula():
    model = TinyConvTransformer(outlier_channels=2).eval()
    data = make_data(8, 8)
    norm, lin = model.blocks[0].norm2, model.blocks[0].fc1
    x_max = torch.zeros(32)
    h = norm.register_forward_hook(lambda m, a, o: x_max.copy_(torch.maximum(x_max, o.abs().amax((0, 1)))))
    with torch.no_grad():
        for b in data.batches:
            model(b)
    h.remove()
    alpha = 0.7
    s = x_max ** alpha / lin.weight.detach().abs().amax(0) ** (1 - alpha)
    gamma, w = norm.weight.detach().clone(), lin.weight.detach().clone()
    SmoothQuant(alpha=alpha).apply(model, data)
    torch.testing.assert_close(norm.weight.detach(), gamma / s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lin.weight.detach(), w * s, rtol=1e-5, atol=1e-7)


class HiddenConsumer(nn.Module):
    """LayerNorm output read by a Linear and by a residual add (invisible to module hooks)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.norm2 = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)
        with torch.no_grad():
            self.norm.weight[0] = 10.0
            self.norm2.weight[0] = 10.0

    def forward(self, x):
        h = self.norm(x)
        h = h + self.fc(h)
        return self.fc2(self.norm2(h))


def test_smoothquant_reverts_groups_with_hidden_consumers():
    model = HiddenConsumer().eval()
    data = tensor_data(correlated(16, 4, 8, seed=8), batch=8)
    smoothed = copy.deepcopy(model)
    method = SmoothQuant()
    method.apply(smoothed, data)
    assert method.groups == {"norm2": ["fc2"]}
    with torch.no_grad():
        for b in data.batches:
            torch.testing.assert_close(smoothed(b), model(b), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- composition
METHODS = {"none": lambda: NoPTQ(), "bias_correction": lambda: BiasCorrection(), "smoothquant": lambda: SmoothQuant(),
           "adaround": lambda: AdaRound(iterations=40, batch_size=8), "brecq": lambda: BRECQ(iterations=40, batch_size=8)}


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_compose_with_max_calibration_end_to_end(name):
    float_model = TinyConvTransformer(outlier_channels=2).eval()
    data = make_data(16, 8, mean=1.0)
    method = METHODS[name]()
    with torch.no_grad():
        ref = [float_model(b) for b in data.batches]
    fmodel = copy.deepcopy(float_model)
    if method.stage == "before":
        method.apply(fmodel, data)
    qmodel = quantize_model(fmodel, W4, A8)
    max_calibrate(qmodel, data)
    if method.stage == "after":
        method.apply(qmodel, data)
    with torch.no_grad():
        outs = [qmodel(b) for b in data.batches]
    assert all(o.shape == r.shape and torch.isfinite(o).all() for o, r in zip(outs, ref))
    assert all(q.is_calibrated for q in qmodel.activation_quantizers.values())
    if name in ("adaround", "brecq"):
        assert all(on_grid(layer) for layer in quantized_layers(qmodel).values())
    qmodel.measure_level_utilisation(data.batches, data.forward)  # the harness's post-PTQ step still works


def test_after_methods_reject_a_float_model_and_smoothquant_a_quantized_one():
    model = TinyConvTransformer().eval()
    data = make_data(4, 4)
    for method in (BiasCorrection(), AdaRound(iterations=1)):
        with pytest.raises(QuantizationError, match="QuantizedModel"):
            method.apply(model, data)
    with pytest.raises(QuantizationError, match="float model"):
        SmoothQuant().apply(quantize_model(model), data)


@pytest.mark.parametrize("name", ["none", "bias_correction", "adaround", "brecq", "smoothquant"])
def test_hydra_configs_instantiate(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 3, "ptq": OmegaConf.load(ROOT / "conf" / "ptq" / f"{name}.yaml")})
    method = instantiate(cfg.ptq)
    assert method.stage == ("before" if name == "smoothquant" else "after")
    assert method.name == name
    if name in ("adaround", "brecq"):
        assert method.seed == 3


@pytest.mark.parametrize("calibrator", ["percentile", "entropy", "mse"])
def test_after_methods_compose_with_other_calibrators(calibrator):
    """Each "after" method runs on top of any calibrator (and MSE-calibrated, clipped weights) and keeps its scales."""
    from esc.calibrators import EntropyCalibrator, MSECalibrator, PercentileCalibrator

    cal = {"percentile": lambda: PercentileCalibrator(num_bins=128), "entropy": lambda: EntropyCalibrator(num_bins=128, start_bin=16),
           "mse": MSECalibrator}[calibrator]()
    model = TinyConvTransformer().eval()
    data = make_data(8, 4, mean=1.0)
    qmodel = quantize_model(model, W4, QuantSpec(4))
    calibrate_weights(qmodel, "mse")
    cal.calibrate(qmodel, data)
    scales = qmodel.activation_scales().clone()
    for method in (BiasCorrection(), AdaRound(iterations=10, batch_size=4), BRECQ(iterations=10, batch_size=4)):
        method.apply(qmodel, data)
        torch.testing.assert_close(qmodel.activation_scales(), scales, rtol=0, atol=0)
        with torch.no_grad():
            assert all(torch.isfinite(qmodel(b)).all() for b in data.batches)
    assert all(on_grid(layer) for layer in quantized_layers(qmodel).values())


class KwargLayer(nn.Module):
    """A Hugging Face-style block: keyword mask argument, tuple output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, attention_mask=None, output_attentions=False):
        h = self.fc2(torch.relu(self.fc1(x))) * attention_mask.unsqueeze(-1)
        return (x + h, None)


class KwargModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = KwargLayer()

    def forward(self, batch):
        return self.layer(batch["x"], attention_mask=batch["mask"], output_attentions=False)[0]


def test_brecq_block_with_keyword_arguments_and_tuple_output():
    g = torch.Generator().manual_seed(9)
    batches = [{"x": torch.randn(8, 6, 16, generator=g), "mask": (torch.rand(8, 6, generator=g) > 0.3).float()} for _ in range(2)]
    data = CalibrationData(batches, model_forward)
    model = KwargModel().eval()
    qmodel = quantize_model(model, W4, A8)
    max_calibrate(qmodel, data)
    with torch.no_grad():
        rtn = sum(float((qmodel(b) - model(b)).pow(2).mean()) for b in batches)
    method = BRECQ(iterations=100, batch_size=8)
    method.apply(qmodel, data)
    assert list(method.stats) == ["model.layer"]
    with torch.no_grad():
        assert sum(float((qmodel(b) - model(b)).pow(2).mean()) for b in batches) < rtn
