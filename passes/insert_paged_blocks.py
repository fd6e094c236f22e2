"""insert_paged_blocks: the dense per-sequence cache becomes one pool of fixed-size blocks
shared by every sequence.

After:   logits = graph(input_ids [1,T], position_ids [1,T], kv_pool, slot_mapping [T],
                        block_tables [N,M], seq_lens [N], query_start_loc [N+1],
                        logits_indices [R])          -> logits [1, R, V]

    kv_pool [layers, 2, num_blocks, block_size, Hkv, D]

    packed tokens   | seq 0 (3 new)  | seq 1 (1 new) | seq 2 (5 new)      |  T = 9
    query_start_loc   0                3               4                    9
    seq_lens          [ 3,               17,             5 ]   (cached + new)
    block_tables      [[ 4, -, -],     [ 0, 7, -],     [ 2, -, -]]   (block_size 16)

The tokens of all sequences are packed without padding, so one call mixes prefills (whole
or chunked) and decode steps; only attention knows where a sequence starts. The padding
mask disappears: a packed sequence has none. ``logits_indices`` picks the packed tokens whose
logits are wanted (the last of each sequence when decoding) before the LM head, so a long
prefill does not pay for a [T, vocab] product it throws away.
"""

from __future__ import annotations

import torch
from torch import fx

from fusegen.errors import PassError
from fusegen.kv import PAGED_INPUTS, KVGeometry
from fusegen.passes.infra import (PassContext, PassResult, add_input, call_nodes, erase_unused,
                                  fresh_val, graph_pass, placeholders, refresh_vals, refusal, val)

ops = torch.ops.fusegen
aten = torch.ops.aten
DENSE = "preset=dense_kv"   # one cache slab per sequence: works where paging cannot


# Elementwise ops a model may apply to the LM head's logits (Gemma2's final-logit
# softcapping: tanh(logits / cap) * cap); they stay, computed on the selected rows only.
_LOGIT_TAIL = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.tanh.default,
               aten.mul.Scalar, aten.div.Scalar, aten._to_copy.default, aten.softmax.int}


# The LM head: a linear, or its quantized form (quantize_weights with quantize_lm_head).
_LM_HEADS = {aten.linear.default, ops.quantized_linear.default}


def _logit_tail(gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node]]:
    """The LM-head linear the output is computed from, and the elementwise nodes between."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node, tail = output.args[0], []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _LOGIT_TAIL:
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        chained = [a for a in inputs if a.op != "get_attr"]
        if len(chained) != 1 or len(node.users) != 1:
            break
        tail.append(node)
        node = chained[0]
    if not (isinstance(node, fx.Node) and node.target in _LM_HEADS and len(node.users) == 1):
        raise refusal("insert_paged_blocks", f"graph output {output.args[0]} is not computed from an LM-head "
                      f"linear by elementwise ops (found {node}), so the logits of the sampled rows cannot "
                      f"be picked before it", node if isinstance(node, fx.Node) else gm, DENSE)
    return node, tail[::-1]


def _select_logit_rows(gm: fx.GraphModule) -> fx.Node:
    """Insert index_select(hidden, 1, logits_indices) before the LM head; the LM head and
    any elementwise tail after it then work on the selected rows."""
    head, tail = _logit_tail(gm)
    hidden = head.args[0]
    indices = add_input(gm, "logits_indices", (None,), torch.int32)
    with gm.graph.inserting_before(head):
        picked = gm.graph.call_function(aten.index_select.default, (hidden, 1, indices))
    h = val(hidden)
    picked.meta["val"] = fresh_val(gm, (h.shape[0], val(indices).shape[0], h.shape[2]), h.dtype)
    head.args = (picked,) + tuple(head.args[1:])
    head.meta["val"] = fresh_val(gm, (h.shape[0], val(indices).shape[0], val(head).shape[2]),
                                 val(head).dtype)
    if tail:
        refresh_vals(gm, tail)
    return picked


def _add_paged_inputs(gm: fx.GraphModule, geometry: KVGeometry) -> dict[str, fx.Node]:
    tokens = val(placeholders(gm)["input_ids"]).shape[1]
    pool = add_input(gm, "kv_pool", geometry.pool_shape(None), geometry.dtype)
    slots = add_input(gm, "slot_mapping", (tokens,), torch.int32)
    tables = add_input(gm, "block_tables", (None, None), torch.int32)
    n_seqs = val(tables).shape[0]
    lens = add_input(gm, "seq_lens", (n_seqs,), torch.int32)
    starts = add_input(gm, "query_start_loc", (n_seqs + 1,), torch.int32)
    return {"kv_pool": pool, "slot_mapping": slots, "block_tables": tables, "seq_lens": lens,
            "query_start_loc": starts}


@graph_pass("insert_paged_blocks", ensures=lambda gm, ctx: _ensures(gm))
def insert_paged_blocks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    writes = call_nodes(gm, ops.dense_kv_write.default)
    reads = call_nodes(gm, ops.dense_kv_attention.default)
    if not reads:
        raise PassError("insert_paged_blocks", "no cached attention in the graph (run insert_kv_cache first)")
    geometry = ctx.facts["kv"].with_blocks(ctx.config.block_size)
    paged = _add_paged_inputs(gm, geometry)
    for node in writes:
        _, layer, k, v, _ = node.args
        with gm.graph.inserting_before(node):
            gm.graph.call_function(ops.paged_kv_write.default, (paged["kv_pool"], layer, k, v,
                                                                 paged["slot_mapping"]))
        gm.graph.erase_node(node)
    for node in reads:
        q, _, layer, _, scale, causal, window, softcap = node.args
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(ops.paged_attention.default, (
                q, paged["kv_pool"], layer, paged["block_tables"], paged["seq_lens"],
                paged["query_start_loc"], scale, causal, window, softcap))
        new.meta.update({k_: node.meta[k_] for k_ in ("val", "nn_module_stack", "stack_trace") if k_ in node.meta})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    inputs = placeholders(gm)
    for stale in ("attention_mask", "kv_cache"):
        if inputs[stale].users:
            user = next(iter(inputs[stale].users))
            raise refusal("insert_paged_blocks", f"{stale} is still used by "
                          f"{[u.name for u in inputs[stale].users]}; packed sequences have none", user, DENSE)
        gm.graph.erase_node(inputs[stale])
    _select_logit_rows(gm)
    erase_unused(gm)
    ctx.facts["kv"] = geometry
    return PassResult(gm, True, {"paged_writes": len(writes), "paged_attention": len(reads)})


def _ensures(gm: fx.GraphModule) -> list[str]:
    problems = []
    if call_nodes(gm, ops.dense_kv_write.default, ops.dense_kv_attention.default, ops.attention.default):
        problems.append("dense attention/cache ops left after paging")
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if names != list(PAGED_INPUTS):
        problems.append(f"paged inputs {names}, expected {list(PAGED_INPUTS)} in that order")
    missing = [name for name in PAGED_INPUTS if name not in placeholders(gm)]
    if missing:
        problems.append(f"missing paged inputs {missing}")
    return problems
