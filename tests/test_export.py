"""ONNX QDQ export and onnxruntime integer execution (esc.export.onnx, the run option ``export=``)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from hydra.utils import instantiate
from onnx import numpy_helper
from torch import nn

from conftest import TinyAudioModel, make_audio_batches
from esc.calibrators.base import CalibrationData, use_unsigned_for_nonnegative
from esc.calibrators.minmax import MinMaxCalibrator
from esc.calibrators.percentile import PercentileCalibrator
from esc.config import compose
from esc.export.onnx import ExportError, OnnxRuntimeModel, export_mode, export_onnx, metadata, op_kinds
from esc.quant.model import QuantSpec, quantize_model
from esc.quant.quantizer import UniformQuantizer
from esc.run import run


class QuantizedOutput(nn.Module):
    """:class:`TinyAudioModel` ending in a LayerNorm, so the output lies on its output quantizer's grid."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.norm = TinyAudioModel(), nn.LayerNorm(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(x))


def calibrated(model: nn.Module, calibrator=None, weight_bits: int = 8, activation_bits: int = 8):
    """``model`` quantized (per-channel weights, per-tensor activations, unsigned grids for
    non-negative tensors) and calibrated on three seeded batches."""
    data = CalibrationData(make_audio_batches(), forward=lambda m, x: m(x))
    qmodel = quantize_model(model.eval(), QuantSpec(weight_bits, True, "channel"), QuantSpec(activation_bits, True, "tensor"))
    use_unsigned_for_nonnegative(qmodel, data)
    (calibrator or MinMaxCalibrator()).calibrate(qmodel, data)
    return qmodel


def unseen_batch() -> torch.Tensor:
    return make_audio_batches(num_batches=1, batch=16, seed=7)[0]


def test_int8_outputs_match_fake_quant_within_one_output_step(tmp_path):
    qmodel = calibrated(QuantizedOutput())
    path = export_onnx(qmodel, make_audio_batches()[0], tmp_path / "m.onnx")
    x = unseen_batch()
    with torch.no_grad():
        fake = qmodel(x)
    int8 = OnnxRuntimeModel(path)(x)
    step = float(qmodel.activation_quantizers["norm.output_quantizer"].scale)
    assert int8.shape == fake.shape and int8.dtype == torch.float32
    assert float((int8 - fake).abs().max()) <= step * (1 + 1e-5)


def test_int8_execution_equals_the_exported_grids_and_differs_from_fake_quant_only_by_the_level_minus_128(tmp_path):
    # percentile clipping saturates negative activations: ONNX's int8 grid reaches -128 where esc's narrow
    # symmetric grid stops at -127; export_mode computes the exported grids in torch
    qmodel = calibrated(QuantizedOutput(), PercentileCalibrator(99.0))
    path = export_onnx(qmodel, make_audio_batches()[0], tmp_path / "m.onnx")
    x = unseen_batch()
    with torch.no_grad():
        fake = qmodel(x)
        with export_mode(qmodel):
            exported = qmodel(x)
    int8 = OnnxRuntimeModel(path)(x)
    torch.testing.assert_close(int8, exported, rtol=0, atol=1e-6)
    assert not torch.equal(exported, fake)


def nodes_in_scope(proto: onnx.ModelProto, path: str) -> list[onnx.NodeProto]:
    """The nodes that the TorchScript exporter named after module ``path`` (state-dict path)."""
    scope = "/" + path.replace(".", "/") + "/"
    return [n for n in proto.graph.node if n.name.startswith(scope)]


def constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer values by name, also under the outputs of the ``Identity`` nodes that the exporter
    puts in place of initializers it deduplicated (equal values)."""
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    values.update({n.output[0]: values[n.input[0]] for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in values})
    return values


def test_every_enabled_quantizer_is_a_qdq_pair_and_weights_are_int8(tmp_path):
    qmodel = calibrated(TinyAudioModel())
    qmodel.activation_quantizers["head.input_quantizer"].enabled = False
    proto = onnx.load(str(export_onnx(qmodel, make_audio_batches()[0], tmp_path / "m.onnx")))
    inits = constants(proto)
    for name, q in qmodel.activation_quantizers.items():
        nodes = nodes_in_scope(proto, f"model.{name}")
        if not q.enabled:
            assert nodes == []
            continue
        assert [n.op_type for n in nodes] == ["QuantizeLinear", "DequantizeLinear"], name
        quant, dequant = nodes
        assert dequant.input[0] == quant.output[0] and list(dequant.input[1:]) == list(quant.input[1:])
        scale, zero_point = inits[quant.input[1]], inits[quant.input[2]]
        assert scale.shape == () and scale == pytest.approx(float(q.scale), rel=1e-7)
        assert zero_point.dtype == (np.int8 if q.signed else np.uint8) and zero_point == 0
    assert not all(q.signed for q in qmodel.activation_quantizers.values())  # both grids are exercised
    weights = dict(qmodel.model.named_modules())
    for name, q in qmodel.weight_quantizers.items():
        nodes = nodes_in_scope(proto, f"model.{name}")
        assert [n.op_type for n in nodes] == ["DequantizeLinear"], name
        qweight, scale = inits[nodes[0].input[0]], inits[nodes[0].input[1]]
        w = weights[name.removesuffix(".weight_quantizer")].weight.detach().numpy()
        assert qweight.dtype == np.int8 and qweight.shape == w.shape and np.abs(qweight).max() <= 127
        assert scale.shape == (w.shape[0],) and {a.i for a in nodes[0].attribute if a.name == "axis"} == {0}
        np.testing.assert_array_equal(qweight, np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127))
    assert json.loads(metadata(tmp_path / "m.onnx")["quantizers"]).keys() == {
        f"model.{n}" for n, q in {**qmodel.activation_quantizers, **qmodel.weight_quantizers}.items() if q.enabled}


def test_low_bit_weights_stay_exact_in_int8_but_low_bit_activations_are_refused(tmp_path):
    qmodel = calibrated(QuantizedOutput(), weight_bits=4)
    x = unseen_batch()
    with torch.no_grad():
        fake = qmodel(x)
    int8 = OnnxRuntimeModel(export_onnx(qmodel, x, tmp_path / "w4a8.onnx"))(x)
    assert float((int8 - fake).abs().max()) <= float(qmodel.activation_quantizers["norm.output_quantizer"].scale) * (1 + 1e-5)
    with pytest.raises(ExportError, match=r"quantizer 'conv1\.input_quantizer' has a 6-bit grid.*8-bit activations"):
        export_onnx(calibrated(TinyAudioModel(), activation_bits=6), x, tmp_path / "a6.onnx")


class Log2Quantizer(UniformQuantizer):
    """Rounds to powers of two: not a grid QuantizeLinear can express."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * torch.exp2(torch.round(torch.log2(x.abs().clamp_min(1e-8))))


def test_a_quantizer_that_is_not_a_uniform_grid_is_refused_by_name(tmp_path):
    qmodel = calibrated(TinyAudioModel())
    old = qmodel.model.av.a_quantizer
    log2 = Log2Quantizer(8, True, False, name="av.a_quantizer")
    log2.set_scale(old.scale)
    qmodel.model.av.a_quantizer = log2
    with pytest.raises(ExportError, match=r"quantizer 'av\.a_quantizer' \(Log2Quantizer\) does not compute the uniform"):
        export_onnx(qmodel, unseen_batch(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class CumulativeMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.fc(x), dim=1).values


def test_an_unsupported_operator_is_named(tmp_path):
    qmodel = quantize_model(CumulativeMax().eval())
    MinMaxCalibrator().calibrate(qmodel, CalibrationData([torch.randn(4, 4)], forward=lambda m, x: m(x)))
    with pytest.raises(ExportError, match=r"cannot export QuantizedModel to ONNX: .*'aten::cummax'"):
        export_onnx(qmodel, torch.randn(2, 4), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnxruntime_fuses_linear_and_matmul_into_integer_kernels_and_keeps_layernorm_float(tmp_path):
    qmodel = calibrated(TinyAudioModel())
    path = export_onnx(qmodel, make_audio_batches()[0], tmp_path / "m.onnx")
    OnnxRuntimeModel(path, optimized_path=tmp_path / "opt.onnx")
    kinds = op_kinds(tmp_path / "opt.onnx", [unseen_batch()])
    assert kinds["integer"]["QLinearMatMul"] + kinds["integer"]["MatMulIntegerToFloat"] >= 5  # qkv, proj, fc1, fc2, Q@K^T, A@V
    assert kinds["float"]["LayerNormalization"] == 3 and kinds["float"]["Softmax"] == 1
    assert "QLinearMatMul" not in kinds["float"]


def test_run_option_exports_with_the_row_key_and_the_task_evaluates_the_int8_model(tmp_path):
    overrides = ["model=ast_tiny", "task=kws_tiny", "calibration.num_samples=8", "torch_threads=1",
                 f"paths.rows={tmp_path}/rows", f"paths.data={tmp_path}/data", f"paths.cache={tmp_path}/cache", f"export={tmp_path}/export"]
    cfg = compose(overrides)
    row = run(cfg)
    path = tmp_path / "export" / f"{row['key']}.onnx"
    meta = metadata(path)
    assert meta["row_key"] == row["key"] and json.loads(meta["axes"])["calibrator"] == row["axes"]["calibrator"]
    assert meta["git_commit"] == row["git_commit"]

    bundle, task = instantiate(cfg.model), instantiate(cfg.task)
    task.prepare(bundle)
    int8 = task.evaluate(OnnxRuntimeModel(path))
    fake = np.load(tmp_path / "rows" / "default" / f"{row['key']}.samples.npz")["quantized/prediction"]
    assert np.mean(int8["per_sample"]["prediction"] == fake) >= 0.9

    path.unlink()  # a finished row whose export is missing runs again (calibration from the cache) and exports
    assert run(cfg)["calibration_cached"] and metadata(path)["row_key"] == row["key"]
