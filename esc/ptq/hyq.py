"""HyQ's quantization-aware distribution scaling (QADS) of convolution inputs, folded into the float model.

HyQ's second part, the integer softmax with a linear exponential, is an option of the softmax-probability
role (``scope=paper_hyq``, :mod:`esc.quant.softmax`): it replaces a quantizer, not a weight.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import StopForward, first_batch_outputs, outputs_match, run_batches
from esc.quant.model import QuantizedModel
from esc.quant.quantizer import QuantizationError, integer_range
from esc.quant.roles import matches

log = logging.getLogger(__name__)

CONVS = (nn.Conv1d, nn.Conv2d)
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def input_channel_factor(conv: nn.Module, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha`` (one factor per input channel of ``conv``) laid out on ``conv.weight``
    ``[out, in / groups, *kernel]``: output channel ``o`` of group ``g`` reads inputs ``g * in / groups + j``."""
    out, per_group = conv.weight.shape[:2]
    groups = conv.groups
    factor = alpha.reshape(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group)
    return factor.reshape(out, per_group, *([1] * (conv.weight.dim() - 2)))


def fold(producer: nn.Module, consumer: nn.Module, alpha: torch.Tensor) -> None:
    """Divide output channel ``c`` of ``producer`` (Conv weight and bias, or BatchNorm's affine) by ``alpha_c``
    and multiply ``consumer``'s weight on input channel ``c`` by it: exact in float when every op between
    them commutes with a positive per-channel scale (ReLU, zero padding, pooling)."""
    with torch.no_grad():
        a = alpha.to(producer.weight)
        producer.weight.div_(a.reshape(-1, *([1] * (producer.weight.dim() - 1))))
        if producer.bias is not None:
            producer.bias.div_(a)
        consumer.weight.mul_(input_channel_factor(consumer, alpha.to(consumer.weight)))


def affine_minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric min-max fake quantization of ``x`` on ``2^bits`` levels (HyQ's ``act_quantize``);
    no straight-through estimator: gradients reach ``x`` only through the range."""
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp(min=torch.finfo(x.dtype).eps)
    zero_point = torch.round(-lo / scale).detach()
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, levels) - zero_point) * scale


def channel_symmetric(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric max fake quantization of a weight (HyQ's ``quantize``), range clamped at 1e-5."""
    qmax = integer_range(bits, True, True)[1]
    scale = w.abs().reshape(w.shape[0], -1).amax(1).clamp(min=1e-5).div(qmax).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round(w / scale) * scale


class HyQ(PTQMethod):
    """HyQ (Kim, Lee and Kim, "HyQ: Hardware-Friendly Post-Training Quantization for CNN-Transformer Hybrid
    Networks", IJCAI 2024), its quantization-aware distribution scaling (QADS); official code
    github.com/IDSL-SeoulTech/HyQ, ``convert_insert.py`` (``quant_loss``, ``assign_ptf``) and
    ``models/ptq/layers.py`` (``QOlc``).

    Stage ``before`` (the float model). Touches: the weight and bias of each producer (Conv or BatchNorm)
    whose output feeds a treated convolution, and that convolution's weight.

    Definition, per treated convolution ``f`` with input ``x`` (``C`` channels) of the first ``max_batches``
    calibration batches: factors ``alpha`` (``C``, from 1) minimise
    ``L(alpha) = mean((f(x; W) - f(Qa(x / alpha); Qw(W alpha)))^2)`` (``W alpha``: input channel ``c`` of
    the weight times ``alpha_c``; bias float), with ``Qa`` per-tensor asymmetric min-max on the current
    ``x / alpha`` at ``act_bits`` and ``Qw`` per-output-channel symmetric max at ``weight_bits``
    (:func:`affine_minmax`, :func:`channel_symmetric`; no straight-through rounding, so the gradient acts
    through the ranges, as in the official code); Adam (``lr``) with cosine annealing over ``iterations``
    steps; the ``alpha`` of least ``L`` seen is kept (``alpha = 1`` is the first candidate). Factors are
    clamped at ``min_alpha`` after each step, so they stay positive.

    Carried over: the official code divides the activation by ``alpha`` in a separate op (``QOlc``) in front
    of the input quantizer of the MobileViT bottlenecks' 1x1 convolutions, with weights ``W alpha``. Here
    ``1 / alpha`` is folded into the layer producing ``x`` (:func:`fold`), so the quantized network has no
    extra op and the float function is unchanged. A convolution qualifies (module path matching ``layers``,
    called once per forward) when the last Conv/BatchNorm called before it has as many output channels as
    it has inputs and folding a random positive ``alpha`` there leaves the model's outputs on the first
    calibration batch within ``rtol`` (of their max magnitude): this admits ReLU, zero padding and pooling
    in between and rejects GELU/SiLU, residual adds and other readers of the producer's output. YAMNet
    (MobileNet-v1: Conv -> ReLU -> depthwise -> ReLU -> pointwise) qualifies at every depthwise and
    pointwise convolution (depthwise weights take ``alpha`` per group); AST's patch convolution (one input
    channel, the front end's spectrogram) and Whisper's conv front end (conv1 reads the log-mel features,
    conv2 reads a GELU) have no such producer, and a model without any qualifying convolution is refused.
    The factors use their own quantizers (HyQ's loss), not the run's calibrator, so the method composes
    with every calibrator and scope. ``stats`` holds, per treated convolution, its ``producer``, the loss
    at ``alpha = 1`` and the kept loss. The official defaults: ``iterations`` 1000, ``lr`` 1e-2 (1e-1 for
    MobileViT-xxs), 8-bit activations and weights, one calibration batch.
    """

    name = "hyq"
    stage = "before"

    def __init__(self, iterations: int = 1000, lr: float = 1e-2, act_bits: int = 8, weight_bits: int = 8,
                 min_alpha: float = 1e-3, max_batches: int = 1, layers: Sequence[str] = ("*",), rtol: float = 1e-4,
                 seed: int = 0) -> None:
        if iterations < 1 or lr <= 0 or min_alpha <= 0 or max_batches < 1:
            raise QuantizationError(f"HyQ: need iterations >= 1, lr > 0, min_alpha > 0 and max_batches >= 1 "
                                    f"(got {iterations}, {lr}, {min_alpha}, {max_batches})")
        integer_range(act_bits, False, False)  # checks the bit widths
        integer_range(weight_bits, True, True)
        self.iterations, self.lr, self.act_bits, self.weight_bits = iterations, lr, act_bits, weight_bits
        self.min_alpha, self.max_batches, self.layers, self.rtol, self.seed = min_alpha, max_batches, tuple(layers), rtol, seed
        self.stats: dict[str, dict] = {}

    def candidates(self, model: nn.Module, data: CalibrationData) -> list[tuple[str, str]]:
        """``(producer, convolution)`` pairs in forward order: each convolution matching ``layers`` called once
        on the first batch, with the last Conv/BatchNorm called before it whose output has its input channels."""
        modules = {n: m for n, m in model.named_modules() if isinstance(m, PRODUCERS) and getattr(m, "affine", True)}
        events: list[tuple[str, str, int]] = []  # (kind, name, channels) in call order
        handles = []
        for name, module in modules.items():
            if isinstance(module, CONVS) and matches(name, self.layers):
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, name=name: events.append(("in", name, args[0].shape[1]))))
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: events.append(("out", name, out.shape[1]))))
        run_batches(model, data, limit=1, handles=handles)
        calls = {n: sum(1 for kind, m, _ in events if kind == "out" and m == n) for n in modules}
        pairs = []
        for i, (kind, name, channels) in enumerate(events):
            if kind != "in" or calls[name] != 1:
                continue
            before = [(m, c) for k, m, c in events[:i] if k == "out"]
            if before and before[-1][1] == channels and calls[before[-1][0]] == 1:
                pairs.append((before[-1][0], name))
        return pairs

    def conv_input(self, model: nn.Module, data: CalibrationData, conv: nn.Module) -> torch.Tensor:
        """The input of ``conv`` on the first ``max_batches`` calibration batches, concatenated on dim 0."""
        seen: list[torch.Tensor] = []

        def hook(mod, args):
            seen.append(args[0].detach())
            raise StopForward

        run_batches(model, data, limit=self.max_batches, handles=[conv.register_forward_pre_hook(hook)])
        return torch.cat(seen)

    def loss(self, conv: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``L(alpha)``: mean squared error of the quantized, rescaled convolution against its float output ``y``."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w = conv.weight.detach() * input_channel_factor(conv, alpha)
        out = conv._conv_forward(affine_minmax(x / alpha.reshape(shape), self.act_bits),
                                 channel_symmetric(w, self.weight_bits), conv.bias.detach() if conv.bias is not None else None)
        return torch.mean((out - y) ** 2)

    def search(self, conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """The factors of least ``L`` (class docstring), ``L(1)`` and that least ``L``."""
        with torch.no_grad():
            y = conv(x)
        alpha = nn.Parameter(torch.ones(x.shape[1], dtype=x.dtype, device=x.device))
        optimizer = torch.optim.Adam([alpha], lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.iterations)
        best, best_loss, first = alpha.detach().clone(), float("inf"), None
        with torch.enable_grad():
            for _ in range(self.iterations):
                optimizer.zero_grad()
                loss = self.loss(conv, x, y, alpha)
                value = loss.item()
                first = value if first is None else first
                if value < best_loss:
                    best, best_loss = alpha.detach().clone(), value
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    alpha.clamp_(min=self.min_alpha)
        return best, first, best_loss

    def try_fold(self, model: nn.Module, data: CalibrationData, producer: nn.Module, conv: nn.Module,
                 alpha: torch.Tensor, reference: list[torch.Tensor], keep: bool) -> bool:
        """Fold ``alpha`` and report whether the model's first-batch outputs still match ``reference``; the
        fold stays only when they match and ``keep`` is set."""
        saved = [(p, p.detach().clone()) for p in (producer.weight, producer.bias, conv.weight) if p is not None]
        fold(producer, conv, alpha)
        exact = outputs_match(reference, first_batch_outputs(model, data), self.rtol)
        if not (exact and keep):
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)
        return exact

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Search and fold the factors of every qualifying convolution, in forward order."""
        if isinstance(model, QuantizedModel):
            raise QuantizationError("HyQ acts on the float model before quantizers are inserted (stage='before'); "
                                    "apply it to the float model and call quantize_model afterwards")
        reference = first_batch_outputs(model, data)
        generator = torch.Generator().manual_seed(self.seed)
        self.stats = {}
        for producer_name, conv_name in tqdm(self.candidates(model, data), desc=self.name, leave=False):
            producer, conv = model.get_submodule(producer_name), model.get_submodule(conv_name)
            probe = torch.empty(conv.in_channels).uniform_(0.5, 2.0, generator=generator)
            if not self.try_fold(model, data, producer, conv, probe, reference, keep=False):
                log.info("%s: %s not treated (the ops after %s do not commute with a per-channel scale, or another "
                         "layer reads its output)", self.name, conv_name, producer_name)
                continue
            alpha, first, best = self.search(conv, self.conv_input(model, data, conv))
            if self.try_fold(model, data, producer, conv, alpha, reference, keep=True):
                self.stats[conv_name] = {"producer": producer_name, "loss_identity": first, "loss_scaled": best}
                log.info("%s: %s scaled (folded into %s): loss %.4g -> %.4g", self.name, conv_name, producer_name, first, best)
        if not self.stats:
            raise QuantizationError("HyQ: no convolution qualifies for distribution scaling; QADS needs a Conv1d/Conv2d "
                                    f"matching layers={list(self.layers)} whose input is a Conv or affine BatchNorm output, "
                                    "at most through ReLU, zero padding or pooling (see esc.ptq.hyq)")
        log.info("%s: distribution scaling folded into %d convolutions", self.name, len(self.stats))
