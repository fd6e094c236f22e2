"""The "fusegen" domain: fusegen:: ops under their CamelCase names, FusedGroups as FusedKernel
nodes that carry the group's reference graph as attribute "body"."""

from __future__ import annotations

from onnx import helper
from torch import fx

from fusegen.codegen.pointwise import source_key
from fusegen.fused_group import FusedGroup
from fusegen.onnx_view.custom_domain import bind, custom_node, node_outputs
from fusegen.onnx_view.graph import OnnxGraph, label
from fusegen.onnx_view.values import FUSEGEN_DOMAIN, tensor_info


def fusegen_op(g: OnnxGraph, n: fx.Node) -> None:
    """A fusegen:: op call: ``paged_kv_write`` becomes PagedKVWrite, arguments as in its schema."""
    target = n.target
    base = target._schema.name.split("::")[-1]
    custom_node(g, n, FUSEGEN_DOMAIN, _camel(base), bind(target, n.args, n.kwargs), target._schema)


def _camel(op: str) -> str:
    return "".join("KV" if part == "kv" else part.capitalize() for part in op.split("_"))


def fused_kernel(g: OnnxGraph, n: fx.Node, module: FusedGroup, body_graph: OnnxGraph) -> None:
    """The call of FusedGroup ``module``; ``body_graph`` is its reference graph, converted."""
    # a body has no initializers: a get_attr tensor inside it is one more input
    inputs = body_graph.inputs + [tensor_info(name, t) for name, t in body_graph.weights.items()]
    body = helper.make_graph(body_graph.nodes, module.name, inputs, body_graph.outputs,
                             value_info=body_graph.value_info)
    ops = [label(x).replace("aten.", "") for x in module.reference.graph.nodes if x.op == "call_function"]
    outputs = node_outputs(g, n)
    g.emit(n, "FusedKernel", [g.value(a) for a in n.args], outputs, domain=FUSEGEN_DOMAIN,
           group=module.name, schedule=module.schedule, ops=ops, num_outputs=len(outputs),
           source_hash=source_key(module.source) if module.source else None, body=body)
