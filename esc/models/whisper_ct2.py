"""Conversion of a CTranslate2 Whisper model (``WhisperSpec``) to a transformers ``WhisperForConditionalGeneration``.

The configuration is derived from the tensor shapes and the spec's scalar settings
(:func:`whisper_config_from_ct2`), the weights are renamed and split (:func:`convert_ct2_whisper`):

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
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from esc.models.ct2 import CT2FormatError, CT2Model
from esc.models.matmul_attention import add_matmul_modules

log = logging.getLogger(__name__)

#: CTranslate2 ActivationType -> transformers activation name.
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh"}


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

    def self_attention(dst: str, src: str) -> None:
        ln(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", "qkv")
        lin(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")

    e, dd = "model.encoder", "model.decoder"
    lin(f"{e}.conv1", "encoder/conv1")
    lin(f"{e}.conv2", "encoder/conv2")
    sd[f"{e}.embed_positions.weight"] = _t(ct2["encoder/position_encodings/encodings"])
    for i in range(_num_layers(ct2, "encoder")):
        src, dst = f"encoder/layer_{i}", f"{e}.layers.{i}"
        self_attention(dst, src)
        ffn(dst, src)
    ln(f"{e}.layer_norm", "encoder/layer_norm")
    sd[f"{dd}.embed_tokens.weight"] = _t(ct2["decoder/embeddings/weight"])
    sd[f"{dd}.embed_positions.weight"] = _t(ct2["decoder/position_encodings/encodings"])
    for i in range(_num_layers(ct2, "decoder")):
        src, dst = f"decoder/layer_{i}", f"{dd}.layers.{i}"
        self_attention(dst, src)
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

