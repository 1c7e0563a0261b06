"""Unsigned grids for non-negative activations (softmax probabilities, ReLU outputs)."""
from __future__ import annotations

import torch

from esc.calibrators.base import CalibrationData, use_unsigned_for_nonnegative
from esc.calibrators.minmax import MinMaxCalibrator
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import UniformQuantizer


def _error(q: UniformQuantizer, x: torch.Tensor) -> float:
    q.set_clip_range(x.abs().max())
    return float(((q(x) - x) ** 2).mean())


def test_unsigned_grid_halves_the_step_on_nonnegative_tensors():
    x = torch.softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    signed, unsigned = UniformQuantizer(4, name="s"), UniformQuantizer(4, name="u")
    unsigned.set_signed(False)
    assert (unsigned.qmin, unsigned.qmax) == (0, 15) and (signed.qmin, signed.qmax) == (-7, 7)
    assert _error(unsigned, x) < 0.5 * _error(signed, x)


def test_set_signed_clears_the_scale():
    q = UniformQuantizer(8, name="q")
    q.set_scale(0.1)
    q.set_signed(False)
    assert not q.is_calibrated and q.qmax == 255


def test_only_nonnegative_inputs_switch(tiny_audio_model, tiny_audio_batches):
    qmodel = quantize_model(tiny_audio_model, activation=QuantSpec(4))
    data = CalibrationData(tiny_audio_batches, forward=lambda m, b: m(b))
    switched = use_unsigned_for_nonnegative(qmodel, data)
    assert switched == ["av.a_quantizer"]  # the softmax operand of softmax @ V; everything else takes negatives
    quantizers = qmodel.activation_quantizers
    assert not quantizers["av.a_quantizer"].signed and quantizers["qk.a_quantizer"].signed
    MinMaxCalibrator().calibrate(qmodel, data)
    assert quantizers["av.a_quantizer"].clip_range[0] == 0
