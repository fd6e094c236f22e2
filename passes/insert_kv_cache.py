"""insert_kv_cache: the stateless full-sequence graph becomes a stateful step function.

Before:  logits = graph(input_ids [B,S], attention_mask [B,S], position_ids [B,S])
             ... out = fusegen.attention(q, k, v, attention_mask?, ...)

After:   logits = graph(input_ids [B,S], attention_mask [B,L], position_ids [B,S],
                        kv_cache [layers, 2, B, Hkv, Smax, D])
             ... fusegen.dense_kv_write(kv_cache, layer, k, v, attention_mask)
                 out = fusegen.dense_kv_attention(q, kv_cache, layer, attention_mask, ...)

``attention_mask`` now covers the whole context (L = cached + new tokens; the new tokens are
the last S); explicit ``position_ids`` drive rotary or learned positions. One call with S = the
prompt length is a prefill, further calls with S = 1 are decode steps. The layer index of an
attention site is its order in the graph.
"""

from __future__ import annotations

import torch
from torch import fx

from fusegen.kv import KVGeometry
from fusegen.passes.infra import (PassContext, PassResult, add_input, call_nodes, fresh_val,
                                  graph_pass, placeholders, refusal, val)

# What still works when the graph cannot hold a KV cache: attention as captured, the whole
# sequence recomputed each step.
STATELESS = "preset=stateless"

aten = torch.ops.aten
ops = torch.ops.fusegen


def _free_attention_mask(gm: fx.GraphModule, mask: fx.Node, ids: fx.Node) -> None:
    """The mask's length changes from S to L: sizes read off it must come from input_ids."""
    for user in list(mask.users):
        if user.target is aten.sym_size.int:
            user.args = (ids, user.args[1])
        elif user.target is not ops.attention.default:
            raise refusal("insert_kv_cache", f"attention_mask is used by {user.name} ({user.target}), "
                          f"not only by attention; cannot give it the cache length", user, STATELESS)


def kv_geometry(sites: list[fx.Node]) -> KVGeometry:
    k = val(sites[0].args[1])
    heads = {val(s.args[1]).shape[1] for s in sites}
    dims = {val(s.args[1]).shape[3] for s in sites}
    if len(heads) != 1 or len(dims) != 1:
        odd = next(s for s in sites if tuple(val(s.args[1]).shape[1::2]) != tuple(k.shape[1::2]))
        raise refusal("insert_kv_cache", f"layers differ in KV heads {sorted(heads)} or head dim "
                      f"{sorted(dims)}; one cache holds one geometry", odd, STATELESS)
    return KVGeometry(layers=len(sites), kv_heads=int(k.shape[1]), head_dim=int(k.shape[3]),
                      dtype=k.dtype, query_heads=int(val(sites[0].args[0]).shape[1]))


@graph_pass("insert_kv_cache", ensures=lambda gm, ctx: _ensures(gm))
def insert_kv_cache(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    unfused = ctx.facts.get("fuse_attention.unfused") or []
    if unfused:
        first = unfused[0].split(" ", 1)[0]
        at = next((n for n in gm.graph.nodes if n.name == first), gm)
        raise refusal("insert_kv_cache", f"{len(unfused)} attention site(s) were not fused, so their "
                      f"keys/values cannot be cached: " + "; ".join(unfused), at, STATELESS)
    sites = call_nodes(gm, ops.attention.default)
    if not sites:
        raise refusal("insert_kv_cache", "no attention in the graph that fuse_attention recognised, so there "
                      "are no keys/values to cache", gm, STATELESS)
    inputs = placeholders(gm)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    geometry = kv_geometry(sites)
    ctx.facts["kv"] = geometry
    _free_attention_mask(gm, mask, ids)
    batch = val(ids).shape[0]
    mask.meta["val"] = fresh_val(gm, (batch, None), torch.long)  # [B, L]: L is a new size
    cache = add_input(gm, "kv_cache", geometry.dense_shape(batch, None), geometry.dtype)
    for layer, site in enumerate(sites):
        q, k, v, _, scale, causal, window, softcap = site.args
        with gm.graph.inserting_before(site):
            gm.graph.call_function(ops.dense_kv_write.default, (cache, layer, k, v, mask))
            read = gm.graph.call_function(ops.dense_kv_attention.default,
                                          (q, cache, layer, mask, scale, causal, window, softcap))
        read.meta.update({k_: site.meta[k_] for k_ in ("val", "nn_module_stack", "stack_trace") if k_ in site.meta})
        site.replace_all_uses_with(read)
        gm.graph.erase_node(site)
    return PassResult(gm, True, {"layers_cached": len(sites), "kv_writes": len(sites)})


def _ensures(gm: fx.GraphModule) -> list[str]:
    problems = []
    if call_nodes(gm, ops.attention.default):
        problems.append("an attention op still reads k/v directly instead of the cache")
    writes = call_nodes(gm, ops.dense_kv_write.default)
    reads = call_nodes(gm, ops.dense_kv_attention.default)
    if sorted(w.args[1] for w in writes) != sorted(r.args[2] for r in reads):
        problems.append("every cached layer needs exactly one write and one read")
    return problems
