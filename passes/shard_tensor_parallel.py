"""shard_tensor_parallel: the graph of rank r of tp ranks, Megatron-LM's layout (Shoeybi et
al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
Parallelism", section 3).

    column-parallel (output rows split)      row-parallel (input columns split)
    qkv = linear(x, W_qkv[rows of r])        o = linear(attn_r, W_o[:, cols of r])
        r's query heads and their KV heads     o = wait(all_reduce(o, "sum"))
    gate_up = linear(x, W_gu[rows of r])     d = linear(h_r, W_down[:, cols of r])
        r's slice of gate and of up            d = wait(all_reduce(d, "sum"))

    logits_r = linear(h, W_lm[vocab rows of r])        (vocabulary-parallel LM head)
    logits = all_gather(logits_r) over the vocabulary

Everything between a column- and its row-parallel linear (rotary, the KV cache, attention,
SiLU*mul) runs on the rank's heads or columns alone, so it needs no change beyond the split
sizes of a fused projection; views of the heads are written with -1 (HF's modeling code),
which fake propagation resolves to the rank's count. The collectives are torch's functional
ones (``torch.ops._c10d_functional``): plain graph nodes, which fx, the CPU step graph and
CUDA graphs take as they are. The backend (gloo, NCCL) is the process group's.

KV heads: ``Hkv / tp`` per rank when tp divides them; when ``Hkv < tp`` and Hkv divides tp,
each rank keeps the one KV head its query heads read, replicated on ``tp / Hkv`` ranks
(logged, counter ``kv_heads_replicated``). A vocabulary that tp does not divide keeps the
LM head whole on every rank (logged, counter ``lm_head_replicated``).

Counters: ``sharded_linears``, ``allreduces``, ``allgathers``, ``kv_heads_per_rank``,
``query_heads_per_rank``, ``kv_heads_replicated``, ``lm_head_replicated``,
``replicated_linears``.

Order: after the KV passes (the cache geometry becomes the rank's: ``ctx.facts["kv"]``) and
before fuse_pointwise (whose kernels are made for the rank's shapes). Projections must be
``aten.linear`` nodes: a model captured otherwise (GPT-2's Conv1D is ``addmm``) is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from fusegen.errors import ConfigError
from fusegen.passes.infra import (PassContext, PassResult, add_buffer, call_nodes, erase_unused, fresh_val,
                                  getattr_path, graph_pass, module_path, placeholders, propagate_shapes, refusal,
                                  val)

log = logging.getLogger(__name__)
aten = torch.ops.aten
ops = torch.ops.fusegen
c10d = torch.ops._c10d_functional
NAME = "shard_tensor_parallel"
PREFIX = "fusegen_tp_"
WORKS = "tp=1"
LINEAR = aten.linear.default
COLLECTIVES = (c10d.all_reduce.default, c10d.all_gather_into_tensor.default)

# Ops that move a tensor's values without mixing its features (the walk from an attention
# input back to its projection, and from its output on to the output projection).
_MOVES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
          aten.to.dtype, aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default, operator.getitem}
# ... and those that also act on each feature alone (rotary, activations, gating).
_ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
                aten.mul.Scalar, aten.add.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar, aten.silu.default,
                aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.relu.default, aten.erf.default,
                ops.rotate_half.default}
_READS_KV = {ops.attention.default: (1, 2)}                       # q, k, v arguments
_WRITES_KV = {ops.paged_kv_write.default: (2, 3), ops.dense_kv_write.default: (2, 3)}   # (cache, layer, k, v, ...)


@dataclass
class _Part:
    """A column-parallel output: all of ``linear``'s output, or part ``index`` of its split."""
    linear: fx.Node
    index: int | None
    role: str = ""        # "q", "k", "v" or "mlp"
    heads: int = 0        # q, k, v: the projection's heads, and the rank's first and count
    first: int = 0
    count: int = 0
    head_dim: int = 0


# --- where the parallel regions are -----------------------------------------------------------

def _part_of(node: fx.Node) -> _Part | None:
    if node.op != "call_function":
        return None
    if node.target is LINEAR:
        return _Part(node, None)
    if node.target is operator.getitem:
        split = node.args[0]
        if isinstance(split, fx.Node) and split.target is aten.split_with_sizes.default \
                and split.args[0].target is LINEAR and split.args[2] in (-1, val(split.args[0]).dim() - 1):
            return _Part(split.args[0], node.args[1])
    return None


def _sources(start: fx.Node, through: set) -> tuple[list[_Part], fx.Node | None]:
    """The projection outputs ``start`` is computed from by ops of ``through`` alone,
    following only operands of its own shape (a broadcast operand such as rotary's cos is
    the same on every rank); and the first node on the way of another op (None if none)."""
    parts, seen, frontier, blocker = {}, set(), [start], None
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        part = _part_of(node)
        if part is not None:
            parts[(part.linear, part.index)] = part
            continue
        if node.op != "call_function" or node.target not in through:
            blocker = blocker or node
            continue
        if node.target in _MOVES:
            frontier += [node.args[0]] if isinstance(node.args[0], fx.Node) else []
            continue
        shape = val(node).shape if isinstance(val(node), torch.Tensor) else None
        frontier += [a for a in node.args if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor)
                     and val(a).shape == shape]
    return list(parts.values()), blocker


def _output_projection(attention: fx.Node) -> fx.Node | None:
    """The linear that attention's output reaches through view-like ops (one user each)."""
    node = attention
    while len(node.users) == 1:
        (user,) = node.users
        if user.target is LINEAR and user.args[0] is node:
            return user
        if user.op != "call_function" or user.target not in _MOVES:
            return None
        node = user
    return None


def _kv_inputs(gm: fx.GraphModule, attention: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The k and v an attention op reads: its own arguments, or those its layer's cache
    write stored."""
    if attention.target in _READS_KV:
        k, v = _READS_KV[attention.target]
        return attention.args[k], attention.args[v]
    layer = attention.args[2]
    for write in call_nodes(gm, *_WRITES_KV):
        if write.args[1] == layer:
            k, v = _WRITES_KV[write.target]
            return write.args[k], write.args[v]
    raise refusal(NAME, f"no cache write of layer {layer} found for its attention", attention, WORKS)


def _one_source(gm: fx.GraphModule, node: fx.Node, what: str, site: fx.Node) -> _Part:
    parts, blocker = _sources(node, _MOVES | _ELEMENTWISE)
    if len(parts) != 1:
        reached = f"{blocker.name} ({blocker.target})" if blocker is not None else "nothing"
        raise refusal(NAME, f"the attention's {what} is not computed from one aten.linear projection "
                      f"(it reaches {reached}; tensor parallelism shards aten.linear projections, and a "
                      f"Conv1D such as GPT-2's is captured as addmm)", site, WORKS)
    return parts[0]


# --- the plan ---------------------------------------------------------------------------------

@dataclass
class _Plan:
    columns: dict            # linear -> {index: _Part}
    rows: dict               # linear -> (first, count) input columns of the rank
    kv_heads: int = 0        # per rank
    query_heads: int = 0
    model_kv_heads: int = 0


def _heads_plan(Hq: int, Hkv: int, tp: int, rank: int, site: fx.Node) -> tuple[int, int, int, int]:
    """(first query head, query heads, first KV head, KV heads) of the rank."""
    if Hq % tp:
        raise ConfigError(f"tp={tp} does not divide the {Hq} query heads of {_where(site)}")
    per = Hq // tp
    if Hkv % tp == 0:
        return rank * per, per, rank * (Hkv // tp), Hkv // tp
    if tp % Hkv:
        raise ConfigError(f"tp={tp} and the {Hkv} KV heads of {_where(site)}: neither divides the other, "
                          f"so the ranks' query heads cannot each read whole KV heads")
    return rank * per, per, (rank * per) // (Hq // Hkv), 1


def _where(node: fx.Node) -> str:
    model = node.graph.owning_module.meta.get("fusegen_model_class") or "the model"
    return f"{model} {module_path(node)}"


def _plan(gm: fx.GraphModule, tp: int, rank: int) -> _Plan:
    plan = _Plan({}, {})
    attention_ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        ops.attention.default, ops.dense_kv_attention.default, ops.paged_attention.default)]
    if not attention_ops:
        raise refusal(NAME, "no fused attention in the graph; tensor parallelism splits its heads", gm, WORKS)
    for site in attention_ops:
        k_node, v_node = _kv_inputs(gm, site)
        q, k, v = (_one_source(gm, n, what, site) for n, what in ((site.args[0], "query"), (k_node, "key"),
                                                                   (v_node, "value")))
        Hq, D = val(site.args[0]).shape[1], val(site.args[0]).shape[3]
        Hkv = val(k_node).shape[1]
        q_first, q_count, kv_first, kv_count = _heads_plan(Hq, Hkv, tp, rank, site)
        for part, role, heads, first, count in ((q, "q", Hq, q_first, q_count), (k, "k", Hkv, kv_first, kv_count),
                                                (v, "v", Hkv, kv_first, kv_count)):
            part.role, part.heads, part.first, part.count, part.head_dim = role, heads, first, count, D
            _add_column(gm, plan, part, heads * D, site)
        out = _output_projection(site)
        if out is None:
            raise refusal(NAME, "the attention's output does not reach an output projection (aten.linear) "
                          "through views alone", site, WORKS)
        plan.rows[out] = (q_first * D, q_count * D)
        plan.kv_heads, plan.query_heads, plan.model_kv_heads = kv_count, q_count, Hkv
    head = _lm_head(gm)
    for linear in call_nodes(gm, LINEAR):
        if linear in plan.rows or linear in plan.columns or linear is head:
            continue
        _plan_mlp(gm, plan, linear, tp, rank)
    return plan


def _add_column(gm: fx.GraphModule, plan: _Plan, part: _Part, width: int, site: fx.Node) -> None:
    widths = _widths(gm, part.linear)
    got = widths[part.index] if part.index is not None else widths[0]
    if got != width:
        raise refusal(NAME, f"a {part.role} projection of {got} features, not {width} (heads x head dim)",
                      site, WORKS)
    plan.columns.setdefault(part.linear, {})[part.index] = part


def _plan_mlp(gm: fx.GraphModule, plan: _Plan, linear: fx.Node, tp: int, rank: int) -> None:
    """``linear`` is row-parallel when its input is computed feature by feature from
    projections of its own input width (an MLP's down projection)."""
    parts, blocker = _sources(linear.args[0], _ELEMENTWISE | {operator.getitem})
    width = getattr_path(gm, linear.args[1].target).shape[1]
    if blocker is not None or not parts or any(p.linear in plan.rows or p.linear in plan.columns
                                               and p.index in plan.columns[p.linear] for p in parts):
        return
    if any(_widths(gm, p.linear)[p.index or 0] != width for p in parts):
        return
    if width % tp:
        raise ConfigError(f"tp={tp} does not divide the MLP width {width} of {_where(linear)}")
    for part in parts:
        part.role, part.first, part.count = "mlp", rank * (width // tp), width // tp
        plan.columns.setdefault(part.linear, {})[part.index] = part
    plan.rows[linear] = (rank * (width // tp), width // tp)


def _widths(gm: fx.GraphModule, linear: fx.Node) -> list[int]:
    """Output widths of ``linear``'s parts: its split sizes, or its whole output."""
    splits = [u for u in linear.users if u.target is aten.split_with_sizes.default]
    if splits:
        return list(splits[0].args[1])
    return [getattr_path(gm, linear.args[1].target).shape[0]]


def _lm_head(gm: fx.GraphModule) -> fx.Node | None:
    """The linear the graph's output is computed from by one-operand elementwise ops."""
    node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    node = node[0] if isinstance(node, (tuple, list)) else node
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is not LINEAR:
        inputs = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return node if isinstance(node, fx.Node) and node.target is LINEAR else None


# --- the rewrite ------------------------------------------------------------------------------

def _rows_of(part: _Part, start: int) -> torch.Tensor:
    """Indices, in the linear's output, of the rank's rows of ``part`` (starting at ``start``)."""
    if part.role == "mlp":
        return torch.arange(start + part.first, start + part.first + part.count)
    D = part.head_dim
    return torch.arange(start + part.first * D, start + (part.first + part.count) * D)


def _attribute(gm: fx.GraphModule, node: fx.Node | None):
    return getattr_path(gm, node.target) if isinstance(node, fx.Node) else None


def _shard_column(gm: fx.GraphModule, linear: fx.Node, parts: dict, index: int) -> None:
    widths = _widths(gm, linear)
    split = any(u.target is aten.split_with_sizes.default for u in linear.users)
    if set(parts) != (set(range(len(widths))) if split else {None}):
        raise refusal(NAME, f"only parts {sorted(k for k in parts if k is not None)} of a split projection "
                      f"feed attention or an MLP", linear, WORKS)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    keep = torch.cat([_rows_of(parts[i], starts[i or 0]) for i in sorted(parts, key=lambda i: i or 0)])
    weight, bias = _attribute(gm, linear.args[1]), _attribute(gm, linear.args[2] if len(linear.args) > 2 else None)
    args = [linear.args[0], add_buffer(gm, f"{PREFIX}{index}_weight", weight.detach()[keep].contiguous(), linear)]
    if bias is not None:
        args.append(add_buffer(gm, f"{PREFIX}{index}_bias", bias.detach()[keep].contiguous(), linear))
    linear.args = tuple(args)
    for split in [u for u in linear.users if u.target is aten.split_with_sizes.default]:
        split.args = (split.args[0], [parts[i].count * (parts[i].head_dim or 1) for i in range(len(widths))],
                      split.args[2])


def _shard_row(gm: fx.GraphModule, linear: fx.Node, first: int, count: int, rank: int, index: int,
               group: str) -> None:
    weight, bias = _attribute(gm, linear.args[1]), _attribute(gm, linear.args[2] if len(linear.args) > 2 else None)
    args = [linear.args[0], add_buffer(gm, f"{PREFIX}{index}_weight",
                                       weight.detach()[:, first:first + count].contiguous(), linear)]
    if bias is not None and rank == 0:   # added once, by rank 0's partial sum
        args.append(linear.args[2])
    linear.args = tuple(args)
    _after(gm, linear, lambda g, x: g.call_function(c10d.all_reduce.default, (x, "sum", group)))


def _after(gm: fx.GraphModule, node: fx.Node, collective) -> fx.Node:
    """Insert ``wait_tensor(collective(node))`` after ``node``, feeding its users."""
    users = list(node.users)
    with gm.graph.inserting_before(node.next):   # inserting_after(node) would reverse several nodes
        started = collective(gm.graph, node)
        done = gm.graph.call_function(c10d.wait_tensor.default, (started,))
    for user in users:
        user.replace_input_with(node, done)
    for new in (started, done):
        new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
    return done


def _gather_vocabulary(gm: fx.GraphModule, head: fx.Node, tp: int, rank: int, index: int, group: str) -> None:
    """logits_r [..., V/tp] -> all_gather over ranks along the last dim -> logits [..., V]."""
    weight = _attribute(gm, head.args[1])
    vocab = weight.shape[0] // tp
    rows = slice(rank * vocab, (rank + 1) * vocab)
    args = [head.args[0], add_buffer(gm, f"{PREFIX}{index}_weight", weight.detach()[rows].contiguous(), head)]
    bias = _attribute(gm, head.args[2] if len(head.args) > 2 else None)
    if bias is not None:
        args.append(add_buffer(gm, f"{PREFIX}{index}_bias", bias.detach()[rows].contiguous(), head))
    head.args = tuple(args)
    n = val(head).dim()
    first, last = [n - 1, *range(n - 1)], [*range(1, n), 0]

    def gather(graph: fx.Graph, x: fx.Node) -> fx.Node:
        # all_gather_into_tensor stacks along dim 0: the vocabulary goes first, then back last
        moved = graph.call_function(aten.permute.default, (x, first))
        packed = graph.call_function(aten.clone.default, (moved,), {"memory_format": torch.contiguous_format})
        return graph.call_function(c10d.all_gather_into_tensor.default, (packed, tp, group))

    done = _after(gm, head, gather)
    users = list(done.users)
    with gm.graph.inserting_before(done.next):
        back = gm.graph.call_function(aten.permute.default, (done, last))
        logits = gm.graph.call_function(aten.clone.default, (back,), {"memory_format": torch.contiguous_format})
    for user in users:
        user.replace_input_with(done, logits)


def _rank_pool(gm: fx.GraphModule, ctx: PassContext, plan: _Plan) -> None:
    """The cache input and ``ctx.facts["kv"]`` hold the rank's KV heads."""
    kv = ctx.facts.get("kv")
    if kv is None:
        return
    ctx.facts["kv"] = dataclasses.replace(kv, kv_heads=plan.kv_heads, query_heads=plan.query_heads)
    for name, axis in (("kv_pool", 4), ("kv_cache", 3)):
        node = placeholders(gm).get(name)
        if node is not None:
            shape = list(val(node).shape)
            shape[axis] = plan.kv_heads
            node.meta["val"] = fresh_val(gm, shape, val(node).dtype)


def _check_tp(ctx: PassContext) -> tuple[int, int, str]:
    group = ctx.tp_group
    tp = ctx.config.tp
    if group is None or group.size != tp:
        raise ConfigError(f"tp={tp}: the pass needs this process's rank among {tp} "
                          f"(fusegen.distributed.join), got {group}")
    return tp, group.rank, group.group_name


@graph_pass(NAME, ensures=lambda gm, ctx: _ensures(gm, ctx))
def shard_tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    tp, rank, group = _check_tp(ctx)
    plan = _plan(gm, tp, rank)
    stats: Counter = Counter()
    index = 0
    for linear, parts in plan.columns.items():
        _shard_column(gm, linear, parts, index)
        index += 1
    for linear, (first, count) in plan.rows.items():
        _shard_row(gm, linear, first, count, rank, index, group)
        index += 1
        stats["allreduces"] += 1
    head = _lm_head(gm)
    if head is not None and _attribute(gm, head.args[1]).shape[0] % tp == 0:
        _gather_vocabulary(gm, head, tp, rank, index, group)
        stats["allgathers"] += 1
        stats["sharded_linears"] += 1
    elif head is not None:
        log.info("%s: tp=%d does not divide the vocabulary of %d; the LM head is kept whole on every rank",
                 NAME, tp, _attribute(gm, head.args[1]).shape[0])
        stats["lm_head_replicated"] = 1
    if plan.model_kv_heads < tp:
        log.info("%s: %d KV heads are fewer than tp=%d ranks: each rank keeps the one its query heads read, "
                 "replicated on %d ranks", NAME, plan.model_kv_heads, tp, tp // plan.model_kv_heads)
        stats["kv_heads_replicated"] = 1
    _rank_pool(gm, ctx, plan)
    erase_unused(gm)
    try:
        propagate_shapes(gm, reuse=True)
    except Exception as exc:  # a view with a fixed head count or width
        raise refusal(NAME, f"the rank's graph does not type-check ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0]}); its views must leave the head count to -1", gm, WORKS) from exc
    stats["sharded_linears"] += len(plan.columns) + len(plan.rows)
    stats["replicated_linears"] = len(call_nodes(gm, LINEAR)) - stats["sharded_linears"]
    stats["kv_heads_per_rank"] = plan.kv_heads
    stats["query_heads_per_rank"] = plan.query_heads
    ctx.facts["tp"] = {"size": tp, "rank": rank}
    return PassResult(gm, True, dict(stats))


def _ensures(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    reduces = call_nodes(gm, c10d.all_reduce.default)
    waits = call_nodes(gm, c10d.wait_tensor.default)
    started = call_nodes(gm, *COLLECTIVES)
    problems = []
    if len(waits) != len(started):
        problems.append(f"{len(started)} collectives but {len(waits)} waits")
    if not reduces:
        problems.append("no all-reduce in a sharded graph")
    return problems
