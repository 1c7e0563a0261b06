"""Files written with ``torch.save`` (checkpoints, caches, search states): atomic save, and a load that never runs code.

Every ``torch.load`` in the package goes through :func:`load_plain` (``weights_only=True``): a file
may hold tensors and plain dicts, lists, strings and numbers only, so a checkpoint or cache from
someone else cannot execute code when a run opens it. A file that needs more, or a truncated or
corrupt one, is refused with a message that names it and how to rebuild it.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.torch_version import TorchVersion

from esc.core.errors import UserError

#: Classes allowed beyond torch's weights-only defaults: ``TorchVersion`` (a ``str`` subclass) is how
#: checkpoints trained before recipes stored ``str(torch.__version__)`` record the torch version.
SAFE_GLOBALS = (TorchVersion,)


class RefusedFileError(UserError):
    """A ``torch.save`` file refused by :func:`load_plain`: it holds more than tensors and plain values, or is damaged."""


def load_plain(path: str | Path, rebuild: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``rebuild`` says how to remake the file (for messages).

    Raises:
        RefusedFileError: the file needs other classes or functions (unpickling it could run code),
            or it is truncated or corrupt.
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing or unreadable: the caller's message (or the OS's) says more than "corrupt"
        raise
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise RefusedFileError(f"{path} is refused: it holds {unsafe.group(1)}, not only tensors and plain values, "
                                  f"and unpickling it could run code; {rebuild}") from None
        raise RefusedFileError(f"{path} is corrupt (not a torch.save file of tensors and plain values); {rebuild}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... on truncated or damaged files
        raise RefusedFileError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no data'}); "
                              f"{rebuild}") from None


def save_checkpoint(ckpt: dict, out: str | Path) -> Path:
    """``torch.save`` to a temporary file then rename, so a killed training never leaves half a checkpoint."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


def read_npz(path: str | Path, read: Callable[[Any], Any], rebuild: str) -> Any:
    """``read(np.load(path))`` for an ``.npz`` cache (no pickles); a truncated or corrupt file, or one
    missing an expected array, raises :class:`RefusedFileError` naming it and ``rebuild``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return read(z)
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, KeyError, ValueError on damaged caches
        raise RefusedFileError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no data'}); "
                               f"{rebuild}") from None
