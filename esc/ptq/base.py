"""What a PTQ method is: a step that runs before quantizer insertion or after calibration."""
from __future__ import annotations

from torch import nn

from esc.calibrators.base import CalibrationData


class PTQMethod:
    """Base class of PTQ methods that compose with any calibrator.

    Attributes:
        name: method name used in result rows.
        stage: ``"before"``: ``apply`` receives the float model before quantizers are inserted
            (e.g. SmoothQuant); ``"after"``: it receives the calibrated ``QuantizedModel``
            (bias correction, AdaRound, BRECQ).
    """

    name = "none"
    stage = "after"

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Modify ``model`` in place using the calibration data."""


class NoPTQ(PTQMethod):
    """Calibration only: no PTQ method on top."""
