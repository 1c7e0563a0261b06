"""Hub models, data loaders, tasks, the paper grid and `make reproduce`, all offline.

Models are the hub classes built from tiny random configs (``tiny=True``); data sets are small
local sets written here in the hub rows' shapes (a folder of class sub-folders, parquet files with
audio bytes) and read through the same loaders.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.calibrators.minmax import MinMaxCalibrator
from esc.data import hub as hubdata
from esc.data.hub_open import load_split, open_dataset
from esc.data.audio import AudioLoadError
from esc.models import hub
from esc.models.ctc_decoder import CTCGreedyDecoder
from esc.models.hub_frontends import CTCFrontend
from esc.quant.model import quantize_model

ROOT = Path(__file__).resolve().parents[1]


def wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt)
    return buf.getvalue()


def noise(n: int, seed: int, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Rows with an ``audio`` {bytes, path} column, stored with datasets' Audio feature (as hub parquet files are)."""
    import datasets

    datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio()).to_parquet(str(path))
    return path


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def local_sets(tmp_path_factory) -> dict:
    """Small local data sets shaped like the hub rows (Speech Commands folder, LibriSpeech and ESC-50 parquet)."""
    root = tmp_path_factory.mktemp("hubdata")
    sc = root / "speech_commands"
    for split, n in (("train", 3), ("test", 2)):
        for w, word in enumerate(("yes", "no", "_silence_")):
            (sc / split / word).mkdir(parents=True)
            for k in range(n):  # 8 kHz, 0.75 s: resampled to 16 kHz and padded to 1 s
                sf.write(sc / split / word / f"s{k}_nohash_{w}.wav", noise(6000, 100 * w + k), 8000)
    ls = [{"audio": {"bytes": wav_bytes(noise(8000 + 4000 * i, 10 + i), 16000, "FLAC"), "path": f"{i}.flac"},
           "text": text, "speaker_id": 100 + i % 2, "id": f"utt{i}"}
          for i, text in enumerate(["HELLO WORLD", "THE CAT SAT", "A DOG RAN FAST", "GOOD MORNING"])]
    esc = [{"audio": {"bytes": wav_bytes(noise(22050, 50 + i), 44100), "path": f"{i}-{cat}.wav"}, "category": cat, "fold": fold}
           for i, (cat, fold) in enumerate([("dog", 1), ("rain", 1), ("drinking_sipping", 1), ("rain", 2), ("dog", 5), ("rain", 5)])]
    return {"speech_commands": sc, "librispeech": write_parquet(root / "librispeech.parquet", ls),
            "esc50": write_parquet(root / "esc50.parquet", esc), "cache": root / "cache", "root": root}


def calibrate_minmax(qmodel, batches, forward=lambda m, b: m(b)):
    MinMaxCalibrator().calibrate(qmodel, CalibrationData(batches, forward))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def round_to_step(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Signed narrow-range 8-bit rounding written out: ``clamp(round(x / step), -127, 127) * step`` (an
    all-zero row's step 0 becomes the smallest positive float, so that it rounds to 0)."""
    step = step.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round(x / step), -127, 127) * step


@torch.no_grad()
def w8a8_by_hand(model, batch, forward=lambda m, b: m(b)):
    """The W8A8 max-calibrated output computed without the quantizer code: every weight rounded per output
    channel to the step ``max |w_c| / 127``; every activation quantization point's input rounded per tensor
    to ``max |x| / 127``, the max taken over ``batch`` with rounded weights and float activations (max
    calibration's definition). ``quantize_model(weight=None)`` only marks where the points are."""
    ref = quantize_model(model, weight=None)
    acts = ref.activation_quantizers
    for q in acts.values():
        q.enabled = False
    for m in ref.modules():
        if hasattr(m, "weight_quantizer"):
            w = m.weight  # a new parameter: a weight tied to an embedding (Whisper's proj_out) stays float there
            m.weight = nn.Parameter(round_to_step(w, w.abs().flatten(1).amax(1).view(-1, *[1] * (w.dim() - 1)) / 127))
    amax = dict.fromkeys(acts, 0.0)
    hooks = [q.register_forward_pre_hook(lambda mod, a, n=n: amax.__setitem__(n, max(amax[n], float(a[0].abs().max()))))
             for n, q in acts.items()]
    forward(ref, batch)
    for h in hooks:
        h.remove()
    for n, q in acts.items():
        q.register_forward_hook(lambda mod, a, out, step=torch.tensor(amax[n]) / 127: round_to_step(out, step))
    return forward(ref, batch)


def assert_w8a8_by_hand(qout: torch.Tensor, hand: torch.Tensor, fp: torch.Tensor) -> None:
    """The quantized output equals the hand-rounded one to within 1% of the quantization error itself (a grid
    one level off, a wrong step or a skipped rounding moves it by a sizeable part of that error)."""
    error = rel_err(hand, fp)
    assert 0 < error < 0.2 and rel_err(qout, hand) < 0.01 * error, (rel_err(qout, hand), error)


# ------------------------------------------------------------------------------ models
CLASSIFIERS = [(hub.build_ast_speechcommands, {}, 35), (hub.build_ast_audioset, {"labels": ["Dog", "Rain", "Speech"]}, 3)]
CTC = [hub.build_wav2vec2_ctc, hub.build_conformer_ctc]


@pytest.mark.parametrize("build,kwargs,classes", CLASSIFIERS)
def test_ast_builders_tiny(build, kwargs, classes):
    torch.manual_seed(0)
    b = build(tiny=True, **kwargs)
    wav = torch.randn(3, 16000) * 0.1
    feats = b.frontend(wav)
    assert feats.shape == (3, hub.TINY_AST["max_length"], hub.TINY_AST["num_mel_bins"])
    out = b.model(feats)
    assert out.shape == (3, classes) and len(b.labels) == classes
    if build is hub.build_ast_audioset:  # sigmoid scores for the tagging task
        assert out.min() >= 0 and out.max() <= 1
    q = quantize_model(b.model)
    names = list(q.activation_quantizers)
    assert any("patch_embeddings" in n for n in names) and not any("matmul" in n for n in names)
    calibrate_minmax(q, [feats])
    qout = q(feats)
    assert qout.shape == out.shape and torch.isfinite(qout).all()
    assert_w8a8_by_hand(qout, w8a8_by_hand(b.model, feats), out)
    assert b.labels[:2] == (["Dog", "Rain"] if classes == 3 else ["backward", "bed"])


@pytest.mark.parametrize("build", CTC)
def test_ctc_builders_tiny(build):
    torch.manual_seed(0)
    b = build(tiny=True)
    wav = torch.randn(2, 16000) * 0.1
    wav[1, 9600:] = 0  # a shorter clip, zero-padded
    feats = b.frontend(wav)
    out = b.model(feats)
    frames = b.extras["output_lengths"]([16000, 9600]).tolist()
    assert out.shape == (2, frames[0], len(hub.LIBRISPEECH_CHARS)) and frames[1] < frames[0]
    assert isinstance(feats, dict) == (build is hub.build_conformer_ctc)  # only the conformer takes a mask
    q = quantize_model(b.model)
    calibrate_minmax(q, [feats])
    qout = q(feats)
    assert qout.shape == out.shape and torch.isfinite(qout).all()
    hand = w8a8_by_hand(b.model, feats)
    for i, n in enumerate(frames):  # the valid frames (padding frames are junk)
        assert_w8a8_by_hand(qout[i, :n], hand[i, :n], out[i, :n])
    assert len(b.extras["decode"](qout, frames)) == 2


def test_matmul_attention_is_exact_and_quantizable():
    wav = torch.randn(2, 16000) * 0.1
    for build in (hub.build_ast_speechcommands, hub.build_conformer_ctc):
        ref, mm = build(tiny=True), build(tiny=True, matmul_attention=True)
        torch.testing.assert_close(mm.model(mm.frontend(wav)), ref.model(ref.frontend(wav)), atol=1e-5, rtol=1e-4)
        names = list(quantize_model(mm.model).activation_quantizers)
        assert sum("qk_matmul" in n for n in names) == 2 * 2  # 2 layers x (a, b)


def test_ctc_frontend_ignores_padding():
    fe = CTCFrontend(do_normalize=True, attention_mask=True)
    x = torch.from_numpy(noise(8000, 1)) + 0.3
    padded = torch.zeros(2, 12000)
    padded[0, :8000], padded[1] = x, torch.from_numpy(noise(12000, 2))
    out = fe(padded)
    alone = fe(x[None])["input_values"][0]
    torch.testing.assert_close(out["input_values"][0, :8000], alone)
    assert out["input_values"][0, 8000:].abs().max() == 0
    assert out["attention_mask"].sum(1).tolist() == [8000, 12000]
    assert abs(float(alone.mean())) < 1e-5 and abs(float(alone.std(unbiased=False)) - 1) < 1e-3


def test_ctc_greedy_decode_known_answer():
    vocab = list(hub.LIBRISPEECH_CHARS)
    dec = CTCGreedyDecoder(vocab, blank_id=0)
    # frames: H H <pad> I | | T <unk> <pad> O O <pad> O <s>   -> "HI TOO"
    path = ["H", "H", "<pad>", "I", "|", "|", "T", "<unk>", "<pad>", "O", "O", "<pad>", "O", "</s>"]
    logits = torch.full((2, len(path), len(vocab)), -5.0)
    for t, tok in enumerate(path):
        logits[0, t, vocab.index(tok)] = 5.0
        logits[1, t, vocab.index("<pad>" if t else "A")] = 5.0
    assert dec(logits) == ["HI TOO", "A"]
    assert dec(logits, lengths=[4, 14]) == ["HI", "A"]
    with pytest.raises(ValueError, match=r"\[B, frames, vocab\]"):
        dec(logits[0])


def test_ctc_decoder_matches_the_hf_tokenizer(tmp_path):
    from transformers import Wav2Vec2CTCTokenizer

    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(hub.LIBRISPEECH_CHARS)}))
    tok = Wav2Vec2CTCTokenizer(str(vocab_file))
    dec = CTCGreedyDecoder.from_tokenizer(tok)
    assert dec.blank_id == 0 and dec.vocab == list(hub.LIBRISPEECH_CHARS)
    ids = torch.randint(4, len(hub.LIBRISPEECH_CHARS), (5, 40), generator=torch.Generator().manual_seed(0))
    ids[:, ::3] = 0  # blanks between repeats
    for row in ids.tolist():
        assert dec.decode_ids(row) == " ".join(tok.decode(row).split())


def test_ctc_task_keeps_doubled_letters():
    """Frames h e l <blank> l o -> labels h e l l o -> "hello" (the task's collapse then text; decoding the
    collapsed labels with a second repeat merge gave "helo")."""
    from esc.tasks.hub import CTCASRTask

    chars = ["<pad>", "|", "h", "e", "l", "o"]
    task = CTCASRTask(data_dir=None)
    task.extras = {"decode": CTCGreedyDecoder(chars, blank_id=0)}
    frames = [2, 2, 3, 4, 0, 4, 4, 5, 1, 2, 5, 5]  # h h e l _ l l o | h o o
    logits = torch.nn.functional.one_hot(torch.tensor([frames]), len(chars)).float()
    (labels,) = task.collapse(logits, [len(frames)])
    assert labels == [2, 3, 4, 4, 5, 1, 2, 5]
    assert task.decode_text(labels) == "hello ho" == task.extras["decode"].decode_ids(frames)


def test_whisper_hub_tiny_decodes_and_quantizes():
    from esc.tasks.whisper_decoding import greedy_decode, teacher_forced_logits, teacher_forcing_batch

    b = hub.build_whisper_hub(tiny=True, encoder_frames=200, max_new_tokens=4)
    feats = b.frontend(torch.randn(2, 16000) * 0.1)
    assert feats.shape == (2, 80, 200)
    ex = b.extras
    tokens = greedy_decode(b.model, feats, ex["prompt_ids"], ex["eos_id"], 4)
    assert len(tokens) == 2 and all(len(t) <= 4 for t in tokens)
    q = quantize_model(b.model)
    assert any("qk_matmul" in n for n in q.activation_quantizers)  # the offline Whisper's MatMul attention
    batch = teacher_forcing_batch(feats, [[5, 6], [7]], ex["prompt_ids"], ex["eos_id"])
    calibrate_minmax(q, [batch], teacher_forced_logits)
    ref, out = teacher_forced_logits(b.model, batch), teacher_forced_logits(q, batch)
    assert out.shape == ref.shape
    assert_w8a8_by_hand(out, w8a8_by_hand(b.model, batch, teacher_forced_logits), ref)


@pytest.mark.parametrize("name", ["ast_speechcommands_tiny", "ast_audioset_tiny", "wav2vec2_base_960h_tiny", "conformer_ctc_tiny"])
def test_tiny_model_configs_instantiate(name):
    from hydra.utils import instantiate

    from esc.config import compose

    b = instantiate(compose([f"model={name}"]).model)
    assert b.name == name and b.sample_rate == 16000


# ------------------------------------------------------------------------------ data loaders
def test_speech_commands_loader_folder(local_sets):
    s = hubdata.load_speech_commands(str(local_sets["speech_commands"]), split="test", progress=False)
    assert s.waveforms.shape == (4, 16000) and s.waveforms.dtype == np.float32  # _silence_ dropped
    assert sorted(s.words[i] for i in s.labels) == ["no", "no", "yes", "yes"]
    x = sf.read(local_sets["speech_commands"] / "test" / "yes" / "s0_nohash_0.wav", dtype="float32")[0]
    first = s.waveforms[[s.words[i] == "yes" for i in s.labels]][0]
    assert np.all(first[12500:] == 0) and np.abs(first[:12000]).max() > 0  # 0.75 s -> 12000 samples, padded
    assert abs(np.sqrt(np.mean(first[:12000] ** 2)) - np.sqrt(np.mean(x ** 2))) < 0.02  # resampled, same level
    sub = hubdata.load_speech_commands(str(local_sets["speech_commands"]), split="train", max_samples=3, seed=1, progress=False)
    again = hubdata.load_speech_commands(str(local_sets["speech_commands"]), split="train", max_samples=3, seed=1, progress=False)
    assert len(sub) == 3 and np.array_equal(sub.waveforms, again.waveforms)


def test_librispeech_loader_parquet(local_sets):
    clips = hubdata.load_librispeech(str(local_sets["librispeech"]), progress=False, cache_dir=str(local_sets["cache"]))
    assert [c.text for c in clips] == ["HELLO WORLD", "THE CAT SAT", "A DOG RAN FAST", "GOOD MORNING"]
    assert [len(c.wave) for c in clips] == [8000, 12000, 16000, 20000]
    assert [c.voice for c in clips] == ["100", "101", "100", "101"]
    np.testing.assert_allclose(clips[0].wave, noise(8000, 10), atol=1e-4)  # FLAC round trip (16 bit)


def test_hub_repo_loads_only_the_requested_split(local_sets, tmp_path):
    """A repository laid out like openslr/librispeech_asr: reading `test` must not touch `validation`."""
    repo = tmp_path / "repo"
    for d in ("clean/test", "clean/validation"):
        (repo / d).mkdir(parents=True)
    rows = [{"audio": {"bytes": wav_bytes(noise(1600, i), 16000, "FLAC"), "path": f"{i}.flac"}, "text": f"WORD {i}"} for i in range(3)]
    write_parquet(repo / "clean/test/0.parquet", rows)
    (repo / "clean/validation/0.parquet").write_bytes(b"not a parquet file")  # reading it would fail
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: clean\n  data_files:\n"
                                    "  - split: test\n    path: clean/test/*.parquet\n"
                                    "  - split: validation\n    path: clean/validation/*.parquet\n---\n")
    clips = hubdata.load_librispeech(str(repo), "clean", "test", progress=False, cache_dir=str(tmp_path / "cache"))
    assert [c.text for c in clips] == ["WORD 0", "WORD 1", "WORD 2"]
    with pytest.raises(Exception, match="(?i)parquet"):
        hubdata.load_librispeech(str(repo), "clean", "validation", progress=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no split 'train.100'"):
        load_split(str(repo), "clean", "train.100", cache_dir=str(tmp_path / "cache"))


def test_esc50_loader_maps_to_audioset(local_sets):
    s = hubdata.load_esc50(str(local_sets["esc50"]), folds=[1, 2], progress=False, cache_dir=str(local_sets["cache"]))
    assert s.waves.shape == (3, 80000)  # drinking_sipping has no AudioSet class: dropped
    assert np.all(s.waves[:, 8000:] == 0) and s.sample_rate == 16000  # 0.5 s at 44.1 kHz -> 8000 samples
    cls = [s.classes[i] for i in s.labels.argmax(1)]
    assert cls == ["Dog", "Rain", "Rain"] and s.labels.sum() == 3
    assert set(hubdata.ESC50_TO_AUDIOSET.values()) == set(s.classes)


def test_corrupt_audio_names_row_and_file(local_sets, tmp_path):
    rows = [{"audio": {"bytes": wav_bytes(noise(1600, 0), 16000), "path": "ok.wav"}, "text": "OK"},
            {"audio": {"bytes": b"RIFF not really a wave", "path": "broken.wav"}, "text": "BAD"}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(AudioLoadError, match=r"row 1 \(broken\.wav\).*skip_bad_files=true"):
        hubdata.load_librispeech(str(path), progress=False, cache_dir=str(local_sets["cache"]))
    skipped: list[str] = []  # skip_bad_files: the bad row is left out, named, and counted
    clips = hubdata.load_librispeech(str(path), progress=False, cache_dir=str(local_sets["cache"]), skipped=skipped)
    assert [c.text for c in clips] == ["OK"] and len(skipped) == 1 and "broken.wav" in skipped[0]
    with pytest.raises(AudioLoadError, match="missing.wav"):
        hubdata.decode_audio({"bytes": None, "path": str(tmp_path / "missing.wav")}, where="row 7")


def test_open_dataset_errors(local_sets, tmp_path):
    with pytest.raises(ValueError, match="no audio column 'sound'"):
        open_dataset(str(local_sets["librispeech"]), audio_column="sound", cache_dir=str(local_sets["cache"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        open_dataset(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------ tasks
def test_hub_kws_task(local_sets):
    from esc.tasks.hub import HubKeywordSpottingTask

    b = hub.build_ast_speechcommands(tiny=True)
    task = HubKeywordSpottingTask(path=str(local_sets["speech_commands"]), train_max_samples=None, eval_batch_size=4,
                                  calibration_batch_size=2, progress=False)
    task.prepare(b)
    assert task.data_hashes and task.load_data_hashes() is None  # hub data: pinned by revisions, not rehashed
    assert task.test_labels.tolist() == sorted(task.test_labels.tolist())  # folder order: no, no, yes, yes
    assert [b.labels[i] for i in task.test_labels] == ["no", "no", "yes", "yes"]  # mapped by name to the model
    fp = task.evaluate(b.model)
    logits = b.model(task.test_features)
    assert fp["accuracy"] == pytest.approx(100 * float((logits.argmax(1) == task.test_labels).float().mean()))
    data = task.calibration_data(4, seed=0)
    assert data.num_samples == 4 and data.loss(data.forward(b.model, data.batches[0]), data.batches[0]).shape == (2,)


def test_hub_tagging_task(local_sets):
    from esc.tasks.hub import HubTaggingTask

    b = hub.build_ast_audioset(tiny=True, labels=["Dog", "Rain", "Speech"])
    task = HubTaggingTask(path=str(local_sets["esc50"]), test_folds=[1, 2], calibration_folds=[5],
                          class_map={"dog": "Dog", "rain": "Rain"}, cache_dir=str(local_sets["cache"]),
                          data_dir=str(local_sets["root"] / "esc50_fp32"), progress=False)
    task.prepare(b)
    assert task.data_hashes and task.load_data_hashes() is None  # hub data: pinned by revisions, not rehashed
    out = task.evaluate(b.model)
    assert out["top1_agreement"] == 1.0 and 0 < out["mAP"] <= 1
    assert task.test_labels.tolist() == [[1, 0], [0, 1], [0, 1]]
    assert list((local_sets["root"] / "esc50_fp32").glob("fp32-*.npz"))  # FP32 scores cached under data_dir
    data = task.calibration_data(2, seed=0)
    assert data.num_samples == 2
    with pytest.raises(ValueError, match="overlap"):
        HubTaggingTask(test_folds=[1, 5], calibration_folds=[5])


@pytest.mark.parametrize("build", CTC)
def test_hub_ctc_asr_task(local_sets, build):
    from esc.tasks.hub import HubCTCASRTask

    b = build(tiny=True)
    task = HubCTCASRTask(path=str(local_sets["librispeech"]), train_split="train", eval_batch_size=3,
                         calibration_batch_size=2, cache_dir=str(local_sets["cache"]), progress=False)
    task.prepare(b)
    fp = task.evaluate(b.model)
    # the task's WER equals jiwer on the decoder's own transcripts of each clip alone
    import jiwer

    hyps = []
    for c in task.test_clips:
        f = b.frontend(torch.from_numpy(c.wave)[None])
        hyps.append(task.normalizer(b.extras["decode"](b.model(f), b.extras["output_lengths"]([len(c.wave)]))[0]))
    refs = [task.normalizer(c.text) for c in task.test_clips]
    assert fp["WER"] == pytest.approx(jiwer.wer(refs, [h for h in hyps]), abs=1e-6)
    data = task.calibration_data(4, seed=0)
    loss = data.loss(data.forward(b.model, data.batches[0]), data.batches[0])
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    q = quantize_model(b.model)
    MinMaxCalibrator().calibrate(q, data)
    assert np.isfinite(task.evaluate(q)["WER"])


def test_hub_whisper_asr_task(local_sets):
    from esc.tasks.hub import HubASRTask

    b = hub.build_whisper_hub(tiny=True, encoder_frames=200, max_new_tokens=3)
    task = HubASRTask(path=str(local_sets["librispeech"]), train_split="train", max_test_clips=2, eval_batch_size=2,
                      calibration_batch_size=2, cache_dir=str(local_sets["cache"]), progress=False)
    task.prepare(b)
    assert task.data_hashes and task.load_data_hashes() is None  # hub data: pinned by revisions, not rehashed
    assert len(task.test_clips) == 2 and np.isfinite(task.evaluate(b.model)["WER"])
    assert task.calibration_data(2, seed=0).num_samples == 2


# ------------------------------------------------------------------------------ paper grid, reproduce
def test_paper_grid_composes():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from esc.config import compose

    cfg = compose(["+experiment=paper"])
    params = cfg.hydra.sweeper.params
    assert params["precision"] == "w8a8,w4a4" and params["calibrator"] == "minmax,percentile,entropy,mse,esc"
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    jobs = BasicSweeper.split_arguments(overrides, None)[0]
    pairs = sorted({j[0] for j in jobs})
    assert len(jobs) == len(pairs) * 2 * 5 and len(pairs) == 8
    for pair in pairs:
        c = compose(["+experiment=paper", pair, "precision=w4a4", "calibrator=esc"])
        model, task = c.model._target_, c.task._target_
        assert c.study == "paper" and model.startswith("esc.models.hub.") and task.startswith("esc.tasks.hub.")
        expected = {"build_ast_speechcommands": "HubKeywordSpottingTask", "build_ast_audioset": "HubTaggingTask",
                    "build_wav2vec2_ctc": "HubCTCASRTask", "build_conformer_ctc": "HubCTCASRTask",
                    "build_whisper_hub": "HubASRTask"}[model.rsplit(".", 1)[1]]
        assert task.rsplit(".", 1)[1] == expected, pair


def test_reproduce_offline_exits_2_with_message():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "esc.reproduce"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "internet access to the Hugging Face hub" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    for model_id in hub.HUB_IDS.values():
        assert model_id in proc.stderr
    assert "openslr/librispeech_asr" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_hub_loads_say_what_is_needed(tmp_path):
    code = ("from esc.models.hub import build_conformer_ctc\nfrom esc.data.hub_access import HubUnavailableError\n"
            "from esc.data.hub import load_librispeech\n"
            "for f in (build_conformer_ctc, lambda: load_librispeech(cache_dir=%r)):\n"
            "    try:\n        f()\n    except HubUnavailableError as e:\n        print('MSG', e)\n" % str(tmp_path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    msgs = [l for l in proc.stdout.splitlines() if l.startswith("MSG")]
    assert proc.returncode == 0 and len(msgs) == 2, proc.stderr[-2000:]
    assert "facebook/wav2vec2-conformer-rope-large-960h-ft" in msgs[0] and "conformer_ctc_tiny" in msgs[0]
    assert "openslr/librispeech_asr/clean[test]" in msgs[1]
    assert all("internet access to the Hugging Face hub" in m and "HF_HUB_OFFLINE=1" in m for m in msgs)


def test_reproduce_checks(monkeypatch, tmp_path):
    from esc import reproduce

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    problems = reproduce.missing_requirements(timeout=1.0, min_free_gb=1e9)
    assert len(problems) == 2
    assert "did not answer" in problems[0] and "127.0.0.1:9" in problems[0]
    assert "GB free under" in problems[1] and str(tmp_path / "hf") in problems[1]
    assert reproduce.missing_requirements(timeout=1.0, min_free_gb=0.0, allow_offline=True) == []
    assert reproduce.main(["--timeout", "1", "--min-free-gb", "0", "--check-only"]) == 2


@pytest.mark.parametrize("task_class,extras,message", [
    ("CTCASRTask", {"prompt_ids": [1], "eos_id": 2, "tokenizer": None}, "is not a CTC model.*HubASRTask"),
    ("ASRTask", {"decode": None, "output_lengths": None, "blank_id": 0}, "is not a Whisper-style model.*HubCTCASRTask"),
])
def test_asr_task_and_model_decoder_mismatch_names_the_fix(task_class, extras, message):
    """task=librispeech_clean (CTC) with Whisper, or a Whisper ASR task with a CTC model: one sentence with the fix."""
    from esc.core.bundle import ModelBundle
    from esc.core.errors import UserError
    from esc.tasks import asr, hub as hubtasks

    cls = getattr(hubtasks, task_class, None) or getattr(asr, task_class)
    bundle = ModelBundle("m", nn.Identity(), lambda w: w, extras=extras)
    with pytest.raises(UserError, match=message):
        cls(data_dir=None).prepare(bundle)
