"""The optimized fx graph as an ONNX model, for graph viewers (Netron).

    to_onnx(compiled.graph_module, "out/model.onnx", facts=compiled.facts)

writes ``out/model.onnx`` and, with weights, ``out/model.onnx.data`` (every get_attr tensor as
ONNX external data, so the model file stays small and protobuf's 2 GiB limit does not apply).
Every fx node has its place in the ONNX graph; no op is left out:

    fx node                              ONNX
    placeholder                          graph input (dtype, shape; symbolic dims as dim_param)
    get_attr tensor                      initializer (weights=True) or graph input (weights=False)
    fusegen::<op>                        domain "fusegen", op_type in CamelCase (PagedAttention, ...)
    call_module FusedGroup               domain "fusegen", FusedKernel; attribute "body" holds the
                                         group's reference graph
    aten op with an exact ONNX spelling  standard domain (the table ``ATEN`` in aten_ops.py), where
                                         the dtypes fit the ONNX op (Cos has no bfloat16, ...)
    any other op                         domain "aten", op_type = the op's name (+ "overload")
    getitem of a multi-output node       no node: that output of its producer
    output                               graph outputs

Non-tensor arguments of custom-domain nodes are attributes (named as in the op's schema;
bools as 0/1) and ``input_names`` lists what each input is. An op that writes a tensor in
place (``paged_kv_write`` writes ``kv_pool``) outputs the written tensor, and later readers
read that output, so the graph shows attention reading the cache after the write:

    kv_pool ──▶ PagedKVWrite(layer 0) ──▶ paged_kv_write_default ──▶ PagedAttention(layer 0)
                                                                 └─▶ PagedKVWrite(layer 1) ─▶ ...

ONNX node names are the fx node names; helper nodes of one fx node are named ``<node>/<Op>``,
shared small constants ``const``, ``const_1``, ... Values keep their fx names and get a
value_info with dtype and (symbolic) shape.

Modules::

    values          opset and domains, dtypes, shapes, value_info, raw tensor bytes, attributes
    graph           OnnxGraph: one ONNX graph under construction (names, nodes, constants)
    builder         to_onnx: the walk over fx nodes, weights as external data, metadata
    custom_domain   a node of a custom domain: arguments as inputs/attributes, in-place writes
    fusegen_ops     fusegen:: ops and FusedGroups in the "fusegen" domain
    aten_ops        the table of aten ops with a standard spelling; the "aten" domain fallback
    aten_shape_ops  the table's shape and indexing ops (views, slices, gathers, concat, split)
"""

from fusegen.onnx_view.builder import to_onnx

__all__ = ["to_onnx"]
