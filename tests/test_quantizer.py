"""Tests of the fake-quant core: UniformQuantizer, quantized modules, quantize_model, calibration entry points."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from esc.calibrators import (CalibrationData, EntropyCalibrator, MinMaxCalibrator, MSECalibrator,
                             PercentileCalibrator, mse_clip)
from esc.calibrators.minmax import MinMaxObserver
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import QuantizationError, UniformQuantizer, integer_range

torch.set_num_threads(1)

CONFIGS = [(bits, sym, signed) for bits in (2, 4, 8) for sym in (True, False) for signed in (True, False)]


def calibrated(bits, symmetric, signed, lo=-3.0, hi=5.0, granularity="tensor", name="q"):
    q = UniformQuantizer(bits, symmetric, signed, granularity, 0, name)
    if symmetric:
        # unsigned symmetric grids only represent [0, c]
        q.set_clip_range(torch.tensor(max(abs(lo), abs(hi))))
    else:
        q.set_clip_range(torch.tensor(lo), torch.tensor(hi))
    return q


def heavy_tensors(n: int = 20000):
    g = torch.Generator().manual_seed(0)
    yield "gauss", torch.randn(n, generator=g)
    yield "laplace", torch.distributions.Laplace(0.0, 1.0).sample((n,))
    yield "student1.5", torch.distributions.StudentT(1.5).sample((n,)).clamp(-1e4, 1e4)
    x = torch.randn(n, generator=g)
    x[:5] = 300.0
    yield "outliers", x


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("bits,symmetric,signed", CONFIGS)
def test_grid_values_round_trip_exactly(bits, symmetric, signed):
    q = calibrated(bits, symmetric, signed)
    levels = torch.arange(q.qmin, q.qmax + 1, dtype=torch.float32)
    grid = (levels - q.zero_point) * q.scale  # every representable value
    assert torch.equal(q(grid), grid)
    assert q.qmax - q.qmin + 1 == (2**bits - 1 if (symmetric and signed) else 2**bits)


@pytest.mark.parametrize("bits,symmetric,signed", CONFIGS)
def test_error_bounded_by_half_step_inside_range(bits, symmetric, signed):
    q = calibrated(bits, symmetric, signed)
    lo, hi = (float(v) for v in q.clip_range)
    x = lo + (hi - lo) * torch.rand(5000, generator=torch.Generator().manual_seed(bits))
    err = (q(x) - x).abs()
    assert float(err.max()) <= float(q.scale) / 2 * (1 + 1e-5)
    # outside the range the output saturates at the range ends
    out = q(torch.tensor([lo - 10.0, hi + 10.0]))
    torch.testing.assert_close(out, torch.tensor([lo, hi]))


def test_symmetric_signed_grid_is_narrow_and_zero_exact():
    assert integer_range(8, True, True) == (-127, 127)
    assert integer_range(8, True, False) == (-128, 127)
    assert integer_range(4, False, True) == (0, 15)
    q = calibrated(4, False, True, lo=-0.7, hi=3.1)  # asymmetric: 0 must stay exactly representable
    assert float(q(torch.zeros(1))) == 0.0
    assert float(q.zero_point) == round(float(q.zero_point))


def test_per_channel_equals_per_tensor_slices():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, 3, generator=g) * torch.arange(1, 6).view(-1, 1, 1)
    for axis in (0, 1):
        q = UniformQuantizer(4, True, True, "channel", axis, "w")
        amax = w.abs().amax(dim=tuple(d for d in range(3) if d != axis))
        q.set_clip_range(amax)
        out = q(w)
        for c in range(w.shape[axis]):
            qt = UniformQuantizer(4, True, True, "tensor", 0, "t")
            qt.set_clip_range(amax[c])
            assert torch.equal(out.select(axis, c), qt(w.select(axis, c)))
    qa = UniformQuantizer(4, False, True, "channel", 0, "wa")
    lo, hi = w.flatten(1).min(1).values, w.flatten(1).max(1).values
    qa.set_clip_range(lo, hi)
    for c in range(5):
        qt = UniformQuantizer(4, False, True, "tensor", 0, "t")
        qt.set_clip_range(lo[c], hi[c])
        assert torch.equal(qa(w)[c], qt(w[c]))


def test_ste_gradient_is_identity_inside_range_and_zero_outside():
    q = calibrated(4, True, True, lo=-2.0, hi=2.0)
    x = torch.tensor([-1.9, -0.33, 0.0, 0.21, 1.7, -5.0, 7.0], requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    # the scale receives a gradient too (LSQ-style), used by reconstruction PTQ methods
    s = q.scale.clone().requires_grad_(True)
    from esc.quant.quantizer import fake_quantize
    fake_quantize(x.detach(), s, torch.zeros(()), q.qmin, q.qmax).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad)


def test_population_scales_equal_slice_by_slice():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=g) * 2
    scales = torch.tensor([0.05, 0.3, 1.1, 0.01])
    q = UniformQuantizer(4, name="pop")
    q.set_scale(scales)
    assert q.population_size == 4
    out = q(x.repeat(4, 1, 1))
    for p, s in enumerate(scales):
        qs = UniformQuantizer(4, name="one")
        qs.set_scale(s)
        assert torch.equal(out[3 * p:3 * (p + 1)], qs(x))
    with pytest.raises(QuantizationError, match="pop"):
        q(torch.randn(5, 2))  # batch not a multiple of the population


def test_population_through_quantized_model(tiny_audio_model, tiny_audio_batches):
    qm = quantize_model(tiny_audio_model)
    MinMaxCalibrator().calibrate(qm, CalibrationData(tiny_audio_batches, lambda m, b: m(b)))
    base = qm.activation_scales()
    pop = torch.stack([base, base * 0.5, base * 2.0])
    x = tiny_audio_batches[0]
    with torch.no_grad():
        qm.set_activation_scales(pop)
        out = qm(x.repeat(3, 1, 1))
        for p in range(3):
            qm.set_activation_scales(pop[p])
            torch.testing.assert_close(out[p * 4:(p + 1) * 4], qm(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bits", [1, 17, 0, 4.0])
def test_bad_bits(bits):
    with pytest.raises(QuantizationError, match="bits"):
        UniformQuantizer(bits, name="b")


def test_bad_granularity_names_quantizer():
    with pytest.raises(QuantizationError, match=r"'layer3.input_quantizer'.*granularity"):
        UniformQuantizer(8, granularity="row", name="layer3.input_quantizer")


def test_uncalibrated_and_bad_scales_name_quantizer():
    q = UniformQuantizer(8, name="enc.fc.input_quantizer")
    with pytest.raises(QuantizationError, match="enc.fc.input_quantizer"):
        q(torch.ones(2))
    with pytest.raises(QuantizationError, match="enc.fc.input_quantizer"):
        q.set_scale(torch.tensor(float("nan")))
    with pytest.raises(QuantizationError, match="enc.fc.input_quantizer"):
        q.set_scale(torch.tensor(-1.0))


@pytest.mark.parametrize("cal", [MinMaxCalibrator(), PercentileCalibrator(), EntropyCalibrator(num_bins=256, start_bin=32),
                                 MSECalibrator(max_samples=1024)], ids=lambda c: c.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_activations_raise_naming_quantizer(tiny_audio_model, tiny_audio_batches, cal, bad):
    batches = [b.clone() for b in tiny_audio_batches]
    batches[1][0, 3, 5] = bad
    qm = quantize_model(tiny_audio_model)
    with pytest.raises(QuantizationError, match=r"conv1\.input_quantizer.*NaN/Inf"):
        cal.calibrate(qm, CalibrationData(batches, lambda m, b: m(b)))
    assert all(q.observer is None for q in qm.activation_quantizers.values())  # observers removed


def test_empty_calibration_set_raises():
    with pytest.raises(QuantizationError, match="empty"):
        CalibrationData([], lambda m, b: m(b))
    with pytest.raises(QuantizationError, match="empty"):
        CalibrationData(iter(()), lambda m, b: m(b))


def test_quantizer_off_the_forward_path_raises(tiny_audio_model, tiny_audio_batches):
    tiny_audio_model.unused = nn.Linear(3, 3)
    qm = quantize_model(tiny_audio_model)
    with pytest.raises(QuantizationError, match="unused.input_quantizer"):
        MinMaxCalibrator().calibrate(qm, CalibrationData(tiny_audio_batches, lambda m, b: m(b)))


# ----------------------------------------------------------------------------- properties
def _mse(q, x):
    return float(((q(x) - x).double() ** 2).mean())


@pytest.mark.parametrize("method", ["max", "mse"])
def test_more_bits_never_increase_mse(method):
    for name, x in heavy_tensors():
        errs = []
        for bits in range(2, 9):
            q = UniformQuantizer(bits, name=f"{name}-{bits}")
            q.set_clip_range(x.abs().max() if method == "max" else mse_clip(x, q, num_coarse=40, num_fine=20))
            errs.append(_mse(q, x))
        assert all(b <= a for a, b in zip(errs, errs[1:])), (name, method, errs)


def test_level_utilisation_max_vs_mse_on_heavy_tail_4bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50000, generator=g)
    x[:2] = torch.tensor([100.0, -100.0])  # two outliers at 100 sigma
    util = {}
    for method in ("max", "mse"):
        q = UniformQuantizer(4, name=method)
        q.set_clip_range(x.abs().max() if method == "max" else mse_clip(x, q))
        q.track_levels(True)
        q(x)
        util[method] = q.level_utilisation
    assert util["max"] <= 4 / 15   # bulk falls into the levels around zero, plus the two extremes
    assert util["mse"] >= 12 / 15
    assert util["mse"] > 2 * util["max"]


def test_minmax_observer_per_channel_and_asymmetric():
    q = UniformQuantizer(8, True, True, "channel", 1, "pc")
    obs = MinMaxObserver(q)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 5, generator=g) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1) for _ in range(3)]
    for b in batches:
        obs(b)
    allx = torch.cat(batches)
    torch.testing.assert_close(obs.clip_range(), allx.abs().amax(dim=(0, 2)))
    qa = UniformQuantizer(8, False, True, "tensor", 0, "asym")
    obs = MinMaxObserver(qa)
    for b in batches:
        obs(b)
    lo, hi = obs.clip_range()
    assert float(lo) == float(allx.min()) and float(hi) == float(allx.max())


# ----------------------------------------------------------------------------- model level
def test_w8a8_tiny_audio_model_close_to_fp(tiny_audio_model, tiny_audio_batches):
    """W8A8 (per-channel weights, per-tensor activations) stays within 5% relative L2 of FP32."""
    data = CalibrationData(tiny_audio_batches, lambda m, b: m(b))
    with torch.no_grad():
        ref = torch.cat([tiny_audio_model(b) for b in tiny_audio_batches])
    for cal in (MinMaxCalibrator(), PercentileCalibrator(99.99), MSECalibrator(max_samples=8192)):
        qm = quantize_model(tiny_audio_model, weight=QuantSpec(8, True, "channel"), activation=QuantSpec(8, True, "tensor"))
        assert len(qm.activation_quantizers) == 14 and len(qm.weight_quantizers) == 7
        cal.calibrate(qm, data)
        with torch.no_grad():
            out = torch.cat([qm(b) for b in tiny_audio_batches])
        rel = float((out - ref).norm() / ref.norm())
        assert 0.0 < rel < 0.05, (cal.name, rel)
        # and W4A4 with max calibration is clearly worse than W8A8 (the check is able to fail)
    qm4 = quantize_model(tiny_audio_model, weight=QuantSpec(4, True, "channel"), activation=QuantSpec(4, True, "tensor"))
    MinMaxCalibrator().calibrate(qm4, data)
    with torch.no_grad():
        out4 = torch.cat([qm4(b) for b in tiny_audio_batches])
    assert float((out4 - ref).norm() / ref.norm()) > rel


def test_quant_state_switches_and_float_model_untouched(tiny_audio_model, tiny_audio_batches):
    x = tiny_audio_batches[0]
    with torch.no_grad():
        ref = tiny_audio_model(x)
    qm = quantize_model(tiny_audio_model, weight=QuantSpec(4, True, "channel"), activation=QuantSpec(4))
    MinMaxCalibrator().calibrate(qm, CalibrationData(tiny_audio_batches, lambda m, b: m(b)))
    with torch.no_grad():
        qm.set_quant_state(weights=False, activations=False)
        torch.testing.assert_close(qm(x), ref)  # everything off: the float network
        qm.set_quant_state(weights=True, activations=True)
        assert not torch.allclose(qm(x), ref, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(tiny_audio_model(x), ref)  # quantize_model deep-copied


def test_weight_cache_follows_scale_changes(tiny_audio_model, tiny_audio_batches):
    qm = quantize_model(tiny_audio_model, weight=QuantSpec(4, True, "channel"), activation=None)
    conv = qm.model.conv1
    x = tiny_audio_batches[0]
    with torch.no_grad():
        amax = conv.weight.abs().flatten(1).amax(1)
        for frac in (1.0, 0.5, 0.3, 0.7):
            conv.weight_quantizer.set_clip_range(amax * frac)
            conv.weight_quantizer.set_clip_range(amax * frac * 0.9)  # no forward in between
            expected = conv._conv_forward(x, conv.weight_quantizer(conv.weight), conv.bias)
            assert torch.equal(conv(x), expected)
        conv.weight.mul_(0.5)  # in-place weight edit (PTQ) invalidates the cache too
        assert torch.equal(conv(x), conv._conv_forward(x, conv.weight_quantizer(conv.weight), conv.bias))


def test_summary_and_level_utilisation(tiny_audio_model, tiny_audio_batches):
    qm = quantize_model(tiny_audio_model, activation=QuantSpec(4))
    MinMaxCalibrator().calibrate(qm, CalibrationData(tiny_audio_batches, lambda m, b: m(b)))
    qm.measure_level_utilisation(tiny_audio_batches, lambda m, b: m(b))
    rows = qm.summary()
    assert len(rows) == 14 + 7
    for r in rows:
        assert 0.0 < r["level_utilisation"] <= 1.0, r
        assert r["clip_lo"] <= 0.0 <= r["clip_hi"]


@pytest.mark.parametrize("bits,symmetric,signed", CONFIGS)
def test_autograd_path_equals_no_grad_path(bits, symmetric, signed):
    """fake_quantize's STE (autograd) path and in-place no-grad path give identical, on-grid values."""
    q = calibrated(bits, symmetric, signed)
    x = torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        ref = q(x)
    xg = x.clone().requires_grad_(True)
    out = q(xg)
    assert torch.equal(out.detach(), ref)
    k = torch.round(ref / q.scale + q.zero_point)  # the integer level of each output
    assert torch.equal((k - q.zero_point) * q.scale, ref)  # outputs are exactly grid values
