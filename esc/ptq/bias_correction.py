"""Empirical bias correction (Nagel et al. 2019, "Data-free quantization", empirical variant)."""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import (StopForward, channel_dim, float_layer_forward, out_channels, quantized_layers, require_quantized,
                            run_batches, trace_calls)
from esc.quant.quantizer import QuantizationError

log = logging.getLogger(__name__)

ERRORS = ("layer", "weight")


class BiasCorrection(PTQMethod):
    """Subtract each quantized layer's mean output error from its bias.

    Stage ``after``. Touches: the ``bias`` of every quantized Linear/Conv1d/Conv2d (quantizers and
    weights unchanged). Layers without a bias get a zero bias first when ``add_missing_bias`` (the
    default: transformer projections often have none and the correction needs somewhere to go;
    this adds a ``bias`` parameter to the quantized copy only), else they are skipped.

    Definition, for each layer in forward order (each layer's statistics are gathered with every
    earlier layer already corrected): with ``x`` the layer's actual input in the quantized model
    (all quantizers as calibrated: quantized-model inputs, not FP-model inputs), and per output
    channel ``c``, ``delta_c = mean over batch and positions of [f_q(x) - f(x)]_c``, then
    ``bias_c -= delta_c``. ``f(x) = W x + b`` is the float layer. ``f_q`` depends on ``error``:

    * ``"layer"`` (default): the layer as the quantized model runs it, ``W_q Q_in(x) + b``, so the
      shift from clipping/rounding of the layer's own input is corrected too;
    * ``"weight"``: ``W_q x + b``, the classical weight-only shift ``E[(W_q - W) x]``.

    Errors from earlier layers are not corrected here (they are in ``x`` on both sides). One pass
    over the calibration set per layer.
    """

    name = "bias_correction"
    stage = "after"

    def __init__(self, error: str = "layer", add_missing_bias: bool = True) -> None:
        if error not in ERRORS:
            raise QuantizationError(f"BiasCorrection: unknown error={error!r}; use one of {ERRORS}")
        self.error = error
        self.add_missing_bias = add_missing_bias
        self.corrections: dict[str, float] = {}

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Correct every quantized layer's bias, in forward order."""
        qmodel = require_quantized(model, self.name)
        layers = quantized_layers(qmodel)
        self.corrections = {}
        order, calls, _ = trace_calls(qmodel, data, layers)
        for name in tqdm(order, desc=self.name, leave=False):
            layer = layers[name]
            if layer.bias is None:
                if not self.add_missing_bias:
                    log.info("%s: %s has no bias; skipped (add_missing_bias=False)", self.name, name)
                    continue
                layer.bias = nn.Parameter(torch.zeros(out_channels(layer), dtype=layer.weight.dtype,
                                                      device=layer.weight.device), requires_grad=layer.weight.requires_grad)
            delta = self.mean_error(qmodel, data, layer, stop=calls[name] == 1)
            with torch.no_grad():
                layer.bias.sub_(delta)
            self.corrections[name] = float(delta.abs().max())

    def mean_error(self, qmodel: nn.Module, data: CalibrationData, layer: nn.Module, stop: bool = False) -> torch.Tensor:
        """``delta_c`` of ``layer`` (see the class docstring) over the calibration set (``stop``: the layer runs
        once per forward, so each pass may end right after it)."""
        dim = channel_dim(layer)
        total = torch.zeros(out_channels(layer), dtype=torch.float64, device=layer.weight.device)
        count = [0]

        def hook(mod, args, output):
            x = args[0]
            reference = float_layer_forward(mod, x)
            if self.error == "layer":
                err = output - reference
            else:
                err = float_layer_forward(mod, x, mod.quantized_weight()) - reference
            err = err.movedim(dim, -1).reshape(-1, err.shape[dim])
            total.add_(err.sum(0, dtype=torch.float64))
            count[0] += err.shape[0]

        def hook_and_stop(mod, args, output):
            hook(mod, args, output)
            if stop:
                raise StopForward  # nothing after this layer matters for its statistics

        handle = layer.register_forward_hook(hook_and_stop)
        try:
            run_batches(qmodel, data)
        finally:
            handle.remove()
        if count[0] == 0:
            raise QuantizationError(f"{self.name}: layer {layer.weight_quantizer.name.rsplit('.', 1)[0]!r} saw no input "
                                    "on the calibration data")
        return (total / count[0]).to(layer.weight.dtype)
