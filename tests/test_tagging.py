"""Synthetic tagging data, average precision, and AudioTaggingTask on the tiny random-weight YAMNet."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from esc.calibrators.base import repeat_batch
from esc.core.files import RefusedFileError
from esc.data import tagging as tg
from esc.data.tagging import TaggingSpec, clip_classes, generate, load_or_generate, make_clip
from esc.models.yamnet import build_yamnet_tiny
from esc.tasks.tagging import AudioTaggingTask, average_precision, mean_average_precision

torch.set_num_threads(1)
SR = 16000
NO_SPEECH = ("Sine wave", "Beep, bleep", "Dial tone", "Telephone dialing, DTMF", "White noise", "Pink noise",
             "Clicking", "Silence")


# -------------------------------------------------------------------------------- metric
def test_average_precision_hand_computed():
    # ranks 1..4 = +, -, +, -: precision at the positives 1/1 and 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # order does not matter, only the scores
    assert average_precision([0.6, 0.7, 0.8, 0.9], [0, 1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)
    # ties form one threshold: {0.5, 0.5} gives P = 1/2 at R = 1/2, then P = 2/3 at R = 1
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision([0.1, 0.9, 0.3], [0, 1, 1]) == 1.0
    assert np.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_map_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.4, 0.3, 0.2]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)  # column 3 has no positive
    labels[0, 0], labels[1, 0] = 0, 1  # class 0: ranks +? scores 0.4 (+), 0.2 (+) below 0.9 (-)
    assert mean_average_precision(scores, labels) == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1.0) / 2)


def test_map_matches_sklearn():
    """scikit-learn (a pinned test requirement) is the independent reference, ties included."""
    rng = np.random.default_rng(0)
    s, y = rng.random((200, 5)).round(2), rng.random((200, 5)) < 0.3  # rounding makes ties
    assert mean_average_precision(s, y) == pytest.approx(average_precision_score(y, s, average="macro"))
    for c in range(5):
        assert average_precision(s[:, c], y[:, c]) == pytest.approx(average_precision_score(y[:, c], s[:, c]))


# ---------------------------------------------------------------------------------- data
def _spectrum(x):
    return np.abs(np.fft.rfft(x)), np.fft.rfftfreq(len(x), 1 / SR)


def test_generators_known_answers():
    rng = np.random.default_rng(0)
    n = 23280
    mag, f = _spectrum(tg.sine_wave(n, SR, rng))
    assert 150 <= f[mag.argmax()] <= 4000 and (mag > mag.max() / 10).sum() <= 5
    mag, f = _spectrum(tg.dial_tone(n, SR, rng))
    peaks = sorted(f[np.argsort(mag)[-2:]])
    assert any(all(min(abs(p - t) for t in tones) < 2 for p in peaks) for tones in tg.DIAL_TONES)
    x = tg.dtmf(n, SR, rng)
    on = np.flatnonzero(np.abs(x) > 0)
    seg = x[on[0]:on[0] + 800]  # 50 ms of the first digit
    mag, f = _spectrum(seg)
    top = f[np.argsort(mag)[-1]]
    assert min(abs(top - t) for t in tg.DTMF_ROWS + tg.DTMF_COLS) < 25
    for make, slope in ((tg.white_noise, 0.0), (tg.pink_noise, -1.0)):
        mag, f = _spectrum(make(2 ** 16, SR, rng))
        band = (f > 50) & (f < 7000)
        fit = np.polyfit(np.log(f[band]), np.log(mag[band] ** 2), 1)[0]
        assert abs(fit - slope) < 0.15
    clicks = tg.clicking(n, SR, rng)
    assert (np.abs(clicks) > 1e-3).mean() < 0.1  # mostly silence between short clicks
    beeps = tg.beep(n, SR, rng)
    assert 0.1 < (np.abs(beeps) > 1e-6).mean() < 0.95  # gated


def test_clips_are_deterministic_levelled_and_labelled():
    spec = TaggingSpec(num_clips=20, seed=3, classes=NO_SPEECH, mixture_fraction=0.2)
    a, b = generate(spec), generate(spec)
    np.testing.assert_array_equal(a.waves, b.waves)
    np.testing.assert_array_equal(a.labels, b.labels)
    other = generate(TaggingSpec(num_clips=20, seed=4, classes=NO_SPEECH, mixture_fraction=0.2))
    assert not np.array_equal(a.waves, other.waves)
    assert a.waves.shape == (20, tg.DEFAULT_CLIP_SAMPLES) and a.waves.dtype == np.float32
    counts = a.labels.sum(axis=1)
    assert (counts[:16] == 1).all() and (counts[16:] == 2).all()
    assert (a.labels[:16].sum(axis=0) == 2).all()  # singles cycle over the 8 classes
    assert not a.labels[16:, NO_SPEECH.index("Silence")].any()  # silence is never mixed
    rms_db = 20 * np.log10(np.sqrt((a.waves ** 2).mean(axis=1)))
    silent = a.labels[:, NO_SPEECH.index("Silence")] == 1
    assert np.allclose(rms_db[silent], -90, atol=1)
    assert (rms_db[~silent] <= -15 + 1e-3).all() and (rms_db[~silent] >= -45).all()
    assert np.abs(a.waves).max() <= 0.99 + 1e-6
    # one clip depends only on (seed, index), not on the set size
    np.testing.assert_array_equal(make_clip(spec, 5, clip_classes(spec)[5]), a.waves[5])


def test_clips_lie_on_the_pcm_grid_and_ignore_last_bit_differences_of_float_maths(monkeypatch):
    """CPUs differ in the last bits of numpy's ``sin`` (AVX-512 against AVX2); the 16-bit grid makes the bytes equal."""
    spec = TaggingSpec(num_clips=12, seed=3, classes=NO_SPEECH, mixture_fraction=0.0)
    clips = [(i, c) for i, c in enumerate(clip_classes(spec)) if c[0] in ("Sine wave", "Dial tone", "Silence")]
    reference = [make_clip(spec, i, c) for i, c in clips]
    for clip in reference:
        assert np.array_equal(clip * 32768, np.round(clip * 32768)) and clip.dtype == np.float32
    sin = np.sin
    monkeypatch.setattr(np, "sin", lambda x: sin(x) * (1 + 1e-9))  # far above a float32 ulp's share, far below a PCM step
    for (i, c), clip in zip(clips, reference):
        np.testing.assert_array_equal(make_clip(spec, i, c), clip)


def test_bad_classes_are_named():
    with pytest.raises(ValueError, match="Trumpet"):
        clip_classes(TaggingSpec(num_clips=4, classes=("Sine wave", "Trumpet")))
    with pytest.raises(ValueError, match="two non-silent"):
        clip_classes(TaggingSpec(num_clips=4, classes=("Sine wave", "Silence"), mixture_fraction=0.5))


def test_cache_roundtrip(tmp_path):
    spec = TaggingSpec(num_clips=6, seed=0, classes=("Sine wave", "White noise"), mixture_fraction=0.0)
    first = load_or_generate(spec, tmp_path, "test")
    files = list(tmp_path.glob("test-*.npz"))
    assert len(files) == 1 and spec.key() in files[0].name
    again = load_or_generate(spec, tmp_path, "test")
    np.testing.assert_array_equal(first.waves, again.waves)
    assert again.classes == spec.classes
    assert TaggingSpec(num_clips=7).key() != TaggingSpec(num_clips=6).key()
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # a cache truncated by a crash or a full disk
    with pytest.raises(RefusedFileError, match=rf"{files[0].name} is truncated or corrupt .*delete it"):
        load_or_generate(spec, tmp_path, "test")


def test_speech_clip():
    """eSpeak NG (espeakng-loader, pinned) always runs here: a missing engine fails, as in test_kws."""
    x = tg.speech(23280, SR, np.random.default_rng(0))
    assert x.shape == (23280,) and (np.abs(x) > 1e-3).mean() > 0.3


# ---------------------------------------------------------------------------------- task
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    task = AudioTaggingTask(data_dir=str(tmp_path_factory.mktemp("tagging")), num_clips=16, calibration_clips=12,
                            classes=("Sine wave", "Dial tone", "White noise", "Silence"), mixture_fraction=0.25,
                            batch_size=5)
    bundle = build_yamnet_tiny()
    task.prepare(bundle)
    return task, bundle


def test_data_hashes_are_known_before_preparing(prepared):
    """The runner's check of a finished row reads the same hashes that ``prepare`` records, without a model."""
    task, _ = prepared
    assert task.load_data_hashes() == task.data_hashes and set(task.data_hashes) == {"test", "calibration"}
    other = AudioTaggingTask(data_dir=task.data_dir, num_clips=16, calibration_clips=12, seed=5,
                             classes=("Sine wave", "Dial tone", "White noise", "Silence"), mixture_fraction=0.25)
    assert other.load_data_hashes()["test"] != task.data_hashes["test"]  # another test seed: other bytes


def test_task_evaluates_fp32_against_itself(prepared):
    task, bundle = prepared
    out = task.evaluate(bundle.model)
    assert out["top1_agreement"] == 1.0 and 0.0 < out["mAP"] <= 1.0
    ps = out["per_sample"]
    assert ps["scores"].shape == ps["labels"].shape == (16, 4) and ps["top1_agree"].shape == (16,)
    assert task.metric_from_samples(ps) == pytest.approx(out["mAP"])
    assert out["mAP"] == pytest.approx(np.mean([out[f"AP/{c}"] for c in task.classes]))
    # a model that scores the true labels perfectly gets mAP 1
    assert task.metric_from_samples({"scores": task.test_labels.copy(), "labels": task.test_labels}) == 1.0


def test_top1_agreement_drops_for_another_model(prepared):
    task, _ = prepared
    other = build_yamnet_tiny(seed=7).model
    assert task.evaluate(other)["top1_agreement"] < 1.0


def test_calibration_data_and_fp32_loss(prepared):
    task, bundle = prepared
    data = task.calibration_data(7, seed=0)
    assert data.num_samples == 7 and [len(b[0]) for b in data.batches] == [5, 2]
    again = task.calibration_data(7, seed=0)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(data.batches, again.batches))
    batch = data.batches[0]
    with torch.no_grad():
        out = data.forward(bundle.model, batch)
        loss = data.loss(out, batch)
        worse = data.loss((out + 0.2 * (0.5 - out)).clamp(0, 1), batch)  # pulled towards 0.5
    assert loss.shape == (5,) and (worse > loss).all()
    pop = repeat_batch(batch, 3)
    with torch.no_grad():
        assert data.loss(data.forward(bundle.model, pop), pop).shape == (15,)
    with pytest.raises(ValueError, match="num_samples"):
        task.calibration_data(13, seed=0)


def test_label_loss_and_bad_configs(prepared, tmp_path):
    task, bundle = prepared
    task.loss = "labels"
    try:
        data = task.calibration_data(4, seed=1)
        with torch.no_grad():
            assert data.loss(data.forward(bundle.model, data.batches[0]), data.batches[0]).shape == (4,)
    finally:
        task.loss = "fp32"
    with pytest.raises(ValueError, match="loss"):
        AudioTaggingTask(loss="kl")
    with pytest.raises(ValueError, match="calibration_seed"):
        AudioTaggingTask(seed=1, calibration_seed=1)
    bad = AudioTaggingTask(data_dir=str(tmp_path), num_clips=2, calibration_clips=2, classes=("Sine wave", "Trumpet"),
                           mixture_fraction=0.0)
    with pytest.raises(ValueError, match="Trumpet"):
        bad.prepare(bundle)
    with pytest.raises(RuntimeError, match="prepare"):
        AudioTaggingTask().evaluate(bundle.model)


def test_fp32_scores_are_cached_per_model(prepared):
    task, bundle = prepared
    files = sorted(task.data_dir.glob("fp32-*.npz"))
    assert len(files) == 1
    again = AudioTaggingTask(data_dir=str(task.data_dir), num_clips=16, calibration_clips=12, classes=task.classes,
                             mixture_fraction=0.25, batch_size=5)
    again.prepare(bundle)
    torch.testing.assert_close(again.fp32_test_scores, task.fp32_test_scores)
    assert sorted(task.data_dir.glob("fp32-*.npz")) == files  # reused, not recomputed
    again.prepare(build_yamnet_tiny(seed=3))  # another model: another cache entry
    assert len(list(task.data_dir.glob("fp32-*.npz"))) == 2
    assert not torch.allclose(again.fp32_test_scores, task.fp32_test_scores)
