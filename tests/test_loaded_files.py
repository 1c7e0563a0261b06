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
from esc.core.files import RefusedFileError, load_plain, save_checkpoint
from esc.models.checkpoint import recipe_provenance

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
    """Read ``path`` as the pipeline's activation-calibration cache (it is read before anything else is used)."""
    from esc.pipeline import calibrate

    return calibrate(None, None, None, None, path)


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
        if "torch.load(" in text and rel != "esc/core/files.py":
            offenders.append(f"{rel}: torch.load outside esc.core.files.load_plain")
    assert offenders == []


# ------------------------------------------------------------------------------ hub revisions
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_offline(monkeypatch):
    """Hub loads read only the local caches (what HF_HUB_OFFLINE=1 does), so nothing here touches the network."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def cached_hub_model(cache: Path, repo: str, bundle, commit: str = COMMIT) -> None:
    """Lay ``bundle``'s tiny model out in a Hugging Face hub cache as ``repo`` at ``commit`` (``refs/main`` -> ``commit``)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    bundle.model.hf.save_pretrained(snapshot)
    bundle.frontend.fe.save_pretrained(snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def test_hub_model_records_the_commit_it_loaded_and_honours_a_pin(tmp_path, hub_offline):
    from esc.data.hub_access import HubUnavailableError
    from esc.models import hub

    tiny = hub.build_ast_speechcommands(tiny=True)
    assert tiny.revisions == {}
    cached_hub_model(tmp_path, "esc-test/tiny-ast", tiny)
    loaded = hub.build_ast_speechcommands("esc-test/tiny-ast", cache_dir=str(tmp_path))
    assert loaded.revisions == {"esc-test/tiny-ast": COMMIT}
    feats = tiny.frontend(torch.randn(2, 16000) * 0.1)
    torch.testing.assert_close(loaded.model(feats), tiny.model(feats))
    assert hub.build_ast_speechcommands("esc-test/tiny-ast", cache_dir=str(tmp_path), revision=COMMIT).revisions == loaded.revisions
    with pytest.raises(HubUnavailableError, match="esc-test/tiny-ast"):  # a pinned commit that is not there is not replaced by main
        hub.build_ast_speechcommands("esc-test/tiny-ast", cache_dir=str(tmp_path), revision="f" * 40)
    local = tmp_path / "local"
    tiny.model.hf.save_pretrained(local)
    tiny.frontend.fe.save_pretrained(local)
    assert hub.build_ast_speechcommands(str(local)).revisions == {}  # a local folder: the weights fingerprint names it


def test_hub_model_config_takes_a_revision():
    from esc.config import compose

    for name in ("ast_speechcommands", "ast_audioset", "wav2vec2_base_960h", "conformer_ctc", "whisper_base_hub"):
        assert compose([f"model={name}", f"model.revision={COMMIT}"]).model.revision == COMMIT


def cached_hub_dataset(cache: Path, repo: str, rows: list[dict], commit: str = COMMIT) -> None:
    """Lay ``rows`` out in a datasets cache as hub data set ``repo`` at ``commit`` (what a first online load leaves)."""
    import shutil

    import datasets

    parquet = cache / "rows.parquet"
    datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio()).to_parquet(str(parquet))
    datasets.load_dataset("parquet", data_files={"test": str(parquet)}, cache_dir=str(cache / "build"))
    built = next(p for p in (cache / "build" / "parquet").glob("*/*/*") if p.is_dir())
    dest = cache / repo.replace("/", "___") / "default" / "0.0.0" / commit
    shutil.copytree(built, dest)
    for arrow in dest.glob("parquet-*.arrow"):
        arrow.rename(dest / arrow.name.replace("parquet-", f"{repo.split('/')[1]}-"))


def test_hub_data_set_records_the_commit_it_loaded(tmp_path, hub_offline):
    import io

    import soundfile as sf

    from esc.tasks.hub import HubASRTask

    def flac(seed):
        buf = io.BytesIO()
        sf.write(buf, np.random.default_rng(seed).standard_normal(1600).astype(np.float32) * 0.1, 16000, format="FLAC")
        return buf.getvalue()

    rows = [{"audio": {"bytes": flac(i), "path": f"{i}.flac"}, "text": f"WORD {i}"} for i in range(3)]
    cached_hub_dataset(tmp_path, "esc-test/tiny_speech", rows)
    task = HubASRTask(path="esc-test/tiny_speech", config=None, train_split="test", cache_dir=str(tmp_path), progress=False)
    assert task.revisions == {}
    clips = task._split("test")
    assert [c.text for c in clips] == ["WORD 0", "WORD 1", "WORD 2"]
    assert task.revisions == {"esc-test/tiny_speech": COMMIT}


def test_report_lists_the_hub_revisions_of_its_rows(tmp_path):
    from esc.report import build_report
    from esc.results import write_json_atomic

    base = {"status": "ok", "study": "s", "task": "kws", "precision": "w8a8", "calibrator": "minmax", "ptq": "none",
            "seed": 0, "calibration_seed": 0, "metric": "accuracy", "higher_is_better": True, "fp32": 90.0,
            "quantized": 89.0, "drop": 1.0, "rel_drop": 0.011, "axes": {}, "history": {}}
    write_json_atomic(tmp_path / "rows" / "a.json", {**base, "key": "a", "model": "ast_speechcommands",
                                                   "revisions": {"MIT/ast": "c" * 40, "google/speech_commands": "d" * 40}})
    write_json_atomic(tmp_path / "rows" / "b.json", {**base, "key": "b", "model": "ast_kws", "revisions": {}})
    build_report(tmp_path / "rows", tmp_path / "out")
    note = (tmp_path / "out" / "table.md").read_text().splitlines()[-1]
    assert note == f"Hub revisions: MIT/ast@{'c' * 40}, google/speech_commands@{'d' * 40}"
