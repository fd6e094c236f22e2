"""fuse_projections: linear projections that read the same input become one matmul.

Before:  q = linear(x, Wq, bq)    k = linear(x, Wk, bk)    v = linear(x, Wv, bv)
After:   qkv = linear(x, W, b)                   # W = cat([Wq; Wk; Wv]), built once, here
         parts = split_with_sizes(qkv, [nq, nk, nv], -1)
         q, k, v = parts[0], parts[1], parts[2]

One larger GEMM instead of several small ones reads ``x`` once and fills the GPU better: the
q/k/v projections of attention and the gate/up projections of a gated MLP (Llama, Mistral,
Qwen2, ...). GPT-2's Conv1D ``c_attn`` is fused already (one ``addmm``) and is not touched.

Which linears fuse: ``aten.linear`` nodes with the same input node whose weight (and bias, if
any) are attributes of one dtype and device, with the same ``in_features``. A group where only
some linears have a bias gets zeros in the fused bias for the others (counter
``bias_zero_filled``): adding 0.0 changes no value, and it keeps groups such as GPT-J's
bias-free q/k/v with its biased MLP input together.

The parts are views with the fused width as row stride. A ``view`` of them that needs
contiguous memory (``y.view(-1)``) would fail, so a linear whose output reaches such a view
stays unfused (counter ``linears_skipped_layout``); the check runs on FakeTensors, before
anything is rewritten.

The fused weights are new buffers of the graph module (``fusegen_fused_proj_<i>_weight``);
the user's model keeps its own parameters. ``ctx.facts["fuse_projections.groups"]`` maps each
fused weight to the attributes it was built from, in order.

Order: after convert_mha_to_gqa, which needs the K and V projections as separate linears
(it would take a fused q/k/v linear for the K projection).
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx

from fusegen.passes.infra import (PassContext, PassResult, add_buffer, erase_unused, fake_mode_of, getattr_path,
                                  graph_pass, refresh_vals, val)

aten = torch.ops.aten
NAME = "fuse_projections"
PREFIX = "fusegen_fused_proj_"
KEPT_META = ("nn_module_stack", "stack_trace")


# --- which linears ----------------------------------------------------------------------------

def _parts(node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(weight, bias) attribute nodes of a fusible ``linear``; None if it is not one."""
    if node.op != "call_function" or node.target is not aten.linear.default or node.kwargs:
        return None
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return None
    return weight, bias


def _key(gm: fx.GraphModule, node: fx.Node):
    """Linears with equal keys can share one weight matrix; None if ``node`` cannot."""
    parts = _parts(node)
    if parts is None:
        return None
    weight = getattr_path(gm, parts[0].target)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if parts[1] is not None:
        bias = getattr_path(gm, parts[1].target)
        if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            return None
    return weight.dtype, weight.device, weight.shape[1]


def _candidates(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of two or more linears of one input and one key, in graph order."""
    groups = []
    for x in gm.graph.nodes:
        by_key: dict = {}
        for user in x.users:
            if user.op == "call_function" and user.args and user.args[0] is x:
                key = _key(gm, user)
                if key is not None:
                    by_key.setdefault(key, []).append(user)
        groups += [g for g in by_key.values() if len(g) > 1]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [sorted(g, key=order.__getitem__) for g in groups]


def _widths(gm: fx.GraphModule, group: list[fx.Node]) -> list[int]:
    return [getattr_path(gm, n.args[1].target).shape[0] for n in group]


# --- layout: can every use of a part live with a strided view? -------------------------------

def _is_view(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return True
    return (isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable
            and bool(target._schema.returns) and target._schema.returns[0].alias_info is not None)


def _view_cone(start: fx.Node) -> list[fx.Node]:
    """Nodes that alias ``start``'s memory: chains of view ops from it, in BFS order."""
    cone, frontier = [], [start]
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user.op == "call_function" and _is_view(user) and user.args and user.args[0] is node \
                    and user not in cone:
                cone.append(user)
                frontier.append(user)
    return cone


def _strided_vals(gm: fx.GraphModule, linear: fx.Node, index: int, widths: list[int],
                  memo: dict) -> dict | None:
    """The ``val`` of every view after ``linear`` once its output is part ``index`` of a fused
    output (FakeTensors, nothing rewritten); None if one of them needs contiguous memory.
    ``memo`` keeps the answer per view chain: every decoder layer has the same one, and
    evaluating views under symbolic sizes is slow."""
    cone = _view_cone(linear)
    key = _cone_key(linear, cone, index, widths)
    if key not in memo:
        memo[key] = _evaluate_cone(gm, linear, cone, index, widths)
    vals = memo[key]
    return None if vals is None else dict(zip(cone, vals))


def _cone_key(linear: fx.Node, cone: list[fx.Node], index: int, widths: list[int]) -> str:
    """The chain's ops and arguments, its own nodes by position (other nodes, such as the
    shared symbolic sizes, by name), and the linear's output type."""
    position = {linear: "@0", **{n: f"@{k + 1}" for k, n in enumerate(cone)}}
    ops = [(n.target, fx.map_arg((n.args, n.kwargs), lambda a: position.get(a, a.name))) for n in cone]
    out = val(linear)
    return repr((index, widths, tuple(out.shape), out.dtype, str(out.device), ops))


def _evaluate_cone(gm: fx.GraphModule, linear: fx.Node, cone: list[fx.Node], index: int,
                   widths: list[int]) -> list | None:
    mode = fake_mode_of(gm)
    out = val(linear)
    env = {}

    def lookup(arg):
        return env[arg] if arg in env else val(arg)

    try:
        with mode:
            fused = torch.empty(list(out.shape[:-1]) + [sum(widths)], dtype=out.dtype, device=out.device)
            env[linear] = fused.split(widths, -1)[index]
            for node in cone:
                env[node] = node.target(*fx.map_arg(node.args, lookup), **fx.map_arg(node.kwargs, lookup))
    except Exception:  # a view needing contiguous memory; symbolic sizes it cannot decide
        return None
    return [env[node] for node in cone]


def _fusible(gm: fx.GraphModule, group: list[fx.Node], memo: dict) -> tuple[list[fx.Node], dict, int]:
    """The members whose uses accept a strided part, the new ``val`` of those uses, and how
    many of ``group`` stay unfused. Dropping a member changes the others' row stride, so the
    check runs again on the rest."""
    kept = list(group)
    while len(kept) > 1:
        widths = _widths(gm, kept)
        found = [_strided_vals(gm, n, i, widths, memo) for i, n in enumerate(kept)]
        if all(v is not None for v in found):
            return kept, {k: v for vals in found for k, v in vals.items()}, len(group) - len(kept)
        kept = [n for n, v in zip(kept, found) if v is not None]
    return [], {}, len(group)


def _fusible_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    memo: dict = {}
    return [g for g in (_fusible(gm, c, memo)[0] for c in _candidates(gm)) if g]


# --- the rewrite ------------------------------------------------------------------------------

def _free_index(gm: fx.GraphModule) -> int:
    i = 0
    while hasattr(gm, f"{PREFIX}{i}_weight"):
        i += 1
    return i


def _copy_meta(dst: fx.Node, src: fx.Node) -> None:
    for key in KEPT_META:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


@torch.no_grad()
def _fused_tensors(gm: fx.GraphModule, group: list[fx.Node]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The concatenated weight, bias (None if no member has one) and how many zero-filled."""
    attrs = [_parts(n) for n in group]
    weights = [getattr_path(gm, w.target) for w, _ in attrs]
    biases = [getattr_path(gm, b.target) if b is not None else None for _, b in attrs]
    weight = torch.cat([w.detach() for w in weights], 0).contiguous()
    if all(b is None for b in biases):
        return weight, None, 0
    filled = [b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    return weight, torch.cat(filled, 0), sum(b is None for b in biases)


def _fuse(gm: fx.GraphModule, group: list[fx.Node], index: int, view_vals: dict) -> tuple[list[fx.Node], int]:
    """Replace ``group`` by linear -> split -> getitems and give the views of the parts their
    ``view_vals``; returns the new nodes (their ``val`` still to compute) and the zero-filled
    bias count."""
    first, x = group[0], group[0].args[0]
    widths = _widths(gm, group)
    weight, bias, zero_filled = _fused_tensors(gm, group)
    graph = gm.graph
    args = [x, add_buffer(gm, f"{PREFIX}{index}_weight", weight, first)]
    if bias is not None:
        args.append(add_buffer(gm, f"{PREFIX}{index}_bias", bias, first))
    with graph.inserting_before(first):
        fused = graph.call_function(aten.linear.default, tuple(args))
        split = graph.call_function(aten.split_with_sizes.default, (fused, widths, -1))
        parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for node in (fused, split):
        _copy_meta(node, first)
    for part, linear in zip(parts, group):
        _copy_meta(part, linear)
        linear.replace_all_uses_with(part)
        graph.erase_node(linear)
    for node, fake in view_vals.items():
        node.meta["val"] = fake
    return [fused, split, *parts], zero_filled


def _ensures(gm: fx.GraphModule) -> list[str]:
    return [f"{g[0].args[0].name}: linears {[n.name for n in g]} read it and could still be fused"
            for g in _fusible_groups(gm)]


@graph_pass(NAME, ensures=lambda gm, ctx: _ensures(gm))
def fuse_projections(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats: Counter = Counter()
    touched: list[fx.Node] = []
    sources: dict[str, list[str]] = {}
    memo: dict = {}
    for candidate in _candidates(gm):
        group, view_vals, skipped = _fusible(gm, candidate, memo)
        stats["linears_skipped_layout"] += skipped
        if not group:
            continue
        index = _free_index(gm)
        sources[f"{PREFIX}{index}_weight"] = [n.args[1].target for n in group]
        nodes, zero_filled = _fuse(gm, group, index, view_vals)
        touched += nodes
        stats["groups_fused"] += 1
        stats["linears_fused"] += len(group)
        stats["bias_zero_filled"] += zero_filled
    if touched:
        refresh_vals(gm, touched)
        erase_unused(gm)
    ctx.facts.setdefault(f"{NAME}.groups", {}).update(sources)
    return PassResult(gm, bool(touched), dict(+stats))
