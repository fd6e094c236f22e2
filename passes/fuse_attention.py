"""fuse_attention: every attention site -> one ``fusegen.attention`` op.

Recognised forms (after cleanup_graph and normalize_graph):

    # "sdpa": HF sdpa path, torch code calling F.scaled_dot_product_attention
    out = scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask, scale=s)

    # "eager": HF eager path, hand-written attention
    scores = matmul(q, transpose(k, 2, 3)) * s                 # or q pre-scaled
    scores = softcap * tanh(scores * (1/softcap))              # optional
    scores = scores + mask   |   masked_fill(scores, mask, -inf)   # optional
    out = matmul(softmax(scores, -1).to(dtype), v)

``repeat_kv`` (unsqueeze -> expand -> reshape, or repeat_interleave) is undone so the op sees
k/v with their own head count. The mask's meaning (causal, sliding window, key padding) is
recovered by evaluating its subgraph (attention_mask.py); a site whose mask is anything
else (an additive bias, a non-causal pattern we cannot express) is left as it was and
reported, or refused under ``strict``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from fusegen.passes.attention_mask import MaskNotRecognised, MaskSemantics, analyze_mask
from fusegen.passes.infra import (PassContext, PassResult, call_nodes, erase_unused, graph_pass, module_path,
                                  refusal, val)

aten = torch.ops.aten
fusegen_attention = torch.ops.fusegen.attention.default

SOFTMAX = (aten._softmax.default, aten.softmax.int)
CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class NotAttention(Exception):
    """The candidate is not an attention site we can prove equivalent."""


@dataclass
class Site:
    form: str
    out: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    # masks applied to the scores, with their kind: "bool" (True = keep), "additive"
    # (0 / -inf added), "fill" (masked_fill: True = masked)
    masks: tuple = ()
    causal_flag: bool = False
    softcap: float = 0.0
    enable_gqa: bool = False  # SDPA maps each group of query heads to one K/V head
    notes: list = field(default_factory=list)


# --- matching helpers -----------------------------------------------------------------------

def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _skip_casts(node):
    while _is(node, *CASTS):
        node = node.args[0]
    return node


def _scalar_mul(node):
    """(x, c) if node is ``x * c`` with a Python scalar c, else None."""
    if _is(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1])
    return None


def unexpand_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """Undo repeat_kv: returns (k with its own heads, group size)."""
    if _is(node, aten.repeat_interleave.self_int):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim == 1:
            return node.args[0], int(node.args[1])
    if _is(node, *VIEWS):
        inner = node.args[0]
        if _is(inner, aten.expand.default) and _is(inner.args[0], aten.unsqueeze.default) \
                and inner.args[0].args[1] == 2:
            base = inner.args[0].args[0]
            b, e = val(base), val(inner)
            if b is not None and e is not None and e.dim() == 5 and b.dim() == 4:
                group = e.shape[2]
                if isinstance(group, int):
                    return base, group
    return node, 1


# --- the two forms --------------------------------------------------------------------------

def match_sdpa(node: fx.Node) -> Site:
    _, kw = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if kw.get("dropout_p", 0.0) != 0.0:
        raise NotAttention("dropout_p != 0")
    q = kw["query"]
    scale = kw.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(val(q).shape[-1])
    mask = kw.get("attn_mask")
    masks = () if mask is None else ((mask, "bool" if val(mask).dtype == torch.bool else "additive"),)
    return Site("sdpa", node, q, kw["key"], kw["value"], float(scale), masks,
                bool(kw.get("is_causal", False)), enable_gqa=bool(kw.get("enable_gqa", False)))


def match_eager(softmax: fx.Node) -> Site:
    rank = val(softmax).dim()
    if softmax.args[1] % rank != rank - 1:
        raise NotAttention("softmax not over the last dim")
    # forward: softmax -> casts -> matmul(P, v)
    probs = softmax
    while len(probs.users) == 1 and _is(next(iter(probs.users)), *CASTS):
        probs = next(iter(probs.users))
    users = list(probs.users)
    if len(users) != 1 or not _is(users[0], aten.matmul.default) or users[0].args[0] is not probs:
        raise NotAttention("softmax output does not feed one matmul with values")
    out, v = users[0], users[0].args[1]
    # backward: mask, softcap, scale, matmul(q, k^T)
    scores, masks = _peel_masks(_skip_casts(softmax.args[0]))
    softcap = 0.0
    capped = _scalar_mul(scores)
    if capped and _is(capped[0], aten.tanh.default):
        inner = _scalar_mul(capped[0].args[0])
        if inner and abs(inner[1] * capped[1] - 1.0) < 1e-6:
            softcap, scores = capped[1], inner[0]
    scale = 1.0
    scaled = _scalar_mul(scores)
    if scaled:
        scores, scale = scaled
    if not _is(scores, aten.matmul.default):
        raise NotAttention("scores are not matmul(q, k^T)")
    q, kt = scores.args
    if not (_is(kt, aten.transpose.int) and tuple(kt.args[1:3]) == (2, 3)):
        raise NotAttention("keys are not transposed on the last two dims")
    k = kt.args[0]
    for side in ("q", "k"):
        pre = _scalar_mul(q if side == "q" else k)
        if pre:
            scale *= pre[1]
            q, k = (pre[0], k) if side == "q" else (q, pre[0])
    return Site("eager", out, q, k, v, scale, masks, False, softcap)


def _peel_masks(scores: fx.Node):
    """Strip every ``+ mask`` / ``masked_fill(mask, -inf)`` off the scores, outermost first."""
    masks = []
    while True:
        if _is(scores, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in scores.args):
            scores, mask = _split_mask(scores)
            masks.append((mask, "additive"))
        elif _is(scores, aten.masked_fill.Scalar) and scores.args[2] <= -1e4:
            masks.append((scores.args[1], "fill"))
            scores = scores.args[0]
        else:
            return _skip_casts(scores), tuple(masks)
        scores = _skip_casts(scores)


def _split_mask(add: fx.Node):
    """add(scores, mask): the mask is the operand that does not depend on a matmul."""
    a, b = add.args
    if _depends_on_matmul(a) and not _depends_on_matmul(b):
        return a, b
    if _depends_on_matmul(b) and not _depends_on_matmul(a):
        return b, a
    raise NotAttention("cannot tell scores from mask in the add")


def _depends_on_matmul(node: fx.Node, limit: int = 12) -> bool:
    frontier, seen = [node], set()
    for _ in range(limit):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _is(n, aten.matmul.default, aten.bmm.default, aten.linear.default):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


# --- semantics and rewrite ------------------------------------------------------------------

def _head_group(site: Site, k: fx.Node, group: int) -> int:
    """Query heads per K/V head. Besides repeat_kv (undone by unexpand_kv), K/V with one head
    broadcast over all query heads (multi-query attention as Falcon-7B writes it: SDPA and
    matmul both broadcast the head dim), and SDPA's ``enable_gqa`` maps each group of query
    heads to one K/V head."""
    qv, kv = val(site.q), val(k)
    if group != 1 or qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        return group
    hq, hk = qv.shape[1], kv.shape[1]
    if isinstance(hq, int) and isinstance(hk, int) and hk != hq and (hk == 1 or site.enable_gqa and hq % hk == 0):
        return hq // hk
    return group


def _check_shapes(site: Site, k: fx.Node, v: fx.Node, group: int) -> None:
    qv, kv, vv = val(site.q), val(k), val(v)
    if any(t is None or t.dim() != 4 for t in (qv, kv, vv)):
        raise NotAttention("q, k, v are not 4-d [B, H, S, D]")
    if kv.shape[1] * group != qv.shape[1] or vv.shape[1] != kv.shape[1]:
        raise NotAttention(f"head counts do not line up: q {qv.shape[1]}, k {kv.shape[1]} x{group}, "
                           f"v {vv.shape[1]}")


def _semantics(gm, site: Site, probe_len: int, cache: dict) -> MaskSemantics:
    if not site.masks:
        return MaskSemantics(site.causal_flag, 0, False)
    key = site.masks
    if key not in cache:
        try:
            device = val(_attention_mask_input(gm)).device  # the graph's constants live there
            cache[key] = analyze_mask(gm, list(site.masks), probe_len, device)
        except MaskNotRecognised as exc:
            cache[key] = exc
    sem = cache[key]
    if isinstance(sem, Exception):
        raise NotAttention(str(sem))
    if site.causal_flag and not sem.causal:
        sem = MaskSemantics(True, sem.window, sem.key_padding)
    return sem


def _attention_mask_input(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "attention_mask")


def _rewrite(gm: fx.GraphModule, site: Site, k, v, sem: MaskSemantics) -> fx.Node:
    key_mask = _attention_mask_input(gm) if sem.key_padding else None
    with gm.graph.inserting_before(site.out):
        fused = gm.graph.call_function(
            fusegen_attention,
            (site.q, k, v, key_mask, site.scale, sem.causal, sem.window, site.softcap))
    fused.meta["val"] = val(site.out)
    fused.meta["fusegen_attention_form"] = site.form
    fused.meta["stack_trace"] = site.out.meta.get("stack_trace")
    fused.meta["nn_module_stack"] = site.out.meta.get("nn_module_stack")
    site.out.replace_all_uses_with(fused)
    # SDPA carries the nondeterministic_seeded tag (dropout), which DCE treats as impure.
    gm.graph.erase_node(site.out)
    return fused


def find_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, object]]:
    """Candidate nodes with their matcher, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if _is(node, aten.scaled_dot_product_attention.default):
            found.append((node, match_sdpa))
        elif _is(node, *SOFTMAX):
            found.append((node, match_eager))
    return found


@graph_pass("fuse_attention", ensures=lambda gm, ctx: _ensures(gm, ctx))
def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats: Counter = Counter()
    cache: dict = {}
    unfused, unfused_nodes = [], []
    for node, matcher in find_sites(gm):
        try:
            site = matcher(node)
            k, group_k = unexpand_kv(site.k)
            v, group_v = unexpand_kv(site.v)
            if group_k != group_v:
                raise NotAttention(f"k and v repeated differently ({group_k} vs {group_v})")
            group_k = _head_group(site, k, group_k)
            _check_shapes(site, k, v, group_k)
            sem = _semantics(gm, site, ctx.config.max_seq_len, cache)
        except NotAttention as exc:
            unfused.append(f"{node.name} in {module_path(node)}: {exc}")
            unfused_nodes.append(node)
            stats["unfused"] += 1
            continue
        _rewrite(gm, site, k, v, sem)
        stats[f"fused_{site.form}"] += 1
        stats["fused"] += 1
        stats["causal"] += sem.causal
        stats["sliding_window"] += sem.window > 0
        stats["gqa"] += group_k > 1
        stats["key_padding"] += sem.key_padding
        stats["softcap"] += site.softcap > 0
    ctx.facts["fuse_attention.unfused"] = unfused
    if unfused and ctx.config.strict:
        raise refusal("fuse_attention", f"{len(unfused)} attention site(s) left unfused: " + "; ".join(unfused),
                      unfused_nodes[0], works="preset=stateless (unfused sites then run as captured)")
    if stats["fused"]:
        erase_unused(gm)
    return PassResult(gm, stats["fused"] > 0, dict(+stats))


def _ensures(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    problems = []
    for node in call_nodes(gm, fusegen_attention):
        q, k = val(node.args[0]), val(node.args[1])
        if q.shape[1] % k.shape[1]:
            problems.append(f"{node.name}: {q.shape[1]} query heads over {k.shape[1]} KV heads")
    if ctx.config.strict and call_nodes(gm, aten.scaled_dot_product_attention.default):
        problems.append("strict: scaled_dot_product_attention left in the graph")
    return problems
