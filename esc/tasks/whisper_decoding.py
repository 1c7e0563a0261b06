"""Whisper's decoder driven directly: greedy decoding with a KV cache, and teacher forcing on given transcripts.

Used by the ASR task (:mod:`esc.tasks.asr`) for its metric (greedy transcripts) and its calibration
loss (teacher-forced logits). A quantized model with a float prompt prefix (``scope.float_prefix``)
runs the fixed prompt positions with its decoder quantizers off (:func:`prompt_prefix`).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from esc.tasks.asr_fitness import IGNORE


@torch.no_grad()
def greedy_decode(model: nn.Module, features: torch.Tensor, prompt_ids: Sequence[int], eos_id: int,
                  max_new_tokens: int, suppress_ids: Sequence[int] = (), suppress_ids_begin: Sequence[int] = ()) -> list[list[int]]:
    """Greedy transcripts (token ids after the prompt, without ``eos_id``) of a batch of features.

    ``model`` is a ``WhisperForConditionalGeneration`` or a :class:`~esc.quant.model.QuantizedModel`
    wrapping one (called with keyword arguments; the encoder runs once, the decoder uses its KV cache).
    """
    b = features.shape[0]
    ids = torch.tensor(list(prompt_ids), dtype=torch.long).repeat(b, 1)
    with prompt_prefix(model):
        out = model(input_features=features, decoder_input_ids=ids, use_cache=True)
    cache, enc = out.cache, out.encoder_last_hidden_state
    finished = torch.zeros(b, dtype=torch.bool)
    tokens: list[torch.Tensor] = []
    suppress = torch.tensor(list(suppress_ids), dtype=torch.long)
    begin = torch.tensor(list(suppress_ids_begin), dtype=torch.long)
    logits = out.logits[:, -1].float()
    for step in range(max_new_tokens):
        if len(suppress):
            logits[:, suppress] = -float("inf")
        if step == 0 and len(begin):
            logits[:, begin] = -float("inf")
        nxt = logits.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
        tokens.append(nxt)
        finished |= nxt == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        out = model(encoder_outputs=(enc,), decoder_input_ids=nxt[:, None], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
    seqs = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(b)]
    return [s[: s.index(eos_id)] if eos_id in s else s for s in seqs]


def teacher_forcing_batch(features: torch.Tensor, transcripts: Sequence[Sequence[int]], prompt_ids: Sequence[int],
                          eos_id: int) -> dict[str, torch.Tensor]:
    """``{"input_features", "decoder_input_ids", "labels", "prompt_length"}`` for teacher forcing on ``transcripts``.

    ``decoder_input_ids[i] = prompt + transcript_i`` right-padded with ``eos_id``; ``labels[i, t]``
    is the token after position ``t`` (``transcript_i + [eos]`` from the last prompt position on),
    ``-100`` elsewhere.
    """
    p = len(prompt_ids)
    length = p + max(len(t) for t in transcripts)
    ids = torch.full((len(transcripts), length), eos_id, dtype=torch.long)
    labels = torch.full((len(transcripts), length), IGNORE, dtype=torch.long)
    for i, t in enumerate(transcripts):
        seq = list(prompt_ids) + list(t)
        ids[i, : len(seq)] = torch.tensor(seq)
        target = list(t) + [eos_id]
        labels[i, p - 1: p - 1 + len(target)] = torch.tensor(target)
    return {"input_features": features, "decoder_input_ids": ids, "labels": labels, "prompt_length": p}


def prompt_prefix(model: nn.Module):
    """The model's context for running the fixed prompt positions (a quantized model with a float
    prompt prefix keeps its decoder quantizers off there), else a no-op."""
    ctx = getattr(model, "prefix_in_float", None)
    return ctx() if ctx is not None and getattr(model, "prefix_quantizers", None) else contextlib.nullcontext()


def teacher_forced_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Decoder logits ``[B, L, vocab]`` of ``model`` teacher-forced on ``batch["decoder_input_ids"]``.

    A model with a float prompt prefix runs the ``batch["prompt_length"]`` prompt positions first
    (in :func:`prompt_prefix`, filling the KV cache) and the transcript positions after, as greedy
    decoding does; otherwise one pass over all positions.
    """
    ids = batch["decoder_input_ids"]
    if not getattr(model, "prefix_quantizers", None):
        return model(input_features=batch["input_features"], decoder_input_ids=ids, use_cache=False).logits
    p = int(batch["prompt_length"])
    with prompt_prefix(model):
        head = model(input_features=batch["input_features"], decoder_input_ids=ids[:, :p], use_cache=True)
    rest = model(encoder_outputs=(head.encoder_last_hidden_state,), decoder_input_ids=ids[:, p:], cache=head.cache, use_cache=True)
    return torch.cat([head.logits, rest.logits], dim=1)
