"""Model checkpoints: the training recipe they record, and a load that checks what a builder needs.

Saving and loading go through :mod:`esc.core.files` (atomic ``torch.save``; ``weights_only`` loads).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from esc.core.files import load_plain

MAKE_TARGET = "make models"


def recipe_provenance(args: argparse.Namespace, data_cfg) -> dict:
    """What every trained checkpoint records of how it was made: the labels, the data seed and
    config (a dataclass with ``words``), the recipe (all command-line options but ``argv``) and the torch version."""
    return {"labels": list(data_cfg.words), "data_seed": args.data_seed, "data_config": dataclasses.asdict(data_cfg),
            "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "argv"},
            "torch_version": str(torch.__version__)}


def load_checkpoint(path: str | Path, what: str, required: Sequence[str], trainer: str, alternative: str) -> dict:
    """Read a checkpoint holding the ``required`` keys with :func:`load_plain`; missing, unsafe or
    malformed files name ``make models``.

    Args:
        what: what the checkpoint is, for messages ("KWS AST checkpoint").
        trainer: the module that trains it (``esc.models.train_kws``).
        alternative: a config to use instead for a random-weight test model (``model=ast_tiny``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found; train it with `{MAKE_TARGET}` (python -m {trainer}), "
                                f"or use {alternative} for a random-weight test model")
    ckpt = load_plain(path, f"delete it and retrain it with `{MAKE_TARGET}` (python -m {trainer})")
    for key in required:
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise ValueError(f"{path} is not a {what} (no {key!r}); retrain it with `{MAKE_TARGET}`")
    return ckpt
