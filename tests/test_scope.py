"""The scope axis: op roles, named scopes, per-role bits/grid/calibrator, overrides, one quantizer per tensor."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from esc.config import CONF_DIR, compose
from esc.pipeline import calibrate, prepare, quantize, scope_of
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import Log2Quantizer, QuantizationError, UniformQuantizer
from esc.quant.roles import ROLES
from esc.quant.scope import build_scope

SCOPES = sorted(p.stem for p in (CONF_DIR / "scope").glob("*.yaml"))
TINY_RUNS = [("ast_tiny", "kws_tiny"), ("whisper_tiny_random", "asr_tiny"), ("yamnet_tiny", "tagging_tiny")]
HUB_TINY = ["ast_speechcommands_tiny", "ast_audioset_tiny", "wav2vec2_base_960h_tiny", "conformer_ctc_tiny", "whisper_base_hub_tiny"]


def pipeline_model(tmp_path, model, task, scope, *extra):
    cfg = compose([f"model={model}", f"task={task}", f"scope={scope}", f"paths.data={tmp_path}", *extra])
    bundle, t = prepare(cfg)
    data = t.calibration_data(4, 0)
    return cfg, bundle, t, data, quantize(cfg, bundle, bundle.model, data)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_every_scope_composes_with_every_model():
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    for scope in SCOPES:
        for model in models:
            cfg = compose([f"scope={scope}", f"model={model}"])
            assert cfg.scope.name == scope and set(scope_of(cfg).roles) == set(ROLES)
    assert compose([]).scope.name == "paper"  # the default scope is the paper's


@pytest.mark.parametrize("model,task", TINY_RUNS)
def test_every_quantizer_has_a_role_and_paper_rounds_no_tensor_twice(data_dir, model, task):
    cfg, bundle, t, data, q = pipeline_model(data_dir, model, task, "paper")
    quantizers = q.all_activation_quantizers
    assert quantizers and all(qz.role in ROLES for qz in quantizers.values())
    assert any(qz.role == "head" for qz in quantizers.values())  # the model's declared head is found
    calibrate(cfg, q, data, t, data_dir / f"{model}-paper.pt")
    assert rounding_repeats(q, data) == 0
    if model != "yamnet_tiny":  # transformers: the LayerNorm output feeding a projection is shared with it
        assert any(qz.shared for qz in quantizers.values())
        _, _, _, data_full, full = pipeline_model(data_dir, model, task, "full")
        calibrate(cfg, full, data_full, t, data_dir / f"{model}-full.pt")
        assert rounding_repeats(full, data_full) > 0  # the old scope did round those tensors twice


def rounding_repeats(q, data) -> int:
    """How many times one forward pass rounds a tensor (same storage, offset, shape) that some quantizer already rounded."""
    seen, repeats, alive = set(), [0], []
    originals = {}
    for qz in {id(v): v for v in q.all_activation_quantizers.values()}.values():
        def wrapped(x, scale, zp, qz=qz, fn=qz.fake_quantize):
            out = fn(x, scale, zp)
            for t in (x, out):  # a tensor and its rounded version are the same tensor rounded once
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                repeats[0] += (t is x) and key in seen
                seen.add(key)
                alive.append(t)
            return out
        originals[qz] = qz.fake_quantize
        qz.fake_quantize = wrapped
    try:
        with torch.no_grad():
            data.forward(q, data.batches[0])
    finally:
        for qz in originals:
            del qz.fake_quantize
    return repeats[0]


def test_ast_shares_the_layernorm_output_with_the_qkv_projection(data_dir):
    _, _, _, _, q = pipeline_model(data_dir, "ast_tiny", "kws_tiny", "paper")
    block = q.model.blocks[0]
    assert block.norm1.output_quantizer is block.attn.qkv.input_quantizer
    assert block.norm1.input_quantizer is not block.norm1.output_quantizer
    assert block.norm1.output_quantizer.calibrator is None  # a Linear input: the run's calibrator
    assert block.attn.av.a_quantizer.role == "attention_probs" and block.attn.av.a_quantizer.calibrator == "minmax"


def test_paper_scope_keeps_max_on_other_ops_and_run_calibrator_on_linear_inputs(data_dir):
    cfg, bundle, t, data, q = pipeline_model(data_dir, "ast_tiny", "kws_tiny", "paper", "calibrator=percentile",
                                             "calibrator.percentile=90")
    probs = q.model.blocks[0].attn.av.a_quantizer
    seen = []
    with q.quant_state(activations=False, observers={probs.name: lambda x: seen.append(float(x.abs().max()))}), torch.no_grad():
        for b in data.batches:
            data.forward(q, b)
    calibrate(cfg, q, data, t, data_dir / "percentile.pt")
    assert float(probs.clip_range[1]) == pytest.approx(max(seen), rel=1e-6)  # max calibration, unsigned grid
    lin = q.model.blocks[0].mlp[0].input_quantizer
    with q.quant_state(activations=False, observers={lin.name: lambda x: seen.append(float(x.abs().max()))}), torch.no_grad():
        seen.clear()
        data.forward(q, data.batches[0])
    assert float(lin.clip_range[1]) < 0.99 * max(seen)  # the 90th percentile clips the Linear input


@pytest.mark.parametrize("scope", ["linear", "paper_a16", "paper_log2"])
def test_named_scopes_quantize_what_they_say(data_dir, scope):
    _, _, _, _, q = pipeline_model(data_dir, "whisper_tiny_random", "asr_tiny", scope)
    by_role = {}
    for qz in q.all_activation_quantizers.values():
        by_role.setdefault(qz.role, []).append(qz)
    if scope == "linear":  # a role with null bits has no quantizer at all
        assert set(by_role) == {"conv_linear_input", "head"}
        assert not any(isinstance(m, UniformQuantizer) for n, m in q.model.named_modules() if "layer_norm" in n or "matmul" in n)
    elif scope == "paper_a16":
        assert {qz.bits for r in ("attention_qk", "attention_probs", "attention_v") for qz in by_role[r]} == {16}
        assert {qz.bits for qz in by_role["conv_linear_input"]} == {8}
    else:
        assert all(isinstance(qz, Log2Quantizer) for qz in by_role["attention_probs"])
        assert not any(isinstance(qz, Log2Quantizer) for r, qs in by_role.items() if r != "attention_probs" for qz in qs)


def test_glob_overrides_skip_modules_and_change_bits():
    from tests.models import TinyTransformer

    cfg = compose(["scope=paper"]).scope
    spec = {**dict(cfg), "overrides": [{"pattern": "head", "skip": True}, {"pattern": "ln*", "bits": None},
                                       {"pattern": "*qk", "bits": 4}]}
    scope = build_scope(spec, 8)
    q = quantize_model(TinyTransformer(), QuantSpec(8, True, "channel"), QuantSpec(8, True, "tensor"), scope=scope,
                       head=("head",))
    assert type(q.model.head) is torch.nn.Linear  # skipped: weights float too
    assert not any(n.startswith("ln") for n in q.all_activation_quantizers)
    assert {qz.bits for n, qz in q.all_activation_quantizers.items() if n.startswith("qk.")} == {4}
    with pytest.raises(QuantizationError, match="bits=3.5"):
        build_scope({**spec, "overrides": [{"pattern": "x", "bits": 3.5}]}, 8)
    with pytest.raises(QuantizationError, match="missing roles"):
        build_scope({"name": "bad", "roles": {"head": {"bits": 8}}}, 8)


@pytest.mark.parametrize("name", HUB_TINY)
def test_hub_adapters_declare_roles_and_head(name):
    bundle = instantiate(compose([f"model={name}"]).model)
    q = quantize_model(bundle.model, QuantSpec(8, True, "channel"), QuantSpec(8, True, "tensor"),
                       scope=scope_of(compose([f"model={name}", "scope=paper"])), head=bundle.head)
    roles = {qz.role for qz in q.all_activation_quantizers.values()}
    assert roles <= set(ROLES) and "head" in roles and "conv_linear_input" in roles and "layernorm_input" in roles


def test_log2_grid_known_answer():
    q = Log2Quantizer(3)  # levels s * 2^-k, k = 0..7; -log2 rounding beyond 7 maps to 0
    q.set_clip_range(torch.tensor(1.0))
    x = torch.tensor([1.0, 0.5, 0.3, 0.01, 0.001, 0.0])
    # by hand: -log2(0.3) = 1.74 -> 2 -> 0.25; -log2(0.01) = 6.64 -> 7 -> 1/128; -log2(0.001) = 9.97 -> 10 >= 8 -> 0
    assert q(x).tolist() == [1.0, 0.5, 0.25, 2 ** -7, 0.0, 0.0]
    with pytest.raises(QuantizationError, match="negative"):
        q(torch.tensor([-0.1]))


def test_shared_quantizer_rounds_and_observes_a_tensor_once():
    q = UniformQuantizer(4, name="s")
    q.set_clip_range(torch.tensor(1.0))
    q.shared, calls = True, []
    q.observer = calls.append
    x = torch.rand(5)
    y = q(x)
    assert q(x) is y and q(y) is y and len(calls) == 1
    x.add_(1.0)  # an in-place change makes it another tensor
    assert q(x) is not y and len(calls) == 2


def test_float_prefix_leaves_prompt_positions_float_and_quantizes_text(data_dir):
    from esc.tasks.whisper_decoding import teacher_forced_logits

    cfg, bundle, t, data, q = pipeline_model(data_dir, "whisper_tiny_random", "asr_tiny", "linear", "scope.float_prefix=true")
    assert q.prefix_quantizers and all(n.startswith(("model.decoder.", "proj_out.")) for n in q.prefix_quantizers)
    assert not any(n.startswith("model.encoder.") or ".encoder_attn.k_proj" in n for n in q.prefix_quantizers)
    assert any(".encoder_attn.q_proj" in n for n in q.prefix_quantizers) and any(".fc2." in n for n in q.prefix_quantizers)
    batch = data.batches[0]
    p, length = batch["prompt_length"], batch["decoder_input_ids"].shape[1]
    one_pass = lambda m: m(input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"],  # noqa: E731
                           use_cache=False).logits
    with torch.no_grad():
        with q.quant_state(weights=False, activations=False):  # in float, prompt-then-text equals one pass
            torch.testing.assert_close(teacher_forced_logits(q, batch), one_pass(bundle.model), atol=1e-4, rtol=1e-4)
        calibrate(cfg, q, data, t, data_dir / "prefix.pt")
        head_inputs = []
        head = q.model.proj_out.input_quantizer
        with q.quant_state(observers={head.name: lambda x: head_inputs.append(x.shape[1])}):
            quantized = teacher_forced_logits(q, batch)
        with q.prefix_in_float():  # reference: the decoder float everywhere, the encoder quantized as above
            reference = one_pass(q)
    assert head_inputs == [length - p]  # the decoder quantizers see (and were calibrated on) text positions only
    torch.testing.assert_close(quantized[:, :p], reference[:, :p], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(quantized[:, p:], reference[:, p:], atol=1e-3)


def test_float_prefix_needs_a_model_with_a_prompt(data_dir):
    with pytest.raises(Exception, match="declares no prompt prefix"):
        pipeline_model(data_dir, "ast_tiny", "kws_tiny", "paper", "scope.float_prefix=true")
