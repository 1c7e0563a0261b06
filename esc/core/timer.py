"""Wall-clock seconds per named stage of a run (result rows record them as ``stage_seconds``)."""
from __future__ import annotations

import contextlib
import time


class StageTimer:
    """Wall-clock seconds per named stage of a run (``with timer("calibrate"): ...``), summed per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
