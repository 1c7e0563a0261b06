"""The local step's objective: the layer-output error of candidate scales of each activation quantizer."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from esc.calibrators.base import CalibrationData
from esc.calibrators.row_sample import RowSample
from esc.quant.model import QuantizedModel
from esc.quant.modules import QuantConv1d, QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul
from esc.quant.quantizer import QuantizationError, UniformQuantizer, check_finite


def _candidate_diffs(x: torch.Tensor, scales: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``fake_quant(x, s_g) - x`` for every candidate scale ``s_g``: ``[G, *x.shape]`` (symmetric, zero point 0)."""
    s = scales.view(-1, *([1] * x.dim()))
    q = torch.div(x.unsqueeze(0), s)
    q.round_().clamp_(qmin, qmax).mul_(s)
    return q.sub_(x)



class LocalErrors:
    """Accumulates, for one quantizer, the summed squared layer-output error of each candidate scale in ``scales``.

    ``layer(diff)`` maps the input error ``fake_quant(x) - x`` (``[G, *x.shape]``) to the output
    error of the layer (the layer is linear in the quantized operand, bias excluded), so
    ``layer(diff)`` equals ``out(quantized input) - out(FP input)`` (or, for Linear layers with more
    outputs than inputs, a map with the same per-candidate squared norm and ``numel_ratio`` times
    fewer elements; see :func:`_input_layer`).
    """

    def __init__(self, quantizer: UniformQuantizer, scales: torch.Tensor, max_elements: int) -> None:
        self.quantizer = quantizer
        self.scales = scales
        self.sse = torch.zeros(len(scales), dtype=torch.float64)
        self.count = 0
        self.max_elements = max_elements

    def add(self, x: torch.Tensor, layer: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Fold one FP input ``x`` of the quantizer into the error sums (``layer=None``: tensor MSE)."""
        x = x.detach().float()
        g_total = len(self.scales)
        chunk = 1  # the first candidate alone tells the output size; then chunks of <= max_elements elements
        start = 0
        while start < g_total:
            n = min(chunk, g_total - start)
            diff = _candidate_diffs(x, self.scales[start:start + n].to(x.device), self.quantizer.qmin, self.quantizer.qmax)
            err = layer(diff) if layer is not None else diff
            if start == 0:
                per = err[0].numel()
                self.count += round(per * getattr(layer, "numel_ratio", 1.0))
                chunk = max(1, self.max_elements // max(1, x.numel(), per))
            # float32 sum of squares per candidate (one pass), accumulated over batches in float64
            self.sse[start:start + n] += torch.linalg.vector_norm(err.reshape(n, -1), dim=1).double().square().cpu()
            start += n

    def mse(self) -> torch.Tensor:
        """Mean squared layer-output error of every candidate ``[G]`` (float64)."""
        return self.sse / max(self.count, 1)


def _owner_map(qmodel: QuantizedModel) -> dict[int, list[tuple[str, torch.nn.Module]]]:
    """``id(quantizer) -> [(slot kind, module), ...]`` for activation quantizers inside known quantized
    modules (a shared quantizer has one entry per slot it fills)."""
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for module in qmodel.model.modules():
        if isinstance(module, (QuantLinear, QuantConv1d, QuantConv2d)):
            slots = [("input", module.input_quantizer)]
        elif isinstance(module, QuantLayerNorm):
            slots = [("tensor", module.input_quantizer), ("tensor", module.output_quantizer)]
        elif isinstance(module, QuantMatMul):
            slots = [("matmul_a", module.a_quantizer), ("matmul_b", module.b_quantizer)]
        else:
            continue
        for kind, q in slots:
            owners.setdefault(id(q), []).append((kind, module))
    return owners


def _layer_role(entries: list[tuple[str, torch.nn.Module]]) -> tuple[str, object]:
    """The error the local step measures for a quantizer filling the slots ``entries``: through its
    consumer layer(s) (``input``: Linear inputs sharing one tensor are stacked into one map), through
    its one attention product (``matmul_a`` / ``matmul_b``), or of the tensor itself."""
    inputs = [m for kind, m in entries if kind == "input"]
    if inputs and (len(inputs) == 1 or all(isinstance(m, QuantLinear) for m in inputs)):
        return "input", inputs
    if len(entries) == 1 and entries[0][0].startswith("matmul"):
        return entries[0]
    return "tensor", None


class _LinearError:
    """``d -> d @ M^T`` with ``||d @ M^T|| = ||d @ W^T||`` per row: ``M = W`` or, when ``W`` ([out, in])
    has more rows than columns, the ``[in, in]`` factor ``R`` of ``W = QR`` (``W^T W = R^T R``), which
    is ``out / in`` times cheaper; ``numel_ratio`` restores the true output element count."""

    def __init__(self, weight: torch.Tensor) -> None:
        out_features, in_features = weight.shape
        if out_features > in_features:
            self.matrix = torch.linalg.qr(weight.detach().double(), mode="r").R.float()
            self.numel_ratio = out_features / in_features
        else:
            self.matrix, self.numel_ratio = weight.detach(), 1.0

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        return F.linear(d, self.matrix)


def _input_layer(modules: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bias-free linear map of the consumer Linear/Conv module(s) on ``[G, B, ...]`` input errors
    (weights as now quantized; several Linear consumers of one tensor: their weights stacked)."""
    with torch.no_grad():
        weights = [m.quantized_weight().detach().float() for m in modules]
    if isinstance(modules[0], QuantLinear):
        return _LinearError(torch.cat(weights, dim=0))
    module, weight = modules[0], weights[0]

    def conv(d: torch.Tensor) -> torch.Tensor:
        out = module._conv_forward(d.reshape(-1, *d.shape[2:]), weight, None)
        return out.reshape(d.shape[0], d.shape[1], *out.shape[1:])
    return conv


def _sample_rows(role: str, module: object, x: torch.Tensor) -> torch.Tensor:
    """The independent rows of a quantizer's FP input for :class:`RowSample`: tokens ``[-1, in]`` for
    Linear inputs and for tensor-MSE quantizers (the last dim), samples (dim 0) for Conv inputs."""
    if role == "input" and not isinstance(module[0], QuantLinear):
        return x
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def _matmul_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matmul operands ``[..., M, K]`` and ``[..., K, N]`` as ``[L, M, K]`` and ``[L, K, N]`` (leading dims
    broadcast and flattened): row ``l`` of the product depends on row ``l`` of each operand only."""
    if a.dim() < 2 or b.dim() < 2:
        raise QuantizationError("local step: a row sample of matmul operands needs operands with >= 2 dims; "
                                "use local_samples=None")
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return (a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:]),
            b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:]))


def _error_operand(role: str, layer: Optional[Callable], tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, Optional[Callable]]:
    """``(x, map)`` for :meth:`LocalErrors.add`: the quantized operand and the linear map of its error
    (``tensors``: the quantizer's input, or a matmul's two operands)."""
    if role == "matmul_a":
        a, b = tensors
        return a, lambda d: torch.matmul(d, b)
    if role == "matmul_b":
        a, b = tensors
        return b, lambda d: torch.matmul(a, d)
    return tensors[0], layer


class LocalObjective:
    """The local step's objective, the per-quantizer layer-output error of candidate scales (see
    :func:`esc.calibrators.local_step.local_mse_scales` for its definition).

    Construction runs one pass over the calibration set (all activation quantizers off) that
    records ``maxima`` (``max |x|`` of every quantizer's FP input) and, with ``samples`` set, a
    :class:`RowSample` of at most ``samples`` elements of what each quantizer's error needs (its
    input; both operands of a matmul, one sample per matmul). :meth:`sse` then sums the errors of
    candidate scales: with ``samples=None`` in one more pass over the whole calibration set, with
    ``samples`` on the kept rows (no forward pass). Computed once and shared by every call: the
    maxima, the row samples and each consumer layer's error map (its quantized weight, QR-reduced).
    """

    def __init__(self, qmodel: QuantizedModel, data: CalibrationData, samples: Optional[int] = None, seed: int = 0,
                 max_elements: int = 2**22) -> None:
        self.data, self.max_elements = data, max_elements
        self.quantizers = qmodel.activation_quantizers
        self.names = list(self.quantizers)
        self._qmodel = qmodel
        owners = _owner_map(qmodel)
        self.roles = {name: _layer_role(owners.get(id(q), [])) for name, q in self.quantizers.items()}
        self.layers = {name: _input_layer(module) for name, (role, module) in self.roles.items() if role == "input"}
        self.maxima = {name: torch.zeros((), dtype=torch.float32) for name in self.names}
        seen = {name: 0 for name in self.names}
        samplers = {} if samples is None else {self._key(name): RowSample(samples, seed) for name in self.names}

        def observer(name: str) -> Callable[[torch.Tensor], None]:
            role, module = self.roles[name]
            sampler = None if role.startswith("matmul") else samplers.get(name)

            def observe(x: torch.Tensor) -> None:
                check_finite(x, name)
                seen[name] += x.numel()
                if x.numel():
                    self.maxima[name] = torch.maximum(self.maxima[name], x.abs().max().float().cpu())
                if sampler is not None:
                    sampler.add(_sample_rows(role, module, x))
            return observe

        matmuls = {id(m): m for role, m in self.roles.values() if role.startswith("matmul")} if samples is not None else {}
        self._pass({name: observer(name) for name in self.names},
                   [(m, lambda a, b, s=samplers[key]: s.add(*_matmul_rows(a, b))) for key, m in matmuls.items()])
        for name in self.names:
            if seen[name] == 0:
                raise QuantizationError(f"quantizer {name!r} saw no activations on the calibration data; it is not on the "
                                        "forward path of the calibration batches (skip it in the model config)")
        self.captured = None if samples is None else {key: s.groups() for key, s in samplers.items()}

    def _key(self, name: str) -> object:
        """Whose row sample a quantizer's error uses: its own, or its matmul's (shared by both operands)."""
        role, module = self.roles[name]
        return id(module) if role.startswith("matmul") else name

    def _pass(self, observers: dict[str, Callable], hooks: list[tuple[torch.nn.Module, Callable]]) -> None:
        """One FP pass over the calibration set: ``observers[name](x)`` sees quantizer ``name``'s input,
        ``fn(a, b)`` of each ``(matmul module, fn)`` in ``hooks`` its operands (float32, detached)."""
        states = {name: q.enabled for name, q in self.quantizers.items()}

        def pre_hook(fn: Callable) -> Callable:
            return lambda module, args: fn(args[0].detach().float(), args[1].detach().float())
        handles = [m.register_forward_pre_hook(pre_hook(fn)) for m, fn in hooks]
        try:
            for name, q in self.quantizers.items():
                q.observer, q.enabled = observers.get(name), False
            with torch.no_grad():
                for batch in self.data.batches:
                    self.data.forward(self._qmodel, batch)
        finally:
            for h in handles:
                h.remove()
            for name, q in self.quantizers.items():
                q.observer, q.enabled = None, states[name]

    def sse(self, scales: dict[str, torch.Tensor]) -> dict[str, LocalErrors]:
        """The accumulated errors of the candidate scales ``scales[name]`` (``[G]`` float32) of each named
        quantizer (names with no candidates are left out)."""
        errors = {name: LocalErrors(self.quantizers[name], s, self.max_elements) for name, s in scales.items() if len(s)}
        if self.captured is not None:
            for name, acc in errors.items():
                for tensors in self.captured[self._key(name)]:
                    acc.add(*_error_operand(self.roles[name][0], self.layers.get(name), tensors))
            return errors
        observers: dict[str, Callable] = {}
        matmuls: dict[int, tuple[torch.nn.Module, list]] = {}
        for name, acc in errors.items():
            role, module = self.roles[name]
            if role.startswith("matmul"):
                matmuls.setdefault(id(module), (module, []))[1].append((role, acc))
            else:
                observers[name] = (lambda acc, layer: lambda x: acc.add(x, layer))(acc, self.layers.get(name))

        def matmul_fn(entries: list) -> Callable:
            def fn(a: torch.Tensor, b: torch.Tensor) -> None:
                for role, acc in entries:
                    acc.add(*_error_operand(role, None, (a, b)))
            return fn
        if errors:
            self._pass(observers, [(m, matmul_fn(entries)) for m, entries in matmuls.values()])
        return errors

