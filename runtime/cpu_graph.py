"""The paged step graph as the CPU runs it: one flat generated forward over the ops'
reference implementations, computing what the graph computes (bitwise, but for the linears:
see cpu_rewrites.onednn_linear).

On the CPU every op of a decode step is small, so what a step costs beyond the weight reads
is per-op overhead. First a flat copy of the graph:

    fused_3 = self.fused_3(x, y, w)          the group's reference nodes, inlined
    out = fused_3[0]                   ──▶   (no module call, no tuple)

    paged_attention(q, pool, 7, bt, sl, qsl, ...)   plan = step_plan(pool, bt, sl, qsl)   once
                                       ──▶   cpu_ops.paged_attention(q, pool, 7, plan, ...)

    paged_kv_write(pool, 7, k, v, slot_mapping)     slots = kv_slots(pool, slot_mapping)   once
                                       ──▶   cpu_ops.paged_kv_write(pool, 7, k, v, slots)

What every layer of a step shares (sequences grouped by query count, their blocks, masks
and slots) is made once (cpu_ops.py). Then the rewrites of cpu_rewrites.REWRITES, in order
(merged repeats, RMSNorm, rotary, q's and k's rotary in one call, attention laid out by token
for the output projection, oneDNN linears: the engine leaves the last out where
cpu_rewrites.onednn_linear_pays finds them slower than aten.linear on this CPU), the fusegen
ops left called as their Python functions (no dispatcher, autograd or dynamo wrappers), and
every aten overload through torch's own binding. The graph the caller holds is left as it
was; the GPU never runs this copy (its FusedGroups and attention ops launch kernels).

Weights: a decode step is one row times every weight matrix, and the CPU BLAS reads a
[out, in] weight stored column-major (``w.t().contiguous().t()``: the same values, strides
(1, out)) about 1.4x faster in that product than the row-major original (SmolLM2-135M: all
linears of a step 35 ms -> 25 ms on 2 cores). ``column_major_weights`` gives the graph's
linears such copies (a CompiledModel on the CPU does it once, compiled or loaded alike); it
changes strides only, never values. oneDNN's inner product (cpu_rewrites.onednn_linear) is
the other way round: on a 2-core AMD EPYC it reads the row-major weights faster (SmolLM2-135M
decode step 39.3 -> 34.1 ms), so where the engine takes it, ``row_major_weights`` lays them
back.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Collection

import torch
from torch import fx

from fusegen import ops
from fusegen.fused_group import FusedGroup
from fusegen.runtime import cpu_ops, cpu_rewrites

PAGED_ATTENTION = torch.ops.fusegen.paged_attention.default
PAGED_KV_WRITE = torch.ops.fusegen.paged_kv_write.default
LINEAR = torch.ops.aten.linear.default


def column_major_weights(gm: fx.GraphModule) -> int:
    """Give every 2-D row-major weight that ``gm``'s linears read a column-major copy, in place
    of the attribute in ``gm`` (a Parameter of the source model is replaced in ``gm`` only,
    never changed); returns how many attributes were re-laid. Ops that read the same
    attribute (a tied embedding) read the copy too: same values, other strides."""
    return _relay_weights(gm, column_major=True)


def row_major_weights(gm: fx.GraphModule) -> int:
    """``column_major_weights`` undone: every 2-D column-major weight ``gm``'s linears read
    replaced by its row-major (contiguous) copy; how many were re-laid."""
    return _relay_weights(gm, column_major=False)


def _relay_weights(gm: fx.GraphModule, column_major: bool) -> int:
    relaid = 0
    for target in _linear_weight_targets(gm):
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        weight = getattr(owner, name)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or 1 in weight.shape:
            continue
        if column_major != weight.is_contiguous() or weight.stride() not in ((weight.shape[1], 1), (1, weight.shape[0])):
            continue
        copy = weight.detach().t().contiguous().t() if column_major else weight.detach().contiguous()
        if isinstance(weight, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=False)
            owner._parameters[name] = copy
        elif name in owner._buffers:
            owner._buffers[name] = copy
        else:
            setattr(owner, name, copy)
        relaid += 1
    return relaid


def linear_weights(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The 2-D weights ``gm``'s linears read (each attribute once), in the graph's order."""
    weights = [operator.attrgetter(target)(gm) for target in _linear_weight_targets(gm)]
    return [w for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2]


def _linear_weight_targets(gm: fx.GraphModule) -> list[str]:
    """The attribute names of the weights ``gm``'s linears read, each once, in graph order."""
    targets = dict.fromkeys(n.args[1].target for n in gm.graph.nodes
                            if n.op == "call_function" and n.target is LINEAR and len(n.args) > 1
                            and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr")
    return list(targets)


def cpu_step_graph(gm: fx.GraphModule, leave_out: Collection[str] = ()) -> tuple[fx.GraphModule, Counter]:
    """A flat copy of the step graph ``gm`` for the CPU, and counts of what was rewritten:
    ``groups_inlined``, ``groups_called`` (kept as a call: their graph reads attributes),
    ``plans``, ``attention_planned``, ``kv_slots``, ``kv_writes_planned``, one count per
    rewrite of cpu_rewrites.REWRITES but those named in ``leave_out``, ``direct_ops``,
    ``python_bindings`` and ``attributes_flat``."""
    unknown = set(leave_out) - {name for name, _ in cpu_rewrites.REWRITES}
    if unknown:
        raise ValueError(f"cpu_step_graph: no rewrite named {sorted(unknown)}; the rewrites are "
                         f"{[name for name, _ in cpu_rewrites.REWRITES]}")
    graph, stats = _flat_copy(gm)
    for name, rewrite in cpu_rewrites.REWRITES:
        if name not in leave_out:
            stats[name] += rewrite(graph)
    for node in graph.nodes:   # the copied groups' nodes too
        direct = ops.reference(node.target) if node.op == "call_function" else None
        if direct is not None:
            node.target = direct
            stats["direct_ops"] += 1
    stats["python_bindings"] += cpu_rewrites.python_bindings(graph)
    root, stats["attributes_flat"] = _flat_attributes(gm, graph)
    graph.lint()
    return fx.GraphModule(root, graph, class_name="CPUStepGraph"), stats


def _flat_attributes(gm: fx.GraphModule, graph: fx.Graph) -> tuple[dict, int]:
    """The attributes ``graph`` reads, for a GraphModule root: each tensor under one flat
    name, a plain attribute of the module (a Parameter as its detached alias: same storage),
    so that reading it is one lookup. ``self.m.model.layers[7].mlp.down_proj.weight`` costs
    six nn.Module.__getattr__ calls every step, for every weight of every layer. Also the
    number of tensors so renamed."""
    root, names = {}, {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = gm.get_submodule(node.target)
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(gm)
            if not isinstance(value, torch.Tensor):
                root[node.target] = value
                continue
            if node.target not in names:
                name = base = node.target.replace(".", "_")
                while name in root:
                    name = f"{base}_{len(names)}"
                names[node.target] = name
                root[name] = value.detach() if isinstance(value, torch.nn.Parameter) else value
            node.target = names[node.target]
    return root, len(names)


def _flat_copy(gm: fx.GraphModule) -> tuple[fx.Graph, Counter]:
    """``gm``'s graph with FusedGroups inlined, and the paged attention and KV write of every
    layer over what the step's layers share, made once (cpu_ops.py)."""
    graph, env, shared, stats = fx.Graph(), {}, {}, Counter()

    def once(make, args: tuple, count: str) -> fx.Node:
        if (make, *args) not in shared:
            shared[make, *args] = graph.call_function(make, args)
            stats[count] += 1
        return shared[make, *args]

    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FusedGroup) and _inlinable(module.reference):
            inputs = [p for p in module.reference.graph.nodes if p.op == "placeholder"]
            env[node] = graph.graph_copy(module.reference.graph, {
                p: _mapped(a, env) for p, a in zip(inputs, node.args)})
            stats["groups_inlined"] += 1
        elif isinstance(module, FusedGroup):
            env[node] = graph.call_module(f"{node.target}.reference", _mapped(node.args, env))
            stats["groups_called"] += 1
        elif node.target is operator.getitem and isinstance(env.get(node.args[0]), (tuple, list)):
            env[node] = env[node.args[0]][node.args[1]]
        elif node.target is PAGED_ATTENTION:
            q, pool, layer, tables, lens, starts, *rest = _mapped(node.args, env)
            plan = once(cpu_ops.step_plan, (pool, tables, lens, starts), "plans")
            env[node] = graph.call_function(cpu_ops.paged_attention, (q, pool, layer, plan, *rest))
            stats["attention_planned"] += 1
        elif node.target is PAGED_KV_WRITE:
            pool, layer, k, v, slot_mapping, *scales = _mapped(node.args, env)
            slots = once(cpu_ops.kv_slots, (pool, slot_mapping), "kv_slots")
            env[node] = graph.call_function(cpu_ops.paged_kv_write, (pool, layer, k, v, slots, *scales))
            stats["kv_writes_planned"] += 1
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return graph, stats


def _inlinable(reference: fx.GraphModule) -> bool:
    """A group graph of plain calls only (no attributes of the group to carry over)."""
    return all(n.op in ("placeholder", "call_function", "output") for n in reference.graph.nodes)


def _mapped(args, env: dict):
    return fx.node.map_arg(args, lambda n: env[n])
