"""A node of a custom domain ("fusegen" or "aten"): tensor arguments as inputs, the rest as
attributes, and every tensor the op writes in place as an output that later readers read."""

from __future__ import annotations

import torch
from torch import fx

from fusegen.onnx_view.graph import OnnxGraph
from fusegen.onnx_view.values import meta_val


def bind(op, args, kwargs) -> list[tuple[str, object, object]]:
    """(name, value, schema argument) for every argument of ``op``, defaults filled in."""
    bound = []
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        else:
            value = arg.default_value if arg.has_default_value() else None
        bound.append((arg.name, value, arg))
    return bound


def positional(n: fx.Node) -> list[tuple[str, object, None]]:
    """The arguments of a node without a schema: ``arg0``, ``arg1``, ... then its kwargs."""
    return [(f"arg{i}", a, None) for i, a in enumerate(n.args)] + [(k, v, None) for k, v in n.kwargs.items()]


def node_outputs(g: OnnxGraph, n: fx.Node) -> list[str]:
    v = n.meta.get("val")
    if isinstance(v, (list, tuple)):
        return g.outs(n, v)
    return [] if v is None else [g.out(n)]


def custom_node(g: OnnxGraph, n: fx.Node, domain: str, op_type: str, bound, schema=None, **extra) -> None:
    """A custom-domain node: tensor arguments as inputs, the rest as attributes, and every
    tensor the op writes in place as an output that later readers read instead."""
    inputs, input_names, attrs = _split_arguments(g, n, bound)
    outputs = node_outputs(g, n)
    written = _written_args(bound, schema)
    if written:
        attrs["mutates"] = [name for name, _ in written]
    for name, value in written:
        aliased = _aliased_return(schema, name)
        if aliased is not None and aliased < len(outputs):  # an in-place op returning its input
            g.latest[value] = outputs[aliased]
            continue
        new = g.fresh(n.name if not outputs and n not in g.names else f"{n.name}/{name}")
        g.names.setdefault(n, new)
        g.describe(new, value.meta.get("val"))
        outputs.append(new)
        g.latest[value] = new
    g.emit(n, op_type, inputs, outputs, domain=domain, input_names=input_names, **attrs, **extra)


def _split_arguments(g: OnnxGraph, n: fx.Node, bound) -> tuple[list[str], list[str], dict]:
    """Inputs (a missing optional tensor as ""), their argument names, and attributes. A list
    of tensors is one input each; a list of ints with symbolic entries is one 1-D input."""
    inputs, input_names, attrs = [], [], {}
    for name, value, arg in bound:
        tensor_typed = arg is not None and "Tensor" in str(arg.type)
        if isinstance(value, fx.Node) and value in g.opaque:
            attrs[name] = g.opaque[value]
        elif isinstance(value, fx.Node):
            inputs.append(g.value(value))
            input_names.append(name)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value):
            if tensor_typed or all(isinstance(meta_val(v), torch.Tensor) for v in value if v is not None):
                inputs += ["" if v is None else g.value(v) for v in value]
                input_names += [f"{name}[{i}]" for i in range(len(value))]
            else:
                inputs.append(g.int_vector(n, value))
                input_names.append(name)
        elif value is None and tensor_typed:
            inputs.append("")
            input_names.append(name)
        else:
            attrs[name] = value
    return inputs, input_names, attrs


def _written_args(bound, schema) -> list[tuple[str, fx.Node]]:
    if schema is None:
        return []
    return [(name, value) for name, value, arg in bound
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node)]


def _aliased_return(schema, arg_name: str) -> int | None:
    arg = next(a for a in schema.arguments if a.name == arg_name)
    for i, ret in enumerate(schema.returns):
        if ret.alias_info is not None and ret.alias_info.before_set == arg.alias_info.before_set:
            return i
    return None
