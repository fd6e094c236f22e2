"""to_onnx: the walk over an fx graph's nodes, get_attr tensors as external data, and the
model's metadata."""

from __future__ import annotations

import functools
import json
import operator
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import fx
from torch.utils._pytree import tree_leaves

import fusegen
from fusegen.fused_group import FusedGroup
from fusegen.onnx_view.aten_ops import aten_op, python_op
from fusegen.onnx_view.custom_domain import custom_node, positional
from fusegen.onnx_view.fusegen_ops import fused_kernel, fusegen_op
from fusegen.onnx_view.graph import OnnxGraph
from fusegen.onnx_view.values import (ATEN_DOMAIN, FUSEGEN_DOMAIN, OPSET, onnx_dtype, tensor_bytes,
                                      tensor_info, value_info)
from fusegen.progress import Bar

DATA_ALIGNMENT = 4096  # offset of every tensor in the .data file: page-aligned for mmap


def to_onnx(gm: fx.GraphModule, path, *, weights: bool = True, facts: dict | None = None,
            progress: bool = False) -> onnx.ModelProto:
    """Write ``gm`` as an ONNX model to ``path`` and return it. With ``weights`` the get_attr
    tensors are initializers stored in ``<path>.data`` (their TensorProtos in the returned
    model point there); without, they are graph inputs and no data file is written.
    ``progress`` shows a bar while the weights are written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    g = _convert(gm, used=set(), prefix="")
    initializers = []
    if weights:
        initializers = _write_weights(g.weights, data_path, progress)
    else:
        data_path.unlink(missing_ok=True)
        g.inputs += [tensor_info(name, t) for name, t in g.weights.items()]
    name = (facts or {}).get("model_class") or type(gm).__name__
    graph = helper.make_graph(g.nodes, name, g.inputs, g.outputs, initializer=initializers,
                              value_info=g.value_info, doc_string="fusegen optimized graph")
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(FUSEGEN_DOMAIN, 1),
              helper.make_opsetid(ATEN_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="fusegen",
                              producer_version=fusegen.__version__)
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    helper.set_model_props(model, _metadata(facts))
    path.write_bytes(model.SerializeToString())
    return model


def _metadata(facts: dict | None) -> dict[str, str]:
    plain = {key: value.to_dict() if hasattr(value, "to_dict") else value for key, value in (facts or {}).items()}
    props = {key: value if isinstance(value, str) else json.dumps(value, default=str)
             for key, value in plain.items()}
    props.update(producer="fusegen", producer_version=fusegen.__version__)
    return props


def _write_weights(tensors: dict[str, torch.Tensor], data_path: Path, progress: bool) -> list[TensorProto]:
    """Stream every tensor into one external-data file; the protos only point into it."""
    protos = []
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(data_path, "wb") as f, Bar(total, "writing ONNX weights", progress) as bar:
        for name, t in tensors.items():
            bar.update(t.numel() * t.element_size())
            proto = TensorProto(name=name, data_type=onnx_dtype(t.dtype, name), dims=list(t.shape))
            data = tensor_bytes(t)
            if data.nbytes == 0:
                proto.raw_data = b""
            else:
                f.write(b"\0" * (-f.tell() % DATA_ALIGNMENT))
                offset = f.tell()
                f.write(data.data)
                proto.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_path.name), ("offset", offset), ("length", data.nbytes)):
                    proto.external_data.add(key=key, value=str(value))
            protos.append(proto)
    return protos


# --- fx graph -> ONNX graph ----------------------------------------------------------------

def _convert(gm: fx.GraphModule, used: set[str], prefix: str) -> OnnxGraph:
    g = OnnxGraph(used, prefix)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            _placeholder(g, n)
        elif n.op == "get_attr":
            _get_attr(g, gm, n)
        elif n.op == "call_function":
            _call_function(g, n)
        elif n.op == "call_module":
            _call_module(g, gm, n)
        elif n.op == "call_method":
            custom_node(g, n, ATEN_DOMAIN, n.target, positional(n))
        elif n.op == "output":
            _outputs(g, n)
    return g


def _placeholder(g: OnnxGraph, n: fx.Node) -> None:
    name = g.fresh(n.name)
    g.names[n] = name
    info = value_info(name, n.meta.get("val"))
    if info is None:
        raise ValueError(f"to_onnx: placeholder {n.name}: meta['val'] = {n.meta.get('val')!r} "
                         f"has no ONNX type")
    g.inputs.append(info)


def _get_attr(g: OnnxGraph, gm: fx.GraphModule, n: fx.Node) -> None:
    value = functools.reduce(getattr, n.target.split("."), gm)
    if not isinstance(value, torch.Tensor):
        g.opaque[n] = str(n.target)
        return
    if n.target not in g.attrs:
        g.attrs[n.target] = g.fresh(n.target)
        g.weights[g.attrs[n.target]] = value
    g.names[n] = g.attrs[n.target]


def _outputs(g: OnnxGraph, n: fx.Node) -> None:
    graph_inputs = {i.name for i in g.inputs} | set(g.weights)
    seen: set[str] = set()
    for i, arg in enumerate(tree_leaves(n.args[0])):
        if not isinstance(arg, fx.Node) or arg in g.opaque:
            continue
        name = g.value(arg)
        if name in seen or name in graph_inputs:
            name = g.emit(n, "Identity", [name], [g.fresh(f"output_{i}")])[0]
        seen.add(name)
        info = value_info(name, arg.meta.get("val"))
        if info is not None:
            g.outputs.append(info)
    output_names = {o.name for o in g.outputs}
    g.value_info[:] = [v for v in g.value_info if v.name not in output_names]


def _call_function(g: OnnxGraph, n: fx.Node) -> None:
    target = n.target
    if target is operator.getitem:
        _getitem(g, n)
    elif isinstance(target, torch._ops.OpOverload) and target.namespace == FUSEGEN_DOMAIN:
        fusegen_op(g, n)
    elif isinstance(target, torch._ops.OpOverload):
        aten_op(g, n)
    else:
        python_op(g, n)


def _getitem(g: OnnxGraph, n: fx.Node) -> None:
    if n in g.names:  # named when its producer was converted
        return
    producer, index = n.args
    names = g.names.get(producer) if isinstance(producer, fx.Node) else None
    if isinstance(names, list) and isinstance(index, int):
        g.names[n] = names[index]
        return
    custom_node(g, n, ATEN_DOMAIN, "getitem", positional(n))


def _call_module(g: OnnxGraph, gm: fx.GraphModule, n: fx.Node) -> None:
    module = gm.get_submodule(n.target)
    if not isinstance(module, FusedGroup):
        custom_node(g, n, ATEN_DOMAIN, type(module).__name__, positional(n), target=str(n.target))
        return
    body_graph = _convert(module.reference, g.used, prefix=f"{g.prefix}{n.name}/")
    fused_kernel(g, n, module, body_graph)
