"""Keyword-spotting default: eSpeak NG synthesis, synthetic data, audio loading, the AST and the task."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from esc.calibrators.base import Observer, observe, repeat_batch
from esc.data import espeak
from esc.data.audio import AudioLoadError, load_audio
from esc.data.kws import SPLITS, WORDS, KWSConfig, generate_kws, load_kws
from esc.models.ast import build_kws_ast
from esc.quant.model import QuantSpec, quantize_model
from esc.tasks.kws import TINY_DATA, KeywordSpottingTask

TINY_CFG = KWSConfig(**TINY_DATA)


# ------------------------------------------------------------------------------------ synthesis
def test_synthesis_is_non_silent_16k_and_voice_dependent():
    a = espeak.synthesize("seven", voice="en-us+m3")
    b = espeak.synthesize("seven", voice="en-gb-x-rp+f2")
    assert a.dtype == np.float32 and a.ndim == 1
    assert 0.2 * 16000 < a.size < 1.5 * 16000  # one word at 16 kHz
    assert float(np.sqrt(np.mean(a ** 2))) > 1e-3
    # the rate conversion: 16 kHz output is 16000/22050 of the native length (eSpeak's pitch
    # flutter carries over between calls, so a repeated call may differ by a few samples)
    native = espeak.synthesize_native("seven", voice="en-us+m3")
    assert espeak.native_sample_rate() == 22050
    assert abs(a.size - native.size * 16000 / 22050) < 0.01 * a.size
    assert abs(b.size - a.size) > 0.02 * a.size or np.abs(b[:a.size] - a[:b.size]).max() > 1e-2
    spec = lambda x: np.abs(np.fft.rfft(x, 16000))[:4000]  # noqa: E731  (< 4 kHz)
    centroid = lambda x: float((spec(x) * np.arange(4000)).sum() / spec(x).sum())  # noqa: E731
    assert abs(centroid(a) - centroid(b)) > 20  # male vs female variant: different spectra


def test_synthesis_rate_and_errors():
    slow = espeak.synthesize("forward", voice="en-us", rate=100)
    fast = espeak.synthesize("forward", voice="en-us", rate=300)
    assert slow.size > 1.5 * fast.size
    with pytest.raises(espeak.SynthesisError, match="no-such-voice"):
        espeak.synthesize("yes", voice="no-such-voice")
    with pytest.raises(espeak.SynthesisError, match="empty"):
        espeak.synthesize("  ")
    voices = espeak.list_voices()
    assert "en-us" in voices and "en-us+m3" in voices and len(voices) > 100


# -------------------------------------------------------------------------------------- dataset
@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "kws"  # ${paths.data}/kws as in conf/task/kws_tiny.yaml
    generate_kws(d, TINY_CFG, progress=False)
    return d


def test_dataset_deterministic_and_voice_disjoint(tiny_data_dir, tmp_path):
    a = load_kws(tiny_data_dir, TINY_CFG)
    generate_kws(tmp_path, TINY_CFG, progress=False)
    b = load_kws(tmp_path, TINY_CFG, generate=False)
    for s in SPLITS:
        assert np.array_equal(a[s].waveforms, b[s].waveforms)
        assert np.array_equal(a[s].labels, b[s].labels) and a[s].voices == b[s].voices
        assert a[s].waveforms.shape[1] == 16000 and a[s].waveforms.dtype == np.float32
        nv, per_word = TINY_CFG.num_voices[SPLITS.index(s)], TINY_CFG.clips_per_word[SPLITS.index(s)]
        assert len(a[s]) == nv * per_word * len(TINY_CFG.words)
        assert np.bincount(a[s].labels).tolist() == [nv * per_word] * len(TINY_CFG.words)
        assert np.abs(a[s].waveforms).max(axis=1).min() > 0.05  # every clip holds audio
    variant = lambda v: v.partition("+")[2] or "default"  # noqa: E731
    for s, t in (("train", "test"), ("train", "valid"), ("valid", "test")):
        assert not set(a[s].voices) & set(a[t].voices)
        assert not {variant(v) for v in a[s].voices} & {variant(v) for v in a[t].voices}
    other = load_kws(tmp_path, KWSConfig(**{**TINY_DATA, "seed": 1}))
    assert not np.array_equal(other["train"].waveforms, a["train"].waveforms)


def test_dataset_bytes_identical_across_processes_and_synthesis_order(tiny_data_dir, tmp_path):
    import json
    import subprocess
    import sys

    script = ("import sys; from esc.data.kws import KWSConfig, generate_kws; from esc.tasks.kws import TINY_DATA; "
              "generate_kws(sys.argv[1], KWSConfig(**TINY_DATA), progress=False)")
    digests = []
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], check=True, timeout=300)
        meta = json.loads(next((tmp_path / run).rglob("meta.json")).read_text())
        digests.append(meta["sha256"])
    here = load_kws(tiny_data_dir, TINY_CFG)
    assert digests[0] == digests[1] == {s: here[s].sha256 for s in SPLITS}
    # each utterance is synthesised on its own: the order of requests cannot change a waveform
    texts = [("seven", "en-us+f2"), ("forward", "en-gb-x-rp+whisper"), ("yes", "en-us+m3")]
    forward = [espeak.synthesize(t, voice=v) for t, v in texts]
    backward = [espeak.synthesize(t, voice=v) for t, v in reversed(texts)][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward))


def test_missing_dataset_without_generation_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="esc.data.kws"):
        load_kws(tmp_path, TINY_CFG, generate=False)


# ----------------------------------------------------------------------------------- load_audio
def test_load_audio_resamples_and_mixes_down(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.ones_like(t)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 8000, subtype="FLOAT")
    y = load_audio(path, 16000)
    assert y.ndim == 1 and y.dtype == np.float32 and abs(y.size - 16000) <= 1
    assert abs(float(y[2000:14000].mean()) - 0.05) < 0.01  # the channel mean (DC 0.1 / 2) survives
    same = load_audio(path, 8000)
    assert np.allclose(same, stereo.mean(axis=1), atol=1e-6)


def test_load_audio_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioLoadError, match="missing.wav"):
        load_audio(missing)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x01garbage" * 10)
    with pytest.raises(AudioLoadError, match="corrupt.wav"):
        load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioLoadError, match="empty.wav"):
        load_audio(empty)


# ------------------------------------------------------------------------------------------ AST
@pytest.fixture(scope="module")
def tiny_bundle():
    return build_kws_ast(tiny=True, seed=0)


def test_ast_shapes_and_frontend_batching(tiny_bundle):
    wav = torch.randn(3, 16000) * 0.1
    feats = tiny_bundle.frontend(wav)
    cfg = tiny_bundle.extras["config"]
    assert feats.shape == (3, 1, cfg["frontend"]["n_mels"], 101)
    single = torch.cat([tiny_bundle.frontend(wav[i:i + 1]) for i in range(3)])
    assert torch.allclose(feats, single, atol=1e-5)
    assert tiny_bundle.frontend(wav[:, :12000]).shape == feats.shape  # short clips are padded
    logits = tiny_bundle.model(feats)
    assert logits.shape == (3, len(tiny_bundle.labels)) == (3, 35)


class _MaxObserver(Observer):
    def update(self, x):
        self.m = max(getattr(self, "m", 0.0), float(x.abs().max()))

    def clip_range(self):
        return torch.tensor(self.m)


def test_tiny_ast_quantizes_with_matmul_points(tiny_bundle):
    q = quantize_model(tiny_bundle.model, QuantSpec(8, True, "channel"), QuantSpec(8, True, "tensor"))
    names = list(q.activation_quantizers)
    for block in range(2):
        for op in ("qk", "av"):
            for side in ("a", "b"):
                assert f"blocks.{block}.attn.{op}.{side}_quantizer" in names
    feats = tiny_bundle.frontend(torch.randn(4, 16000) * 0.1)
    data = type("D", (), {"batches": [feats], "forward": staticmethod(lambda m, b: m(b))})
    for name, obs in observe(q, data, _MaxObserver).items():
        q.activation_quantizers[name].set_clip_range(obs.clip_range())
    with torch.no_grad():
        ref, out = tiny_bundle.model(feats), q(feats)
        assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3  # W8A8 stays close to float
        # batch on dim 0: a population of 2 scale vectors on the repeated batch matches single runs
        s = q.activation_scales()
        q.set_activation_scales(torch.stack([s, 2 * s]))
        pop = q(repeat_batch(feats, 2))
        q.set_activation_scales(2 * s)
        assert torch.allclose(pop[4:], q(feats), atol=1e-5)
        q.set_activation_scales(s)
        assert torch.allclose(pop[:4], q(feats), atol=1e-5)


def test_missing_checkpoint_names_make_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="make models"):
        build_kws_ast(checkpoint=str(tmp_path / "kws_ast.pt"))


def test_checkpoint_round_trip(tiny_bundle, tmp_path):
    path = tmp_path / "kws_ast.pt"
    torch.save({"state_dict": tiny_bundle.model.state_dict(), "config": tiny_bundle.extras["config"],
                "labels": tiny_bundle.labels, "data_seed": 0}, path)
    loaded = build_kws_ast(checkpoint=str(path))
    feats = tiny_bundle.frontend(torch.randn(2, 16000) * 0.1)
    assert torch.allclose(loaded.model(feats), tiny_bundle.model(feats))
    assert loaded.labels == tiny_bundle.labels and loaded.name == "ast_kws"


# ----------------------------------------------------------------------------------------- task
def test_task_evaluate_and_calibration_data(tiny_bundle, tiny_data_dir):
    task = KeywordSpottingTask(data_dir=str(tiny_data_dir), tiny=True, eval_batch_size=7,
                               calibration_batch_size=4, generate=False, progress=False)
    task.prepare(tiny_bundle)
    n_test = TINY_CFG.num_voices[2] * TINY_CFG.clips_per_word[2] * len(TINY_CFG.words)
    assert len(task.test_labels) == n_test
    assert set(task.test_labels.tolist()) == {tiny_bundle.labels.index(w) for w in TINY_CFG.words}
    metrics = task.evaluate(tiny_bundle.model)
    assert 0.0 <= metrics["accuracy"] <= 100.0 and np.isfinite(metrics["loss"])
    # evaluate agrees with a direct computation
    with torch.no_grad():
        logits = tiny_bundle.model(task.test_features)
    assert metrics["accuracy"] == pytest.approx(100.0 * float((logits.argmax(-1) == task.test_labels).float().mean()))
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, task.test_labels)), rel=1e-4)

    data = task.calibration_data(10, seed=3)
    assert data.num_samples == 10 and len(data.batches) == 3
    again = task.calibration_data(10, seed=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(data.batches, again.batches))
    batch = data.batches[0]
    with torch.no_grad():
        out = data.forward(tiny_bundle.model, batch)
        loss = data.loss(out, batch)
        assert loss.shape == (4,) and torch.all(loss > 0)
        rep = repeat_batch(batch, 3)
        assert torch.allclose(data.loss(data.forward(tiny_bundle.model, rep), rep), loss.repeat(3), atol=1e-5)
    with pytest.raises(ValueError, match="num_samples"):
        task.calibration_data(10_000, seed=0)

    sub = KeywordSpottingTask(data_dir=str(tiny_data_dir), tiny=True, max_test_clips=5, generate=False, progress=False)
    sub.prepare(tiny_bundle)
    assert len(sub.test_labels) == 5


def test_hydra_configs_instantiate(tiny_data_dir):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    ckpt_dir = Path(__file__).resolve().parents[1] / "checkpoints"
    base = OmegaConf.create({"paths": {"data": str(tiny_data_dir.parent), "checkpoints": str(ckpt_dir)},
                             "calibration": {"batch_size": 4}})
    load = lambda group, name: OmegaConf.merge(base, {"x": OmegaConf.load(conf / group / f"{name}.yaml")}).x  # noqa: E731
    bundle = instantiate(load("model", "ast_tiny"))
    task = instantiate(load("task", "kws_tiny"))
    assert isinstance(task, KeywordSpottingTask) and bundle.name == "ast_tiny" and task.name == "kws_tiny"
    task.prepare(bundle)
    metrics = task.evaluate(bundle.model)
    assert set(metrics) == {"accuracy", "loss", "per_sample"}
    assert metrics["accuracy"] == pytest.approx(task.metric_from_samples(metrics["per_sample"]))
    assert task.calibration_data(6, seed=0).batches[0][0].shape[0] == 4
    full = load("task", "kws")
    assert full._target_ == "esc.tasks.kws.KeywordSpottingTask" and full.data_dir.endswith("/kws")
    if (ckpt_dir / "kws_ast.pt").is_file():  # the committed checkpoint
        real = instantiate(load("model", "ast_kws"))
        assert real.labels == list(WORDS)
        assert real.extras["test_accuracy"] >= 95.0
