"""Greedy CTC decoding of the hub CTC models' logits to text, from the tokenizer's vocabulary."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class CTCGreedyDecoder:
    """Greedy CTC decoding: argmax per frame, merge repeats, drop ``blank_id``, map ids to tokens.

    The ``word_delimiter`` token becomes a space, tokens in ``drop`` (the tokenizer's special
    tokens: ``<s>``, ``</s>``, ``<unk>``, ``<pad>``) are removed, runs of spaces are merged and the
    text is stripped (what ``Wav2Vec2CTCTokenizer.batch_decode`` gives, less ``<unk>``).
    """

    def __init__(self, vocab: Sequence[str], blank_id: int = 0, word_delimiter: str = "|",
                 drop: Sequence[str] = ("<s>", "</s>", "<unk>", "<pad>")) -> None:
        self.vocab = list(vocab)
        if not 0 <= blank_id < len(self.vocab):
            raise ValueError(f"blank_id={blank_id} is outside the vocabulary of {len(self.vocab)} tokens")
        self.blank_id, self.word_delimiter, self.drop = blank_id, word_delimiter, set(drop)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "CTCGreedyDecoder":
        """From a ``Wav2Vec2CTCTokenizer`` (its vocabulary, pad token = blank, word delimiter, special tokens)."""
        vocab = tokenizer.get_vocab()
        inv = [""] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            inv[i] = tok
        drop = {t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) if t}
        return cls(inv, int(tokenizer.pad_token_id), getattr(tokenizer, "word_delimiter_token", "|") or "|", tuple(drop))

    def collapse(self, ids: Sequence[int]) -> list[int]:
        """The label sequence of frame-level ``ids``: repeats merged, then ``blank_id`` dropped (so a blank
        between two equal labels keeps both)."""
        ids = [int(i) for i in ids]
        return [t for k, t in enumerate(ids) if t != self.blank_id and (k == 0 or t != ids[k - 1])]

    def text(self, labels: Sequence[int]) -> str:
        """Text of a collapsed label sequence (:meth:`collapse`); equal neighbours are kept (``l l`` -> ``ll``)."""
        out = []
        for i in labels:
            tok = self.vocab[int(i)]
            if tok == self.word_delimiter:
                out.append(" ")
            elif tok not in self.drop:
                out.append(tok)
        return " ".join("".join(out).split())

    def decode_ids(self, ids: Sequence[int]) -> str:
        """Text of one frame-level id sequence."""
        return self.text(self.collapse(ids))

    def __call__(self, logits: torch.Tensor, lengths: Optional[Sequence[int]] = None) -> list[str]:
        """Texts of ``logits`` ``[B, frames, vocab]``; ``lengths`` (frames per row) trims the padding."""
        if logits.dim() != 3:
            raise ValueError(f"CTC logits must be [B, frames, vocab], got shape {tuple(logits.shape)}")
        ids = logits.argmax(dim=-1).cpu()
        n = [ids.shape[1]] * ids.shape[0] if lengths is None else [int(x) for x in lengths]
        return [self.decode_ids(row[:k].tolist()) for row, k in zip(ids, n)]
