"""cleanup_graph: remove what capture leaves behind that computes nothing at inference.

- export's guard module call and tensor-metadata asserts;
- identity ops: alias, detach, lift_fresh_copy, contiguous of a contiguous tensor, dropout in eval mode
  (or p == 0), casts/moves to the dtype and device the tensor already has, and slices over
  a whole dim (``x[:, :, None]`` exports as slice(dim 0, 0, INT64_MAX) -> unsqueeze -> ... on
  some torch versions, which would hide patterns such as repeat_kv from later passes);
- dead code, unused attributes and submodules;
- export's pytree calling convention: the graph becomes a plain
  ``forward(input_ids, attention_mask, position_ids) -> logits`` that passes can extend.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from fusegen.passes.infra import PassContext, PassResult, erase_unused, graph_pass, val

aten = torch.ops.aten

ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}
IDENTITY = {aten.alias.default, aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default}
# contiguous() of a contiguous tensor returns the tensor itself, so dropping it changes
# nothing even under mutation; clone() is a real copy that in-place ops may rely on.
COPIES = {aten.contiguous.default}
CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
         aten.type_as.default}


def _is_dropout_noop(node: fx.Node) -> bool:
    if node.target is not aten.dropout.default:
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return p == 0.0 or train is False


def _mutates(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _is_removable_copy(node: fx.Node) -> bool:
    """contiguous() of an already-contiguous tensor that no op mutates (on either side)."""
    if node.target not in COPIES:
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op == "get_attr":
        return False
    if any(_mutates(u) for u in list(node.users) + list(src.users)):
        return False
    value = val(src)
    try:
        return isinstance(value, torch.Tensor) and bool(value.is_contiguous())
    except Exception:  # symbolic strides we cannot decide
        return False


def _is_noop_cast(node: fx.Node) -> bool:
    if node.target not in CASTS:
        return False
    src, out = val(node.args[0]), val(node)
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
            and src.dtype == out.dtype and src.device == out.device and src.layout == out.layout)


def _drop_guards(gm: fx.GraphModule, stats: Counter) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            stats["guards_removed"] += 1
        elif node.op == "call_function" and node.target in ASSERTS:
            gm.graph.erase_node(node)
            stats["asserts_removed"] += 1


def _plain_calling_convention(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule over the same graph: no pytree specs, no input-check hooks."""
    gm.graph._codegen = fx.graph.CodeGen()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        output.args = (result[0],)
    plain = fx.GraphModule(gm, gm.graph, class_name="FusegenGraph")
    plain.meta.update(gm.meta)
    return plain


def _bypass_identities(gm: fx.GraphModule, stats: Counter) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in IDENTITY or _is_removable_copy(node):
            kind = "identity_removed"
        elif _is_full_slice(node):
            kind = "full_slice_removed"
        elif _is_dropout_noop(node):
            kind = "dropout_removed"
        elif _is_noop_cast(node):
            kind = "noop_cast_removed"
        else:
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        stats[kind] += 1


def _is_full_slice(node: fx.Node) -> bool:
    """aten.slice(x, dim, start, end, step) that keeps all of dim: start 0, step 1 and an end
    at or past the dim's size (INT64_MAX, or the size itself when it is static)."""
    if node.target is not aten.slice.Tensor or node.kwargs:
        return False
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    if start not in (None, 0) or step != 1:
        return False
    if end is None or (isinstance(end, int) and end >= 2**63 - 1):
        return True
    shape = getattr(val(x), "shape", None)
    return isinstance(end, int) and shape is not None and isinstance(shape[dim], int) and end >= shape[dim]


@graph_pass("cleanup_graph")
def cleanup_graph(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats: Counter = Counter()
    _drop_guards(gm, stats)
    gm = _plain_calling_convention(gm)
    _bypass_identities(gm, stats)
    stats["dead_nodes_removed"] = erase_unused(gm)
    stats = +stats
    return PassResult(gm, bool(stats), dict(stats))
