"""fuse_pointwise: groups of pointwise and last-dim row-reduction nodes -> one FusedGroup each.

What fuses (a "row frame" is the shape [*lead, N] the group works on, N static):

    residual add -> cast -> pow -> mean(-1) -> add eps -> rsqrt -> mul -> cast -> mul weight
    silu(gate) * up,   GPT-2's hand-written tanh-GELU,   casts between them

Every input of a group must broadcast to the frame (a full row [*lead, N], a per-row value
[*lead, 1], cos/sin tables [B, 1, S, D] against q [B, H, S, D], a weight [N], a scalar);
generated kernels read inputs in place through their strides. ``fusegen.rotate_half`` (rotary)
joins as a permuted load of a group input. Nodes are taken in graph order and join the
groups of their producers (merging them) when that keeps the graph acyclic (no path
group -> outside -> group). Groups of one node are left alone. Each group's nodes become a small GraphModule
(the reference) inside a FusedGroup module; codegen turns it into one Triton kernel.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from fusegen.fused_group import FusedGroup
from fusegen.passes.infra import PassContext, PassResult, graph_pass, val

aten = torch.ops.aten

POINTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.tanh.default,
    aten.cos.default, aten.sin.default,
    aten.sigmoid.default, aten.silu.default, aten.relu.default, aten.reciprocal.default,
    aten.pow.Tensor_Scalar, aten.to.dtype, aten._to_copy.default,
}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
ROTATE_HALF = torch.ops.fusegen.rotate_half.default  # a permuted load: its input must enter the group
POWERS = (-1.0, -0.5, 0.5, 1.0, 2.0, 3.0)


@dataclass
class Group:
    lead: tuple
    N: int
    nodes: list = field(default_factory=list)
    has_reduction: bool = False


def _shape_key(v) -> tuple:
    return tuple(str(s) for s in v.shape)


def _float_tensor(node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() >= 1


def fusible(node: fx.Node) -> bool:
    if node.op != "call_function" or not _float_tensor(node):
        return False
    if node.target in REDUCTIONS:
        dims, keep = node.args[1], (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        rank = val(node).dim()
        return list(dims) in ([-1], [rank - 1]) and keep and not node.kwargs.get("dtype")
    if node.target is ROTATE_HALF:
        return True
    if node.target not in POINTWISE:
        return False
    if node.target is aten.pow.Tensor_Scalar and float(node.args[1]) not in POWERS:
        return False
    if node.target in (aten.to.dtype, aten._to_copy.default):
        extra = set(node.kwargs) - {"dtype"}
        if extra or len(node.args) > (2 if node.target is aten.to.dtype else 1):
            return False
    if node.target in (aten.add.Tensor, aten.sub.Tensor) and node.kwargs.get("alpha", 1) != 1:
        return False
    return all(_float_tensor(a) or isinstance(a, (int, float)) for a in node.args
               if not isinstance(a, torch.dtype))


def frame(node: fx.Node):
    """(lead, N) of the rows the node works on, or None when it only sees [*lead, 1]."""
    v = val(node.args[0]) if node.target in REDUCTIONS else val(node)
    N = v.shape[-1]
    if not isinstance(N, int) or N <= 1:
        return None
    return _shape_key(v)[:-1], N


def layout(v: torch.Tensor, lead: tuple, N: int) -> str | None:
    """How ``v`` meets the frame [*lead, N]: "row" (the full shape), "col" ([*lead, 1]),
    "broadcast" (broadcasts to it), or None."""
    shape, full = _shape_key(v), lead + (str(N),)
    if len(shape) > len(full):
        return None
    shape = ("1",) * (len(full) - len(shape)) + shape
    if any(s != f and s != "1" for s, f in zip(shape, full)):
        return None
    if shape == full:
        return "row"
    if shape == lead + ("1",):
        return "col"
    return "broadcast"


def _inputs_fit(node: fx.Node, lead: tuple, N: int) -> bool:
    return all(layout(val(a), lead, N) is not None for a in node.all_input_nodes)


def _reaches(start: fx.Node, targets: set, floor: int, index: dict) -> bool:
    """Does ``start`` depend on any node in ``targets``? (searching only nodes after ``floor``)"""
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen or index[n] < floor:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _acyclic(members: set, index: dict) -> bool:
    """Can ``members`` become one node? Not if an outside input depends on a member."""
    floor = min(index[m] for m in members)
    return not any(_reaches(a, members, floor, index)
                   for m in members for a in m.all_input_nodes if a not in members)


def find_groups(gm: fx.GraphModule) -> list[Group]:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    group_of: dict[fx.Node, Group] = {}
    groups: list[Group] = []
    for node in gm.graph.nodes:
        if not fusible(node):
            continue
        own = frame(node)
        candidates = []
        for producer in ([] if node.target is ROTATE_HALF else node.all_input_nodes):
            g = group_of.get(producer)
            if g is not None and g not in candidates and (own is None or own == (g.lead, g.N)) \
                    and _inputs_fit(node, g.lead, g.N):
                candidates.append(g)
        # Prefer joining (and thereby merging) every producer group; else the first that fits.
        options = ([candidates] if len(candidates) > 1 else []) + [[g] for g in candidates]
        for option in options:
            members = {n for g in option for n in g.nodes} | {node}
            if not _acyclic(members, index) or any(
                    m.target is ROTATE_HALF and m.args[0] in members for m in members):
                continue
            target = option[0]
            for other in option[1:]:
                groups.remove(other)
            target.nodes = sorted(members, key=index.__getitem__)
            target.has_reduction = any(n.target in REDUCTIONS for n in target.nodes)
            for n in target.nodes:
                group_of[n] = target
            break
        else:
            if own is not None and _inputs_fit(node, *own):
                g = Group(own[0], own[1], [node], node.target in REDUCTIONS)
                groups.append(g)
                group_of[node] = g
    return [g for g in groups if len(g.nodes) > 1]


def _replace(gm: fx.GraphModule, g: Group, name: str) -> bool:
    members = set(g.nodes)
    inputs = []
    for n in g.nodes:
        for a in n.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    if not any(layout(val(a), g.lead, g.N) == "row" for a in inputs):
        return False
    outputs = [n for n in g.nodes if any(u not in members for u in n.users)]
    last = g.nodes[-1]
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    if any(index[u] < index[last] for o in outputs for u in o.users if u not in members):
        return False  # an outside user sits between group members; moving it is not worth it
    sub = fx.Graph()
    env = {a: sub.placeholder(f"in{i}") for i, a in enumerate(inputs)}
    for a, ph in zip(inputs, env.values()):
        ph.meta["val"] = val(a)
    for n in g.nodes:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    module = FusedGroup(name, fx.GraphModule(gm, sub), "row" if g.has_reduction else "pointwise")
    module.frame = (g.lead, g.N)
    module.input_layouts = [layout(val(a), g.lead, g.N) for a in inputs]
    module.output_layouts = [layout(val(o), g.lead, g.N) for o in outputs]
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(last):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta["val"] = tuple(val(o) for o in outputs)
    call.meta["nn_module_stack"] = last.meta.get("nn_module_stack")
    with gm.graph.inserting_after(call):
        for i, o in enumerate(outputs):
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta["val"] = val(o)
            o.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for n in reversed(g.nodes):
        gm.graph.erase_node(n)
    return True


@graph_pass("fuse_pointwise")
def fuse_pointwise(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats: Counter = Counter()
    for i, g in enumerate(find_groups(gm)):
        if _replace(gm, g, f"fused_{i}"):
            stats["groups"] += 1
            stats["nodes_fused"] += len(g.nodes)
            stats["row_groups" if g.has_reduction else "pointwise_groups"] += 1
        else:
            stats["groups_left"] += 1
    return PassResult(gm, stats["groups"] > 0, dict(+stats))
