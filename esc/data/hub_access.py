"""Failed Hugging Face hub downloads (offline, not cached) as a :class:`HubUnavailableError` that says what is needed."""
from __future__ import annotations

import contextlib
import os

from esc.core.errors import UserError


class HubUnavailableError(UserError):
    """A hub model or data set could not be loaded (offline, or not in the local cache)."""


LOCAL_HINT = "give a local save_pretrained directory as name_or_path"


@contextlib.contextmanager
def hub_access(kind: str, name_or_path: str, alternative: str = LOCAL_HINT):
    """Turn a failed hub download (offline, no network, not cached) into a :class:`HubUnavailableError` saying what is needed.

    Only ``OSError`` (what transformers, huggingface_hub and datasets raise for unreachable or
    uncached files, ``ConnectionError`` included) is translated, and only for a name that is not
    an existing local path.
    """
    try:
        yield
    except OSError as e:
        if os.path.exists(name_or_path):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        raise HubUnavailableError(
            f"could not load the {kind} {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"It needs internet access to the Hugging Face hub once (then it is cached under $HF_HOME)"
            f"{'; HF_HUB_OFFLINE=1 is set, so only the cache is read' if offline else ''}. "
            f"Otherwise {alternative}.") from e

