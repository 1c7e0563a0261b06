"""``make reproduce``: check what the paper grid needs, then run it (``+experiment=paper``) and its report.

``python -m esc.reproduce [--jobs N] [--check-only] [--allow-offline] [--min-free-gb G] [--timeout S] [override ...]``

Checks, all before anything is downloaded or launched:

1. the Hugging Face hub is reachable: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` /
   ``HF_DATASETS_OFFLINE``) must not be set to a true value, and a HEAD request to the hub's
   endpoint (``$HF_ENDPOINT`` or ``https://huggingface.co``) must answer within ``--timeout``
   seconds (default 5); ``--allow-offline`` skips this check when everything is already cached;
2. the audio decoder the hub loaders use: ``soundfile`` (libsndfile) with FLAC and WAV support
   (:mod:`esc.data.hub` decodes audio itself, so neither torchcodec nor FFmpeg is needed);
3. free disk space in the Hugging Face cache (``$HF_HOME``, default ``~/.cache/huggingface``) of at
   least ``--min-free-gb`` (default :data:`MIN_FREE_GB`: about 5 GB of models, 4 GB of data sets and
   their Arrow caches).

If anything is missing it prints exactly what is needed and exits with status 2 (no stack
trace). Otherwise it runs ``python -m esc.run -m +experiment=paper hydra.launcher.n_jobs=N
[overrides]`` and then ``python -m esc.report --study paper``; its exit status is theirs.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

EXIT_MISSING = 2
MIN_FREE_GB = 15.0
HEAD_TIMEOUT_S = 5.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

#: What the paper grid downloads (model ids, then data set ids with their configs / splits).
HUB_MODELS = ("MIT/ast-finetuned-speech-commands-v2", "MIT/ast-finetuned-audioset-10-10-0.4593",
              "facebook/wav2vec2-base-960h", "facebook/wav2vec2-conformer-rope-large-960h-ft", "openai/whisper-base")
HUB_DATASETS = ("google/speech_commands (v0.02: test, train)", "openslr/librispeech_asr (clean, other: test, validation)",
                "ashraq/esc50 (train)")


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub URL that ``huggingface_hub`` uses (``$HF_ENDPOINT`` or https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_hub(timeout: float = HEAD_TIMEOUT_S) -> Optional[str]:
    """``None`` if the hub is reachable, else why not."""
    for var in OFFLINE_VARIABLES:
        if _truthy(os.environ.get(var)):
            return (f"{var}={os.environ[var]} is set, so nothing can be fetched from the Hugging Face hub "
                    f"(the Makefile sets HF_HUB_OFFLINE=1 for the offline targets; run `HF_HUB_OFFLINE=0 make reproduce`)")
    import urllib.error
    import urllib.request

    url = f"{hub_endpoint()}/api/models/{HUB_MODELS[0]}"
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:  # the server answered: reachable (auth/rate limits show up later)
        log.info("HEAD %s answered %s", url, e.code)
        return None
    except Exception as e:  # URLError, timeout, DNS failure, proxy refusal...
        return f"the Hugging Face hub did not answer a HEAD request to {url} within {timeout:g} s ({type(e).__name__}: {e})"


def check_decoder() -> Optional[str]:
    """``None`` if soundfile can decode WAV and FLAC, else what is missing."""
    try:
        import soundfile as sf
    except Exception as e:  # ImportError or OSError when libsndfile is missing
        return f"the soundfile package (libsndfile) does not import ({e}); install the pinned requirements (make setup)"
    formats = sf.available_formats()
    missing = [f for f in ("WAV", "FLAC") if f not in formats]
    if missing:
        return f"libsndfile lacks {', '.join(missing)} support (LibriSpeech is FLAC); install a libsndfile build with it"
    return None


def hf_cache_dir() -> Path:
    """The Hugging Face cache root (``$HF_HOME`` or ``~/.cache/huggingface``)."""
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def check_disk(min_free_gb: float = MIN_FREE_GB) -> Optional[str]:
    """``None`` if the cache's file system has ``min_free_gb`` free, else how much it has."""
    path = hf_cache_dir()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    if free_gb < min_free_gb:
        return (f"only {free_gb:.1f} GB free under {path} (the Hugging Face cache); the paper grid needs about "
                f"{min_free_gb:g} GB: free space or point HF_HOME at a larger disk")
    return None


def missing_requirements(timeout: float = HEAD_TIMEOUT_S, min_free_gb: float = MIN_FREE_GB,
                         allow_offline: bool = False) -> list[str]:
    """Every unmet requirement of the paper grid, as sentences (empty: ready).

    ``allow_offline`` skips the hub check (models and data sets already in the local cache).
    """
    problems = [None if allow_offline else check_hub(timeout), check_decoder(), check_disk(min_free_gb)]
    return [p for p in problems if p]


def message(problems: Sequence[str]) -> str:
    """The text printed when the grid cannot run."""
    lines = ["make reproduce: the paper grid cannot run here.", "", "Missing:"]
    lines += [f"  - {p}" for p in problems]
    lines += ["", "It needs internet access to the Hugging Face hub for", "  models:   " + ", ".join(HUB_MODELS),
              "  datasets: " + "; ".join(HUB_DATASETS),
              "(downloaded once into the Hugging Face cache; once they are cached, `python -m esc.reproduce",
              " --allow-offline` runs with HF_HUB_OFFLINE=1). Audio is decoded with soundfile: torchcodec/FFmpeg",
              " are not needed.",
              "Offline, `make demo` runs the offline grid instead."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check, then run the sweep and the report; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", 1)), help="parallel runs (hydra.launcher.n_jobs)")
    parser.add_argument("--check-only", action="store_true", help="only check the requirements")
    parser.add_argument("--min-free-gb", type=float, default=MIN_FREE_GB)
    parser.add_argument("--timeout", type=float, default=HEAD_TIMEOUT_S, help="seconds to wait for the hub")
    parser.add_argument("--allow-offline", action="store_true",
                        help="skip the hub check: every model and data set is already in the Hugging Face cache")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the sweep, e.g. +pair=kws_ast")
    args = parser.parse_args(argv)
    problems = missing_requirements(args.timeout, args.min_free_gb, args.allow_offline)
    if problems:
        print(message(problems), file=sys.stderr)
        return EXIT_MISSING
    if args.check_only:
        print("make reproduce: all requirements met")
        return 0
    sweep = [sys.executable, "-m", "esc.run", "-m", "+experiment=paper", f"hydra.launcher.n_jobs={args.jobs}", *args.overrides]
    print("running:", " ".join(sweep), flush=True)
    rc = subprocess.call(sweep)
    if rc != 0:
        print(f"the sweep exited with status {rc}; rows of finished runs are kept (rerun to resume)", file=sys.stderr)
        return rc
    report = [sys.executable, "-m", "esc.report", "--study", "paper"]
    print("running:", " ".join(report), flush=True)
    return subprocess.call(report)


if __name__ == "__main__":
    sys.exit(main())
