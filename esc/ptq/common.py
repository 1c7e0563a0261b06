"""Helpers shared by the PTQ methods: layer discovery, forward order, hook-based capture, float reference.

Everything here runs a model only through ``CalibrationData.forward`` and forward (pre-)hooks, so
it works on any model the calibrators work on (no tracing).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from esc.calibrators.base import CalibrationData
from esc.quant.model import QuantizedModel
from esc.quant.modules import QuantConv1d, QuantConv2d, QuantLinear
from esc.quant.quantizer import QuantizationError, UniformQuantizer

log = logging.getLogger(__name__)

QUANT_LAYERS = (QuantLinear, QuantConv1d, QuantConv2d)


def require_quantized(model: nn.Module, method: str) -> QuantizedModel:
    """Check that an "after" method received a :class:`QuantizedModel`."""
    if not isinstance(model, QuantizedModel):
        raise QuantizationError(f"PTQ method {method!r} acts after calibration and needs a QuantizedModel, got "
                                f"{type(model).__name__}; call it on quantize_model(...) output (stage='after')")
    return model


def quantized_layers(model: nn.Module, need_weight_quant: bool = False) -> dict[str, nn.Module]:
    """Quantized Linear/Conv layers by module path (optionally only those whose weight quantizer is on)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QUANT_LAYERS) and (not need_weight_quant or m.weight_quantizer.enabled)}


def channel_dim(layer: nn.Module) -> int:
    """Output-channel dim of a layer's output: last for Linear, 1 for Conv."""
    return -1 if isinstance(layer, nn.Linear) else 1


def out_channels(layer: nn.Module) -> int:
    """Number of output channels of a Linear/Conv layer."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def float_layer_forward(layer: nn.Module, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's float computation (no input quantizer; ``weight`` defaults to the float weight)."""
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, w, layer.bias)
    return layer._conv_forward(x, w, layer.bias)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


def run_batches(model: nn.Module, data: CalibrationData, limit: Optional[int] = None, handles: Sequence = ()) -> None:
    """Run ``data.forward`` over the calibration batches without gradients (``limit``: first few only),
    then remove the hook ``handles`` (also when a forward raises)."""
    try:
        with torch.no_grad():
            for batch in data.batches[:limit]:
                try:
                    data.forward(model, batch)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


def trace_calls(model: nn.Module, data: CalibrationData, modules: dict[str, nn.Module]) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Run the first calibration batch; return the names of ``modules`` in order of first call, each one's call
    count, and the bytes of its (first-tensor) outputs on that batch."""
    order: list[str] = []
    counts = {name: 0 for name in modules}
    nbytes = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        def pre_hook(mod, args, name=name):
            if not counts[name]:
                order.append(name)
            counts[name] += 1

        def post_hook(mod, args, out, name=name):
            with contextlib.suppress(TypeError):
                t = first_tensor(out)
                nbytes[name] += t.numel() * t.element_size()
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    run_batches(model, data, limit=1, handles=handles)
    return order, counts, nbytes


def forward_order(model: nn.Module, data: CalibrationData, modules: dict[str, nn.Module]) -> list[str]:
    """Names of ``modules`` in the order they are first called on the first calibration batch.

    Modules that are not called are dropped with a warning (they get no PTQ treatment).
    """
    order = trace_calls(model, data, modules)[0]
    missing = [n for n in modules if n not in order]
    if missing:
        log.warning("%d module(s) are not on the forward path of the calibration data and are left as is: %s",
                    len(missing), ", ".join(missing[:5]))
    return order


def detach_tree(obj: Any) -> Any:
    """Detach every tensor in a (nested) tuple/list/dict."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: detach_tree(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(detach_tree(v) for v in obj)
    return obj


def first_tensor(obj: Any) -> torch.Tensor:
    """The first tensor in a (nested) output (a block returning ``(hidden, attn)`` gives ``hidden``)."""
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError(f"no tensor in module output of type {type(obj).__name__}")


def capture(model: nn.Module, data: CalibrationData, module: nn.Module, inputs: bool = False,
            outputs: bool = False, stop: bool = False) -> tuple[list[tuple[tuple, dict]], list[torch.Tensor]]:
    """Run the calibration set once and record every call of ``module``.

    Returns ``(calls, outs)``: ``calls`` holds the detached ``(args, kwargs)`` of each call (when
    ``inputs``), ``outs`` the first tensor of each call's output (when ``outputs``). With ``stop``
    (only for modules called once per forward, see :func:`trace_calls`) each forward pass ends as
    soon as what was asked for is recorded.
    """
    calls: list[tuple[tuple, dict]] = []
    outs: list[torch.Tensor] = []
    handles = []

    def pre_hook(mod, args, kwargs):
        calls.append((detach_tree(args), detach_tree(kwargs)))
        if stop and not outputs:
            raise StopForward

    def post_hook(mod, args, out):
        outs.append(first_tensor(out).detach())
        if stop:
            raise StopForward

    if inputs:
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if outputs:
        handles.append(module.register_forward_hook(post_hook))
    run_batches(model, data, handles=handles)
    return calls, outs


def capture_outputs(model: nn.Module, data: CalibrationData, modules: list[nn.Module],
                    stop_after: Optional[nn.Module] = None) -> list[list[torch.Tensor]]:
    """One pass over the calibration set recording the (first-tensor) outputs of every call of each of
    ``modules``; with ``stop_after`` each forward pass ends once that module has produced its output."""
    outs: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []
    for i, module in enumerate(modules):
        def hook(mod, args, out, i=i):
            outs[i].append(first_tensor(out).detach())
            if mod is stop_after:
                raise StopForward
        handles.append(module.register_forward_hook(hook))
    run_batches(model, data, handles=handles)
    return outs


def all_quantizers(model: nn.Module) -> Iterator[UniformQuantizer]:
    """Every quantizer module in ``model``."""
    return (m for m in model.modules() if isinstance(m, UniformQuantizer))


@contextlib.contextmanager
def float_reference(model: nn.Module, original_weights: Optional[dict[nn.Module, torch.Tensor]] = None):
    """Run ``model`` as its float original: every quantizer off and ``original_weights`` put back.

    ``original_weights`` maps a layer to its float weight for layers whose weight a PTQ method has
    already replaced (e.g. AdaRound's rounded weights); everything is restored on exit.
    """
    quantizers = list(all_quantizers(model))
    states = [q.enabled for q in quantizers]
    swapped = {}
    try:
        for q in quantizers:
            q.enabled = False
        with torch.no_grad():
            for layer, w in (original_weights or {}).items():
                swapped[layer] = layer.weight.detach().clone()
                layer.weight.copy_(w)  # in-place under no_grad: bumps the version (weight cache stays valid)
        yield model
    finally:
        for q, s in zip(quantizers, states):
            q.enabled = s
        with torch.no_grad():
            for layer, w in swapped.items():
                layer.weight.copy_(w)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Set ``requires_grad=False`` on every parameter of ``model`` (restored on exit)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


@contextlib.contextmanager
def no_fastpath(module: nn.Module):
    """Attach a no-op forward pre-hook so fused fast paths (``nn.TransformerEncoderLayer`` in eval mode
    with frozen weights) cannot bypass the quantized sub-modules."""
    handle = module.register_forward_pre_hook(lambda mod, args: None)
    try:
        yield
    finally:
        handle.remove()


def layernorm_linear_groups(model: nn.Module, data: CalibrationData, method: str
                            ) -> tuple[dict[str, list[str]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """LayerNorm name -> the names of the Linears that read its output, and the per-channel ``(min, max)`` of each
    LayerNorm's output over all calibration data and positions (the LayerNorm -> Linear(s) pattern of
    SmoothQuant and RepQ-ViT; ``method`` names the caller in the log).

    Pattern search (a traced forward with hooks, no ``torch.fx``): a forward hook records each LayerNorm output
    tensor and a pre-hook on every ``nn.Linear`` records which LayerNorm produced its input (the very same tensor
    object, so any reshape, transpose or arithmetic in between disqualifies it). A LayerNorm (affine, 1-D
    ``normalized_shape``) forms a group with its consumer Linears when every call of each consumer reads that
    LayerNorm's output directly. Consumers the hooks cannot see (a residual add reading the LayerNorm output, a
    non-Linear layer) are not detected here: a caller that folds a transform into a group checks the float
    outputs afterwards (:func:`keep_if_outputs_match`).
    """
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    live: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (norm, output); outputs kept alive for the batch
    sources: dict[str, set] = {n: set() for n in linears}
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def norm_hook(name):
        def hook(mod, args, out):
            live[id(out)] = (name, out)
            flat = out.detach().reshape(-1, out.shape[-1])
            lo, hi = flat.amin(0), flat.amax(0)
            ranges[name] = (torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)) if name in ranges else (lo, hi)
        return hook

    def linear_hook(name):
        def hook(mod, args):
            hit = live.get(id(args[0]))
            sources[name].add(hit[0] if hit is not None and hit[1] is args[0] else None)
        return hook

    try:
        for n, m in norms.items():
            handles.append(m.register_forward_hook(norm_hook(n)))
        for n, m in linears.items():
            handles.append(m.register_forward_pre_hook(linear_hook(n)))
        with torch.no_grad():
            for batch in data.batches:
                data.forward(model, batch)
                live.clear()
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, list[str]] = {}
    for lin, src in sources.items():
        if len(src) == 1 and None not in src:
            groups.setdefault(next(iter(src)), []).append(lin)
    mixed = {s for src in sources.values() if len(src) > 1 for s in src if s is not None}
    for norm in list(groups):
        m = norms[norm]
        if norm in mixed or not m.elementwise_affine or m.weight is None or len(m.normalized_shape) != 1:
            log.info("%s: %s not treated (non-affine, multi-dim, or its consumers also read other inputs)", method, norm)
            del groups[norm]
    return groups, ranges


def keep_if_outputs_match(model: nn.Module, data: CalibrationData, reference: Optional[list[torch.Tensor]],
                          modules: Sequence[nn.Module], change, rtol: float) -> bool:
    """Run ``change()`` (an in-place edit of the ``weight`` and ``bias`` of ``modules``, which may add a missing
    ``bias``) and keep it when ``model``'s outputs on the first calibration batch still match ``reference``
    (:func:`outputs_match` with ``rtol``); otherwise put every ``weight`` and ``bias`` of ``modules`` back (an
    added bias removed) and return ``False``. ``reference=None`` keeps the change unchecked."""
    saved = [{n: None if getattr(m, n) is None else getattr(m, n).detach().clone() for n in ("weight", "bias")} for m in modules]
    with torch.no_grad():
        change()
    if reference is None or outputs_match(reference, first_batch_outputs(model, data), rtol):
        return True
    with torch.no_grad():
        for m, params in zip(modules, saved):
            for n, t in params.items():
                if t is None:
                    setattr(m, n, None)
                else:
                    getattr(m, n).copy_(t)
    return False


def _float_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _float_leaves(item)]
    return [t for t in vars(obj).values() if isinstance(t, torch.Tensor)] if hasattr(obj, "__dict__") else []


def first_batch_outputs(model: nn.Module, data: CalibrationData) -> list[torch.Tensor]:
    """Every output tensor of ``model`` on the first calibration batch (no gradients, cloned)."""
    with torch.no_grad():
        return [t.detach().clone() for t in _float_leaves(data.forward(model, data.batches[0]))]


def outputs_match(ref: list[torch.Tensor], new: list[torch.Tensor], rtol: float) -> bool:
    """Whether ``new`` equals ``ref`` tensor by tensor: same shapes, float values within ``rtol`` times each
    reference's max magnitude, other dtypes exactly (the check of function-preserving transforms)."""
    if len(ref) != len(new):
        return False
    for a, b in zip(ref, new):
        if a.shape != b.shape:
            return False
        if a.is_floating_point():
            tol = rtol * max(float(a.abs().max()), 1e-12) if a.numel() else 0.0
            if not torch.allclose(a, b, rtol=0.0, atol=tol):
                return False
        elif not torch.equal(a, b):
            return False
    return True
