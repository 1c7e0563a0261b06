"""NoisyQuant (Liu et al., CVPR 2023): a fixed uniform noisy bias on Linear inputs, its amplitude searched per tensor."""
from __future__ import annotations

import logging
import weakref
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from esc.calibrators.base import CalibrationData
from esc.ptq.base import PTQMethod
from esc.ptq.common import first_batch_outputs, forward_order, outputs_match, require_quantized, run_batches
from esc.quant.model import QuantizedModel
from esc.quant.modules import QuantLayerNorm, QuantLinear
from esc.quant.quantizer import QuantizationError, UniformQuantizer
from esc.quant.roles import ROLES

log = logging.getLogger(__name__)


class NoisyInput(nn.Module):
    """An activation quantizer that reads ``x + noise``: ``forward(x) = quantizer(x + noise)``.

    Put in every slot of one quantizer by :class:`NoisyQuant`, which also subtracts ``W_q noise`` from the
    bias of each Linear reading it, so such a Linear computes ``W_q Q(x + n) + b - W_q n``. Its own output
    coming back (a LayerNorm output slot, then the Linears reading that tensor) passes unchanged, as a
    shared quantizer's does. The wrapped quantizer keeps its name and scale (``QuantizedModel``, the
    summary and the ONNX export still find it).
    """

    def __init__(self, quantizer: UniformQuantizer, noise: torch.Tensor) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("noise", noise)
        self._last: Optional[tuple] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last[0]() if self._last is not None else None
        if last is not None and x is last and x._version == self._last[1]:
            return x
        out = self.quantizer(x + self.noise)
        self._last = (weakref.ref(out), out._version)
        return out


class NoisyQuant(PTQMethod):
    """NoisyQuant (Liu et al., "NoisyQuant: Noisy Bias-Enhanced Post-Training Activation Quantization for
    Vision Transformers", CVPR 2023; official code github.com/kriskrisliu/NoisyQuant, ``fast_quant.py``).

    Stage ``after``. Touches: the ``bias`` of each Linear reading a treated tensor (one is added where
    missing) and every slot of the tensor's quantizer (wrapped in :class:`NoisyInput`); scales and weights
    are unchanged.

    Definition, per activation quantizer ``Q`` (per-tensor uniform, enabled, scale ``s``, its ``role`` in
    ``roles``) on the input of a quantized Linear, in forward order (each searched with the earlier
    ones in place): draw ``u ~ U(-1, 1)`` per input channel, once (generator seeded with ``seed``); for
    ``k`` in ``{max_amplitude * i / steps : i = 0..steps}`` the noisy bias is ``n_k = k s u`` (so
    ``n ~ U(-k s, k s)``, the same for every token and clip) and its error is
    ``E(k) = mean over rows and output channels of ((Q(x + n_k) - n_k - x) W_q^T)^2``, with ``x`` the rows
    (the positions of every calibration clip) of the tensor ``Q`` reads in the quantized model and ``W_q``
    the quantized weights of every Linear reading through ``Q``, stacked. The ``k`` of least ``E`` (the
    smallest on ties; ``k = 0`` is a candidate, so the calibration error never rises) is kept: ``Q``
    then reads ``x + n`` and each reader's bias becomes ``b - W_q n`` (the paper's denoising bias), so a
    reader computes ``W_q (Q(x + n) - n) + b``. The fold uses the weight quantizer as set at ``apply``;
    run later with weight quantization off, a layer keeps a residual ``(W - W_q) n``.

    Only the readers' biases can remove the noise, so a quantizer is treated only where its slots are
    Linear inputs and LayerNorm outputs (a shared quantizer quantizes a LayerNorm output once for the
    Linears reading it); quantizers that also sit on an attention operand are left as they are, and a
    check reverts a tensor whose noise is not removed (a reader the slots do not show, e.g. a residual
    add reading a LayerNorm output): with activation quantization off, the model's outputs on the
    first calibration batch must stay within ``rtol`` (of their max magnitude) of the untreated ones.

    Carried over from ViTs: rows are the (clip, position) tokens, as ViT patch tokens; a tensor read by
    several Linears (Hugging Face's separate query/key/value projections reading one LayerNorm output
    through one shared quantizer) gets one noise, searched on the summed error of its readers, as ViT's
    fused ``qkv`` Linear does. Conv front ends are not treated (NoisyQuant is defined for Linear
    inputs); ``roles`` defaults to ``conv_linear_input``, which leaves the head out (the official code
    skips the module named ``head``). ``max_rows`` (a seeded random subset of the rows) bounds the
    search's cost; the official code searches on its first calibration batch. Deviations: the official
    code draws ``torch.randn_like(...) * 2 - 1`` (Gaussian), taken here as a slip for the paper's uniform
    noise; its optional search of a mean shift (``--search_mean``) is not implemented; its grid is
    ``k = i / 1000, i = 0..1999`` (``max_amplitude=2, steps=2000``), the CPU default here is
    ``steps=200``. ``stats`` holds, per treated quantizer, ``amplitude`` (``k``), ``error_nearest``
    (``E(0)``) and ``error_noisy`` (``E(k)``).
    """

    name = "noisyquant"
    stage = "after"

    def __init__(self, max_amplitude: float = 2.0, steps: int = 200, roles: Sequence[str] = ("conv_linear_input",),
                 max_rows: int = 8192, seed: int = 0, rtol: float = 1e-4) -> None:
        if max_amplitude < 0 or steps < 1 or max_rows < 1:
            raise QuantizationError(f"NoisyQuant: need max_amplitude >= 0, steps >= 1 and max_rows >= 1 "
                                    f"(got {max_amplitude}, {steps}, {max_rows})")
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise QuantizationError(f"NoisyQuant: unknown roles {sorted(unknown)}; use some of {list(ROLES)}")
        self.max_amplitude, self.steps, self.roles, self.max_rows, self.seed = max_amplitude, steps, tuple(roles), max_rows, seed
        self.rtol = rtol
        self.stats: dict[str, dict[str, float]] = {}

    def eligible(self, quantizer: nn.Module) -> bool:
        """Whether a Linear's input quantizer gets a noisy bias (see the class docstring)."""
        return (type(quantizer) is UniformQuantizer and quantizer.enabled and quantizer.is_calibrated
                and not quantizer.population_size and quantizer.granularity == "tensor" and quantizer.role in self.roles)

    def apply(self, model: nn.Module, data: CalibrationData) -> None:
        """Search and insert the noisy bias of every eligible Linear input tensor, in forward order."""
        qmodel = require_quantized(model, self.name)
        linears = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
        quantizers: dict[int, UniformQuantizer] = {}  # each eligible input quantizer once, in forward order
        for name in forward_order(qmodel, data, linears):
            q = linears[name].input_quantizer
            if self.eligible(q):
                quantizers.setdefault(id(q), q)
        reference = self._outputs(qmodel, data)
        generator = torch.Generator().manual_seed(self.seed)
        self.stats = {}
        for quantizer in tqdm(list(quantizers.values()), desc=self.name, leave=False):
            slots = [(m, attr) for m in qmodel.modules() for attr, child in m._modules.items() if child is quantizer]
            if not all((isinstance(m, QuantLinear) and attr == "input_quantizer") or
                       (isinstance(m, QuantLayerNorm) and attr == "output_quantizer") for m, attr in slots):
                log.info("%s: %s also quantizes a tensor no Linear bias can denoise (an attention operand); left as is",
                         self.name, quantizer.name)
                continue
            readers = [m for m, _ in slots if isinstance(m, QuantLinear)]
            rows = self.rows(qmodel, data, quantizer, generator)
            u = torch.rand(rows.shape[-1], generator=generator).to(rows) * 2 - 1
            with torch.no_grad():
                weight = torch.cat([layer.quantized_weight().detach() for layer in readers])
                k, errors = self.search(quantizer, rows, weight, u)
                saved = [(layer, None if layer.bias is None else layer.bias.detach().clone()) for layer in readers]
                self._insert(slots, readers, NoisyInput(quantizer, k * quantizer.scale.reshape(()) * u))
            if not outputs_match(reference, self._outputs(qmodel, data), self.rtol):
                log.warning("%s: the noisy bias of %s changed the model's output with activation quantization off (its "
                            "tensor has a reader other than a Linear); reverted", self.name, quantizer.name)
                self._revert(slots, saved, quantizer)
                continue
            self.stats[quantizer.name] = {"amplitude": k, "error_nearest": errors[0], "error_noisy": min(errors)}
        log.info("%s: noisy bias on %d input tensors", self.name, len(self.stats))

    @staticmethod
    def _insert(slots: list[tuple[nn.Module, str]], readers: list[nn.Module], wrapper: NoisyInput) -> None:
        """Put ``wrapper`` in every slot and subtract ``W_q noise`` from each reader's bias (adding a zero bias where missing)."""
        for layer in readers:
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device),
                                          requires_grad=layer.weight.requires_grad)
            layer.bias.sub_(layer.quantized_weight() @ wrapper.noise)
        for module, attr in slots:
            setattr(module, attr, wrapper)

    @staticmethod
    def _revert(slots: list[tuple[nn.Module, str]], saved: list, quantizer: UniformQuantizer) -> None:
        """Undo :meth:`_insert`: the quantizer back in its slots, the saved biases back."""
        for module, attr in slots:
            setattr(module, attr, quantizer)
        with torch.no_grad():
            for layer, bias in saved:
                if bias is None:
                    layer.bias = None
                else:
                    layer.bias.copy_(bias)

    @staticmethod
    def _outputs(qmodel: QuantizedModel, data: CalibrationData) -> list[torch.Tensor]:
        """The model's outputs on the first calibration batch with activation quantization off."""
        with qmodel.quant_state(activations=False):
            return first_batch_outputs(qmodel, data)

    def rows(self, qmodel: QuantizedModel, data: CalibrationData, quantizer: UniformQuantizer,
             generator: torch.Generator) -> torch.Tensor:
        """Every tensor ``quantizer`` reads over the calibration set (each once, through its observer), as
        ``[rows, channels]`` (at most ``max_rows``, a seeded random subset)."""
        seen: list[torch.Tensor] = []
        with qmodel.quant_state(observers={quantizer.name: seen.append}):
            run_batches(qmodel, data)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen])
        if x.shape[0] > self.max_rows:
            x = x[torch.randperm(x.shape[0], generator=generator)[:self.max_rows].to(x.device)]
        return x

    def search(self, quantizer: UniformQuantizer, x: torch.Tensor, weight: torch.Tensor,
               u: torch.Tensor) -> tuple[float, list[float]]:
        """The amplitude ``k`` of least output error ``E(k)`` (class docstring) and ``E`` on the whole grid."""
        s = quantizer.scale.reshape(())
        errors = []
        for i in range(self.steps + 1):
            n = self.max_amplitude * i / self.steps * s * u
            errors.append(float(((quantizer(x + n) - n - x) @ weight.T).pow(2).mean()))
        best = min(range(len(errors)), key=errors.__getitem__)
        return self.max_amplitude * best / self.steps, errors
