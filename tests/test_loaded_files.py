"""Files a run opens never execute code: every ``torch.load`` is weights-only, and refusals name the file and the fix."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from esc.models import ast, whisper_kws
from esc.models.checkpoint import RefusedFileError, load_plain, recipe_provenance, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class WritesMarker:
    """Unpickling this object opens (so creates) ``marker``: the shape of a checkpoint that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _embeddings_cache(path: Path):
    """Read ``path`` as the Whisper-KWS trainer's embedding cache."""
    from esc.models.train_whisper_kws import _embeddings

    args = SimpleNamespace(size="base", encoder_frames=100, data_seed=0, embedding_cache=str(path))
    return _embeddings(args, None, None, None, {"train": np.arange(2), "test": np.arange(2)})


def _calibration_cache(path: Path):
    """Read ``path`` as esc.run's activation-calibration cache (it is read before anything else is used)."""
    from esc.run import calibrate_activations

    return calibrate_activations(None, None, None, None, path)


LOADERS = {
    "kws_ast": (ast.load_checkpoint, "make models"),
    "whisper_kws_head": (whisper_kws.load_head_checkpoint, "make models"),
    "calibration_cache": (_calibration_cache, "delete it and rerun"),
    "embedding_cache": (_embeddings_cache, "delete it and rerun"),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_pickle_that_runs_code_is_refused_and_never_runs(loader, tmp_path):
    load, fix = LOADERS[loader]
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "config": {}, "labels": [], "head": {}, "key": None, "payload": WritesMarker(marker)}, path)
    with pytest.raises(RefusedFileError, match=rf"{re.escape(str(path))} is refused: it holds io\.open.*could run code; .*{fix}"):
        load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unrestricted load does run it
    assert marker.exists()


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_truncated_or_corrupt_file_names_itself_and_the_fix(loader, tmp_path):
    load, fix = LOADERS[loader]
    path = tmp_path / "cut.pt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"", b"not a checkpoint"):
        path.write_bytes(broken)
        with pytest.raises(RefusedFileError, match=rf"{re.escape(str(path))} is (truncated or )?corrupt.*{fix}"):
            load(path)


def test_committed_checkpoints_load_weights_only():
    """The checkpoints in git (their recipes record the torch version as a TorchVersion) still load."""
    kws = ast.load_checkpoint(ROOT / "checkpoints" / "kws_ast.pt")
    head = whisper_kws.load_head_checkpoint(ROOT / "checkpoints" / "whisper_kws_head.pt")
    assert len(kws["labels"]) == kws["state_dict"]["head.weight"].shape[0]
    assert kws["torch_version"] and head["torch_version"] and head["head"]
    assert ast.build_kws_ast(checkpoint=str(ROOT / "checkpoints" / "kws_ast.pt")).name == "ast_kws"


def test_project_checkpoint_is_plain_data(tmp_path):
    """What the trainers save loads with torch's default weights-only rules, no allowlist needed."""
    from esc.data.kws import KWSConfig

    args = argparse.Namespace(data_seed=3, words=("yes", "no"), out=str(tmp_path / "c.pt"), lr=1e-3, argv=["x"])
    ckpt = {"state_dict": {"w": torch.randn(4)}, "config": {"dim": 4}, **recipe_provenance(args, KWSConfig(seed=3))}
    path = save_checkpoint(ckpt, tmp_path / "c.pt")
    loaded = torch.load(path, weights_only=True)
    assert type(loaded["torch_version"]) is str and loaded["recipe"]["words"] == ["yes", "no"]
    assert torch.equal(load_plain(path, "unused")["state_dict"]["w"], ckpt["state_dict"]["w"])


def test_no_unrestricted_load_or_remote_code_in_the_package():
    """Every torch.load goes through load_plain, and no hub load trusts remote code."""
    offenders = []
    for py in sorted((ROOT / "esc").rglob("*.py")):
        text = py.read_text()
        rel = py.relative_to(ROOT).as_posix()
        for pattern in ("weights_only=False", "trust_remote_code=True", "pickle.load"):
            if pattern in text:
                offenders.append(f"{rel}: {pattern}")
        if "torch.load(" in text and rel != "esc/models/checkpoint.py":
            offenders.append(f"{rel}: torch.load outside esc.models.checkpoint.load_plain")
    assert offenders == []
