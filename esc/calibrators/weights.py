"""Weight calibration methods by name: the clip range of every weight quantizer from its weight alone."""
from __future__ import annotations

from esc.calibrators.mse import mse_clip
from esc.core.errors import UserError
from esc.quant.model import QuantizedModel, weight_max_clip

#: ``calibration.weights`` -> ``clip(quantizer, weight)``: per-channel max, or the MSE-optimal clip
#: of :func:`esc.calibrators.mse.mse_clip` (same grid search as the MSE activation calibrator).
WEIGHT_CLIPS = {"minmax": weight_max_clip, "mse": lambda quantizer, weight: mse_clip(weight, quantizer)}


def calibrate_weights(qmodel: QuantizedModel, method: str = "minmax") -> None:
    """Set every weight quantizer of ``qmodel`` with the named method (``minmax`` or ``mse``)."""
    if method not in WEIGHT_CLIPS:
        raise UserError(f"unknown weight calibration {method!r}; use one of {sorted(WEIGHT_CLIPS)}")
    qmodel.calibrate_weights(WEIGHT_CLIPS[method])
