"""Save and resume an interrupted ESC search: the local scales and every generation's population fitness."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from esc.core.files import load_plain, save_checkpoint

log = logging.getLogger(__name__)


class SearchState:
    """The search state of one ESC calibration in the file ``path`` (``None``: nothing is saved or read).

    ``settings`` are what a saved state must match to be resumed (the calibrator's options that
    change the search).
    """

    def __init__(self, path: Optional[Path], settings: dict) -> None:
        self.path, self.settings = path, settings

    def save(self, s_local: torch.Tensor, t_local: float, fitness_log: list[torch.Tensor]) -> None:
        """Write the search state to ``path`` (atomically): the local scales, the local step's
        seconds and the population fitness of every generation so far."""
        if self.path is None:
            return
        save_checkpoint({"s_local": s_local.detach().cpu(), "t_local": float(t_local), "fitness": list(fitness_log),
                         "settings": self.settings}, self.path)

    def load(self, n: int) -> Optional[dict]:
        """The saved search state of an interrupted run with these settings and ``n`` quantizers, or ``None``.

        Resuming replays the search: CMA-ES is deterministic under its seed, so asking again yields
        the same populations, and the saved fitness values answer them without a forward pass until
        the saved generations run out; from there the search continues live, and ends exactly as
        an uninterrupted run would. A state from other settings or another model is ignored.
        """
        if self.path is None or not self.path.is_file():
            return None
        state = load_plain(self.path, "delete it to restart the ESC search")
        if state.get("settings") != self.settings or len(state["s_local"]) != n:
            log.warning("ESC: ignoring %s (saved by a run with other settings)", self.path)
            return None
        return state

    def clear(self) -> None:
        """Delete the saved state (the finished calibration is cached by the caller)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
