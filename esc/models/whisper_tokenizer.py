"""Whisper's tokenizers (``tokenizer.json``, a byte-level one for tiny test models) and decoding settings.

Decoding settings (in ``bundle.extras``, :func:`decoding_extras`): the prompt
``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``, ``suppress_ids`` (always) and
``suppress_ids_begin`` (first step) from the CTranslate2 ``config.json``: greedy decoding matches
CTranslate2 only with both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")


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
