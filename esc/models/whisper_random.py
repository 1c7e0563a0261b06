"""Random CTranslate2 Whisper variables in the layout of the real files: the weights of the tiny test Whisper."""
from __future__ import annotations

from typing import Optional

import numpy as np

from esc.models.whisper_tokenizer import char_tokenizer


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
