"""ONNX QDQ export of a calibrated model, and its integer execution with onnxruntime.

Export (:func:`export_onnx`) traces the model with the TorchScript ONNX exporter (``dynamo=False``:
the dynamo exporter needs ``onnxscript``, which is not a requirement here) while every *enabled*
:class:`~esc.quant.quantizer.UniformQuantizer` of the model is temporarily replaced by its ONNX
counterpart (:func:`export_mode`). Nothing depends on which positions a model quantizes:

* an **activation** quantizer becomes ``QuantizeLinear -> DequantizeLinear`` with the quantizer's
  scale (a scalar, or a vector along its ``axis`` when per-channel) and zero point, stored as the
  initializers ``<state-dict name of the quantizer>.scale`` / ``.zero_point`` (the exporter keeps
  one copy of equal initializers, the others become ``Identity`` nodes of it); the nodes are named
  after the quantizer's module scope (``/model/conv1/input_quantizer/QuantizeLinear``). The zero point's
  type fixes the integer grid: **int8** ``[-128, 127]`` for a signed grid, **uint8** ``[0, 255]``
  for an unsigned one.
* a **weight** quantizer (one of ``QuantizedModel.weight_quantizers``, applied to its parent
  module's ``weight``) becomes ``DequantizeLinear`` of an **int8 initializer** ``<name>.qweight``
  holding ``clamp(round(w / s) + z, qmin, qmax)``, with per-channel scales along the quantizer's axis.

Both use the definitions of ONNX and onnxruntime: ``q = saturate(round_half_to_even(x / s) + z)``,
``x_hat = (q - z) * s``; ``torch.round`` rounds ties to even too, so the rounding mode is the same.

What the export does with the grids ``esc`` allows:

* **Narrow signed range.** Symmetric signed quantizers clamp to ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  = ``[-127, 127]`` at 8 bits. Weights keep it exactly (their int8 values are computed here). For
  activations ONNX ``QuantizeLinear`` has no clamp bounds: it saturates to the full int8
  ``[-128, 127]``. The exported activation grid is therefore one level wider at the negative end:
  values below ``-127.5 s`` come out one step ``s`` lower (``-128 s`` instead of ``-127 s``) than in
  fake quantization, and no other value changes. This is the only intended difference between
  the export and the fake-quant model.
* **Bit widths.** Activations must be 8-bit: onnxruntime has integer kernels only for 8-bit
  activations, and int8 ``QuantizeLinear`` cannot express a narrower grid (no clamp bounds), so
  other widths are refused, not emulated. Weights of 2..8 bits are stored in int8 initializers
  holding their own grid's values (exactly the fake-quant weights; the kernels run them at int8
  speed); wider weights are refused.
* Population scales (ESC's candidate batch), quantizers without a scale, and quantizers whose
  forward does not compute the uniform affine grid above (checked on the example input, so a new
  kind of grid, e.g. log2, is refused rather than mis-exported) raise :class:`ExportError`.

Integer execution: :class:`OnnxRuntimeModel` wraps an onnxruntime CPU session as an ``nn.Module``
whose ``forward`` takes and returns torch tensors, so a task's ``evaluate(model)`` runs it exactly
as it runs the fake-quant model. :func:`op_kinds` says which ops onnxruntime's optimized graph runs
on integers and which it leaves in float.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from esc.quant.model import QuantizedModel
from esc.quant.quantizer import UniformQuantizer

OPSET = 17
ACTIVATION_BITS = 8  # the only activation width with onnxruntime integer kernels
METADATA_PREFIX = "esc."


class ExportError(ValueError):
    """Raised for a model or quantizer that the ONNX QDQ export cannot represent."""


# ------------------------------------------------------------------------------- ONNX ops
def _affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` in float (ties to even); ``s``, ``z`` broadcastable."""
    z = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, qmin, qmax) - z) * scale


def _along(t: torch.Tensor, axis: Optional[int], ndim: int) -> torch.Tensor:
    """``t`` shaped to broadcast along ``axis`` of an ``ndim``-d tensor (``axis=None``: a scalar, unchanged)."""
    if axis is None:
        return t
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return t.view(shape)


class _QuantizeDequantize(torch.autograd.Function):
    """``DequantizeLinear(QuantizeLinear(x))`` on the grid of ``zero_point``'s integer type: computed
    in torch, exported as the ONNX pair (``axis=None``: per tensor)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis):
        info = torch.iinfo(zero_point.dtype)
        return _affine(x, _along(scale, axis, x.dim()), _along(zero_point, axis, x.dim()), info.min, info.max)

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis):
        attr = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point, **attr), scale, zero_point, **attr)


class _Dequantize(torch.autograd.Function):
    """``DequantizeLinear(q)`` of an integer tensor: computed in torch, exported as the ONNX op."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):
        return (q.to(scale.dtype) - _along(zero_point, axis, q.dim()).to(scale.dtype)) * _along(scale, axis, q.dim())

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, **({} if axis is None else {"axis_i": axis}))


# ----------------------------------------------------------------------- quantizer stand-ins
def _grid(name: str, q: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor, Optional[int]]:
    """Scale (float32), zero point (int8 for a signed grid, uint8 for an unsigned one) and axis
    (``None``: per tensor) of ``q`` in ONNX form; raises :class:`ExportError` when ``q`` has none."""
    if not q.is_calibrated:
        raise ExportError(f"quantizer {name!r} has no scale; calibrate it (or disable it) before exporting")
    if q.population_size:
        raise ExportError(f"quantizer {name!r} holds {q.population_size} candidate scales (an ESC population); "
                          "set one scale vector before exporting")
    per_channel = q.granularity == "channel" and q.scale.numel() > 1
    scale = q.scale.detach().float().reshape(-1 if per_channel else ())
    dtype = torch.int8 if q.signed else torch.uint8
    zero_point = q.zero_point.detach().round().reshape(scale.shape).to(dtype)
    return scale.contiguous(), zero_point.contiguous(), (q.axis if per_channel else None)


class ActivationQDQ(nn.Module):
    """Export stand-in of an activation quantizer: ``QuantizeLinear -> DequantizeLinear`` (see the module docstring)."""

    def __init__(self, name: str, quantizer: UniformQuantizer) -> None:
        super().__init__()
        if quantizer.bits != ACTIVATION_BITS:
            raise ExportError(f"quantizer {name!r} has a {quantizer.bits}-bit grid, but onnxruntime has integer kernels "
                              f"only for {ACTIVATION_BITS}-bit activations (export W*A8 precisions only)")
        scale, zero_point, self.axis = _grid(name, quantizer)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.axis)


class WeightDQ(nn.Module):
    """Export stand-in of a weight quantizer: ``DequantizeLinear`` of the int8 weight ``qweight``.

    ``qweight`` is computed once from ``weight`` and must dequantize to exactly ``quantizer(weight)``.
    """

    def __init__(self, name: str, quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        if quantizer.bits > 8:
            raise ExportError(f"weight quantizer {name!r} has a {quantizer.bits}-bit grid, which does not fit the int8 "
                              "weights of onnxruntime's integer kernels")
        scale, zero_point, self.axis = _grid(name, quantizer)
        w = weight.detach().float()
        s, z = _along(scale, self.axis, w.dim()), _along(zero_point, self.axis, w.dim()).float()
        qweight = torch.clamp(torch.round(w / s) + z, quantizer.qmin, quantizer.qmax).to(zero_point.dtype)
        with torch.no_grad():
            expected = quantizer(weight).float()
        if not torch.equal(_Dequantize.forward(None, qweight, scale, zero_point, self.axis), expected):
            raise ExportError(f"weight quantizer {name!r} does not compute the uniform affine grid of its scale and zero "
                              f"point ({type(quantizer).__name__}), so its weights have no exact int8 form")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(self.qweight, self.scale, self.zero_point, self.axis)


def _label(path: str, q: UniformQuantizer) -> str:
    """How errors name a quantizer: its own ``name`` (its path in the quantized network), else its state-dict path."""
    return q.name or path


def enabled_quantizers(model: nn.Module) -> dict[str, tuple[str, UniformQuantizer]]:
    """Every enabled quantizer of ``model`` by state-dict path: ``(kind, quantizer)``, kind ``"weight"``
    for the ``weight_quantizers`` of any :class:`QuantizedModel` inside ``model``, else ``"activation"``."""
    weights = {id(q) for m in model.modules() if isinstance(m, QuantizedModel) for q in m.weight_quantizers.values()}
    return {name: ("weight" if id(m) in weights else "activation", m) for name, m in model.named_modules()
            if isinstance(m, UniformQuantizer) and m.enabled}


def _check_activation_grids(model: nn.Module, inputs: tuple, quantizers: Mapping[str, tuple[str, UniformQuantizer]]) -> Any:
    """Run ``model(*inputs)`` once, check that every enabled activation quantizer's output is the
    uniform affine grid of its scale and zero point (what ``QuantizeLinear`` computes); return the output."""
    def check(label: str):
        def hook(module: UniformQuantizer, args, output) -> None:
            scale, zero_point, axis = _grid(label, module)
            x = args[0]
            grid = _affine(x, _along(scale, axis, x.dim()), _along(zero_point, axis, x.dim()), module.qmin, module.qmax)
            if not torch.equal(grid, output):
                raise ExportError(f"quantizer {label!r} ({type(module).__name__}) does not compute the uniform affine grid of "
                                  f"its scale and zero point ({int((grid != output).sum())} of {output.numel()} values "
                                  "differ), which is all QuantizeLinear can represent")
        return hook

    handles = [q.register_forward_hook(check(_label(name, q))) for name, (kind, q) in quantizers.items() if kind == "activation"]
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[dict[str, str]]:
    """Replace every enabled quantizer of ``model`` by its ONNX stand-in (:class:`ActivationQDQ`,
    :class:`WeightDQ`) and restore the originals on exit; yields ``{state-dict path: kind}``."""
    quantizers = enabled_quantizers(model)
    swapped = []
    try:
        for name, (kind, q) in quantizers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if kind == "weight":
                if not isinstance(getattr(parent, "weight", None), torch.Tensor):
                    raise ExportError(f"weight quantizer {_label(name, q)!r} sits in a {type(parent).__name__} without a `weight` tensor")
                stand_in = WeightDQ(_label(name, q), q, parent.weight)
            else:
                stand_in = ActivationQDQ(_label(name, q), q)
            setattr(parent, child, stand_in)
            swapped.append((parent, child, q))
        yield {name: kind for name, (kind, _) in quantizers.items()}
    finally:
        for parent, child, q in swapped:
            setattr(parent, child, q)


# -------------------------------------------------------------------------------- export
def example_inputs(model: nn.Module, run: Callable[[], Any], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """The positional tensor arguments with which ``run()`` calls ``model`` (its first call), cut to
    ``batch`` samples along dim 0: how a task's forward callable feeds the model, without knowing it."""
    seen: list[tuple] = []

    def grab(module, args):
        if not seen:
            seen.append(args)

    handle = model.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not seen:
        raise ExportError(f"the forward callable never called the {type(model).__name__}; cannot tell its inputs")
    if not all(isinstance(a, torch.Tensor) for a in seen[0]):
        raise ExportError(f"{type(model).__name__} is called with non-tensor arguments; ONNX export needs tensor inputs")
    return tuple(a[:batch] for a in seen[0])


def export_onnx(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], path: str | Path,
                metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model`` (float, or a calibrated :class:`QuantizedModel`) to ``path`` as ONNX QDQ.

    ``inputs``: the example positional tensor(s) (dim 0 = batch; exported as a dynamic axis). The graph's
    inputs are ``input0..`` and outputs ``output0..``. ``metadata`` goes to ``metadata_props`` as
    ``esc.<key>`` (non-strings JSON-encoded), next to ``esc.quantizers``: the exported quantizers by
    state-dict path with kind, bits, integer type and granularity. The file is written atomically.

    Raises :class:`ExportError` for a quantizer the export cannot represent (see the module
    docstring) or an operator the TorchScript exporter cannot translate, naming it.
    """
    model.eval()
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    quantizers = enabled_quantizers(model)
    n_out = len(_as_tuple(_check_activation_grids(model, inputs, quantizers)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    names_in = [f"input{i}" for i in range(len(inputs))]
    names_out = [f"output{i}" for i in range(n_out)]
    with export_mode(model):
        try:
            torch.onnx.export(model, inputs, str(tmp), dynamo=False, opset_version=OPSET, input_names=names_in,
                              output_names=names_out, dynamic_axes={n: {0: "batch"} for n in names_in + names_out})
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            tmp.unlink(missing_ok=True)
            raise ExportError(f"cannot export {type(model).__name__} to ONNX: {exc} (replace that operator, or keep it "
                              "outside the exported module)") from exc
    proto = onnx.load(str(tmp))
    props = {"quantizers": {name: {"kind": kind, "bits": q.bits, "type": "int8" if q.signed else "uint8",
                                   "granularity": q.granularity} for name, (kind, q) in quantizers.items()},
             **(metadata or {})}
    for key, value in props.items():
        proto.metadata_props.add(key=METADATA_PREFIX + key, value=value if isinstance(value, str) else json.dumps(value, default=str))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def metadata(path: str | Path) -> dict[str, str]:
    """The ``esc.*`` metadata of an exported file, without the prefix (values as stored: strings)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key.removeprefix(METADATA_PREFIX): p.value for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)}


# ------------------------------------------------------------------------------ execution
class OnnxRuntimeModel(nn.Module):
    """An onnxruntime CPU session as a module: ``forward(*tensors)`` -> tensor (or tuple of tensors).

    Args:
        path: the ONNX file.
        threads: intra-op threads (inter-op: 1, sequential execution).
        optimized_path: where onnxruntime writes the graph it runs after its optimizations, for
            :func:`op_kinds`.
        optimization: onnxruntime's graph optimization level; the default ``ORT_ENABLE_ALL`` fuses
            QDQ into integer kernels, ``ORT_ENABLE_BASIC`` runs QuantizeLinear/DequantizeLinear
            and float kernels as exported.
    """

    def __init__(self, path: str | Path, threads: int = 1, optimized_path: str | Path | None = None,
                 optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = optimization
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.path.name} takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def op_kinds(optimized_path: str | Path, inputs: Sequence[torch.Tensor]) -> dict[str, Counter]:
    """Op types of an onnxruntime-optimized graph (:class:`OnnxRuntimeModel`'s ``optimized_path``)
    by what they compute on, read from the tensors of one run on ``inputs``:

    * ``integer``: an 8-bit integer input or output (fused QDQ kernels such as ``QLinearConv``,
      ``QLinearMatMul``, ``MatMulIntegerToFloat``, and data movement on int8/uint8 tensors);
    * ``float``: a float output and no 8-bit input (what onnxruntime left in float);
    * ``convert``: ``QuantizeLinear`` / ``DequantizeLinear`` left standing (float <-> 8-bit);
    * ``other``: the rest (shape and index arithmetic).
    """
    proto = onnx.load(str(optimized_path))
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        proto.graph.output.extend(onnx.ValueInfoProto(name=o) for o in node.output if o and o not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    dtypes = {name: np.asarray(v).dtype for name, v in zip([o.name for o in session.get_outputs()], session.run(None, feeds))}
    dtypes.update({name: v.dtype for name, v in feeds.items()})
    dtypes.update({t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in proto.graph.initializer})
    kinds: dict[str, Counter] = {k: Counter() for k in ("integer", "float", "convert", "other")}
    for node in proto.graph.node:
        ins = [dtypes[i] for i in node.input if i in dtypes]
        outs = [dtypes[o] for o in node.output if o in dtypes]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            kind = "convert"
        elif any(d in (np.int8, np.uint8) for d in ins + outs):
            kind = "integer"
        elif any(np.issubdtype(d, np.floating) for d in outs):
            kind = "float"
        else:
            kind = "other"
        kinds[kind][node.op_type] += 1
    return kinds
