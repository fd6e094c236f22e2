"""convert_mha_to_gqa (opt-in, lossy): reduce every layer's KV heads to ``gqa_kv_heads``.

Contiguous groups of ``r = Hkv / target`` key/value heads become one head (query heads keep
their order, so query head h now reads KV head h // (Hq / target)). The K and V projection
weights and biases are replaced by merged ones (see gqa_merge.py for ``mean`` and ``lsq``),
the head count in the reshape after each projection follows, and the attention ops read
the smaller k/v as they are — their group size comes from the shapes.

``refit`` (gqa_refit.py for the arithmetic, gqa_layers.py for the graph side) first groups
the KV heads whose keys and values are most alike and reorders the heads so that each group
is contiguous (query heads follow their KV head: rows of q_proj, columns of o_proj), then
refits the layers one after another, in the order the graph runs them: each layer gets the
activations the already converted layers produce and fits its merged K/V and its Q and O
projections (D x D factors per head, from the lsq merge) so that the residual stream after
its attention is the original model's again. ``gqa_refit_steps`` Adam steps per layer.

Quality is always measured: perplexity of the graph on the calibration tokens before and
after, and how far each layer's attention output (as the residual stream after it) is from
the original's (``attention_error_after``, mean over layers of the relative squared error),
reported in the pass counters together with the KV-cache bytes per token.

Supported projections: separate ``linear`` K/V projections (Llama, Mistral, Qwen2, ...) and
GPT-2's fused Conv1D ``c_attn`` (``addmm`` into [q | k | v] columns, then ``split``); ``refit``
needs separate q/k/v/o linears and rotary (if any) in the rotate_half layout.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from fusegen.errors import PassError
from fusegen.passes import gqa_merge, gqa_refit
from fusegen.passes.gqa_layers import (AttentionLayer, Recorder, SequentialRefit, between, graph_args,
                                       heads, linear_weights, permute_heads, residual_add, rotary_of,
                                       set_linear, set_weight)
from fusegen.passes.infra import (PassContext, PassResult, call_nodes, erase_unused, getattr_path,
                                  graph_pass, refresh_vals, refusal, val)

aten = torch.ops.aten
attention_op = torch.ops.fusegen.attention.default
NAME = "convert_mha_to_gqa"
KEEP_HEADS = "gqa_kv_heads=0"   # the model's own KV heads: the conversion is opt-in


def _back_to_linear(start: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The one ``linear`` (or Conv1D ``addmm``) feeding ``start``, not looking past
    projections, and the nodes between."""
    seen, stack, linears = set(), [start], []
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in (aten.linear.default, aten.addmm.default):
            linears.append(node)
            continue
        if node.target is aten.split_with_sizes.default and node.args[0].target is aten.linear.default:
            raise PassError(NAME, f"{node.name}: projections were already fused; run before fuse_projections")
        stack.extend(node.all_input_nodes)
    weight = linears[0].args[2 if linears[0].target is aten.addmm.default else 1] if linears else None
    if len(linears) != 1 or weight.op != "get_attr":
        raise refusal(NAME, f"{start.name}: expected one linear projection with a weight "
                            f"attribute, found {[n.name for n in linears]}", start, KEEP_HEADS)
    return linears[0], [n for n in seen if n is not linears[0]]


def _output_weight(gm: fx.GraphModule, site: fx.Node) -> torch.Tensor:
    """o_proj's weight in linear layout [hidden, Hq*D]."""
    proj = _forward_to_linear(site)
    if proj.target is aten.addmm.default:
        return getattr_path(gm, proj.args[2].target).t()
    return getattr_path(gm, proj.args[1].target)


def _forward_to_linear(start: fx.Node) -> fx.Node:
    frontier = list(start.users)
    for _ in range(8):
        for node in frontier:
            if node.target in (aten.linear.default, aten.addmm.default):
                return node
        frontier = [u for n in frontier for u in n.users]
    raise refusal(NAME, f"{start.name}: no output projection found after attention", start, KEEP_HEADS)


def _is_rotary(path: list[fx.Node], head_dim: int) -> bool:
    if any(n.target is torch.ops.fusegen.rotate_half.default for n in path):
        return True  # normalize_graph recognised the rotate_half layout
    if any(n.target is aten.cat.default for n in path):
        cat = next(n for n in path if n.target is aten.cat.default)
        raise refusal(NAME, "rotary embedding found but not in rotate_half layout", cat, "gqa_method=mean")
    return False


def _calibrate(gm: fx.GraphModule, sites: list[fx.Node], ids: torch.Tensor, wanted=()):
    """Per site: sum over calibration tokens of q q^T per query head [Hq, D, D]; perplexity;
    and the values of the ``wanted`` nodes."""
    rec = _MomentRecorder(gm, wanted)
    with torch.no_grad():
        logits = rec.run(*graph_args(ids))
    return [rec.moments[site].float() for site in sites], _perplexity(logits, ids), rec.values


class _MomentRecorder(Recorder):
    def __init__(self, gm, wanted):
        super().__init__(gm, wanted)
        self.moments = {}

    def call_function(self, target, args, kwargs):
        if target is attention_op:
            q = args[0].double()
            self.moments[self.current] = torch.einsum("bhsd,bhse->hde", q, q)
        return super().call_function(target, args, kwargs)

    def run_node(self, n):
        self.current = n
        return super().run_node(n)


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       ids[:, 1:].reshape(-1))
    return math.exp(loss.item())


def _rewrite_projection(gm, linear: fx.Node, B: torch.Tensor, group: int, tag: str,
                        old_heads: int, new_heads: int) -> None:
    W = getattr_path(gm, linear.args[1].target)
    set_weight(gm, linear, 1, f"fusegen_gqa_{tag}_weight", gqa_merge.merge_weight(W, B, group))
    if len(linear.args) > 2 and linear.args[2] is not None:
        b = getattr_path(gm, linear.args[2].target)
        set_weight(gm, linear, 2, f"fusegen_gqa_{tag}_bias", gqa_merge.merge_bias(b, B, group))
    _follow_head_count(linear, old_heads, new_heads)


def _follow_head_count(linear: fx.Node, old_heads: int, new_heads: int) -> None:
    for user in linear.users:  # [B, S, H, D] reshape with an explicit head count
        if user.target in (aten.view.default, aten.reshape.default) and len(user.args[1]) == 4 \
                and user.args[1][2] == old_heads:
            shape = list(user.args[1])
            shape[2] = new_heads
            user.args = (user.args[0], shape)


def _merges(method: str, q_moments, W_o, rotary: bool, Hq: int, Hkv: int, D: int, group: int):
    if method == "mean":
        B = gqa_merge.mean_matrices(Hkv, D, group)
        return B, B
    C = q_moments.reshape(Hkv, Hq // Hkv, D, D).sum(1)
    if rotary:
        C = gqa_merge.rotary_commutant(C)
    M = gqa_merge.output_metrics(W_o, Hq, Hkv)
    return gqa_merge.merge_matrices(C, group), gqa_merge.merge_matrices(M, group)


def _rewrite_fused_qkv(gm, addmm: fx.Node, Bk, Bv, group: int, layer: int, kv_cols: int) -> list[fx.Node]:
    """GPT-2 Conv1D: addmm(bias, x, W[in, q|k|v]) -> view -> split -> getitem 0/1/2."""
    bias, W = getattr_path(gm, addmm.args[0].target), getattr_path(gm, addmm.args[2].target)
    q_cols = W.shape[1] - 2 * kv_cols
    wq, wk, wv = W.split([q_cols, kv_cols, kv_cols], dim=1)
    bq, bk, bv = bias.split([q_cols, kv_cols, kv_cols])
    wk2, wv2 = (gqa_merge.merge_weight(w.t(), B, group).t() for w, B in ((wk, Bk), (wv, Bv)))
    bk2, bv2 = gqa_merge.merge_bias(bk, Bk, group), gqa_merge.merge_bias(bv, Bv, group)
    set_weight(gm, addmm, 2, f"fusegen_gqa_qkv{layer}_weight", torch.cat([wq, wk2, wv2], 1).contiguous())
    set_weight(gm, addmm, 0, f"fusegen_gqa_qkv{layer}_bias", torch.cat([bq, bk2, bv2]))
    new_cols, total = wk2.shape[1], q_cols + 2 * wk2.shape[1]
    touched = [addmm]
    for view in [u for u in addmm.users if u.target is aten.view.default]:
        view.args = (view.args[0], list(view.args[1][:-1]) + [total])
        touched.append(view)
        for split in [u for u in view.users if u.target is aten.split.Tensor]:
            split.target = aten.split_with_sizes.default
            split.args = (view, [q_cols, new_cols, new_cols], split.args[2])
            touched += [split, *[g for g in split.users if g.target is operator.getitem]]
    return touched


@graph_pass(NAME)
def convert_mha_to_gqa(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    target, method = ctx.config.gqa_kv_heads, ctx.config.gqa_method
    sites = call_nodes(gm, attention_op)
    if not sites:
        raise refusal(NAME, "no fused attention to convert", gm, KEEP_HEADS)
    Hq, Hkv, D = val(sites[0].args[0]).shape[1], val(sites[0].args[1]).shape[1], val(sites[0].args[1]).shape[3]
    if target >= Hkv:
        return PassResult(gm, False, {"kv_heads_before": Hkv, "kv_heads_after": Hkv})
    if Hkv % target:
        divisors = [str(d) for d in range(1, Hkv) if Hkv % d == 0]
        raise refusal(NAME, f"cannot merge {Hkv} KV heads into {target}: {target} does not divide {Hkv}",
                      sites[0], f"gqa_kv_heads={' or '.join(divisors)}" if divisors else KEEP_HEADS)
    if ctx.calibration_ids is None:
        raise PassError(NAME, "needs calibration_ids (token ids of real text) to fit and to measure "
                              "the conversion; fusegen.data.calibration_text() is English text to tokenize")
    ids = ctx.calibration_ids
    layers = [_attention_layer(i, site, D) for i, site in enumerate(sites)] if method == "refit" else None
    outputs = [_layer_output(site) for site in sites]
    wanted = outputs + ([n for layer in layers for n in (layer.k, layer.v)] if layers else [])
    moments, ppl_before, original = _calibrate(gm, sites, ids, wanted)
    if method == "refit":
        touched, extra = _refit(gm, layers, ids, target, ctx.config.gqa_refit_steps, original)
    else:
        touched, extra = _merge(gm, sites, method, moments, target), {}
    refresh_vals(gm, touched)
    erase_unused(gm)
    gm.recompile()
    _, ppl_after, converted = _calibrate(gm, sites, ids, outputs)
    itemsize = val(sites[0].args[1]).element_size()
    stats = {
        "layers_converted": len(sites), "kv_heads_before": Hkv, "kv_heads_after": target,
        "kv_bytes_per_token_before": 2 * len(sites) * Hkv * D * itemsize,
        "kv_bytes_per_token_after": 2 * len(sites) * target * D * itemsize,
        "calibration_ppl_before": round(ppl_before, 3), "calibration_ppl_after": round(ppl_after, 3),
        "attention_error_after": round(_relative_error(original, converted, outputs), 4),
        **extra,
    }
    return PassResult(gm, True, stats)


def _merge(gm: fx.GraphModule, sites: list[fx.Node], method: str, moments, target: int) -> list[fx.Node]:
    """``mean`` and ``lsq``: every layer's K/V projection weights merged in closed form."""
    Hq, Hkv, D = val(sites[0].args[0]).shape[1], val(sites[0].args[1]).shape[1], val(sites[0].args[1]).shape[3]
    group = Hkv // target
    touched = []
    for layer, site in enumerate(sites):
        k_lin, k_path = _back_to_linear(site.args[1])
        v_lin, v_path = _back_to_linear(site.args[2])
        rotary = _is_rotary(k_path, D)
        Bk, Bv = _merges(method, moments[layer], _output_weight(gm, site), rotary, Hq, Hkv, D, group)
        if k_lin.target is aten.addmm.default:
            if v_lin is not k_lin:
                raise refusal(NAME, f"{k_lin.name}: keys from a fused projection, values from another",
                              k_lin, KEEP_HEADS)
            touched += _rewrite_fused_qkv(gm, k_lin, Bk, Bv, group, layer, Hkv * D)
        else:
            _rewrite_projection(gm, k_lin, Bk, group, f"k{layer}", Hkv, target)
            _rewrite_projection(gm, v_lin, Bv, group, f"v{layer}", Hkv, target)
        touched += [k_lin, v_lin, *k_path, *v_path, site]
    return touched


def _layer_output(site: fx.Node) -> fx.Node:
    """What the rest of the model sees of a layer's attention: the residual stream after it
    (o_proj's output added to it), else o_proj's output."""
    o_proj = _forward_to_linear(site)
    return residual_add(o_proj) or o_proj


def _relative_error(original: dict, converted: dict, nodes: list[fx.Node]) -> float:
    errors = [((converted[n].double() - original[n].double()).square().sum()
               / original[n].double().square().sum().clamp(min=1e-30)).item() for n in nodes]
    return sum(errors) / len(errors)


# --- refit ----------------------------------------------------------------------------------

def _attention_layer(index: int, site: fx.Node, head_dim: int) -> AttentionLayer:
    q, k, v = (_back_to_linear(site.args[i])[0] for i in range(3))
    o = _forward_to_linear(site)
    if any(n.target is not aten.linear.default for n in (q, k, v, o)) or len({q, k, v}) < 3:
        raise refusal(NAME, "gqa_method=refit needs separate q, k, v and o linear projections",
                      site, "gqa_method=lsq")
    if not q.args[0] is k.args[0] is v.args[0]:
        raise refusal(NAME, "gqa_method=refit needs q, k and v projected from one input", site, "gqa_method=lsq")
    return AttentionLayer(index, site, q, k, v, o, residual_add(o), head_dim)


def _refit(gm: fx.GraphModule, layers: list[AttentionLayer], ids: torch.Tensor, target: int, steps: int,
           original: dict) -> tuple[list[fx.Node], dict]:
    """Group and reorder the heads of every layer, then refit the layers in order."""
    Hq, Hkv, D = layers[0].q_heads, layers[0].kv_heads, layers[0].head_dim
    regrouped = 0
    for layer in layers:
        if 1 < target < Hkv:
            similarity = gqa_refit.head_similarity(heads(original[layer.k], D), heads(original[layer.v], D))
            kv_order, q_order = gqa_refit.head_order(gqa_refit.group_heads(similarity, target), Hq, Hkv)
            if kv_order != sorted(kv_order):
                permute_heads(gm, layer, kv_order, q_order)
                regrouped += 1
    errors = []

    def refit(layer: AttentionLayer, rec: Recorder):
        cal = _layer_calibration(gm, layer, rec, original)
        start = gqa_refit.initial_factors(cal, target)
        factors, before, after = gqa_refit.refit_layer(cal, start, target, steps, seed=layer.index)
        errors.append((before, after))
        return _folded(gm, layer, factors, target, rec.value(layer.q.args[0]), cal)

    run = SequentialRefit(gm, layers, refit)
    run.run(ids)
    touched = []
    for layer in layers:
        for tag in "qkvo":
            set_linear(gm, getattr(layer, tag), f"{tag}{layer.index}", *run.weights[layer.index][tag])
        for linear, arg in ((layer.k, 1), (layer.v, 2)):
            _follow_head_count(linear, Hkv, target)
            touched += [linear, *between(linear, layer.site.args[arg])]
    stats = {"heads_regrouped": regrouped,
             "refit_error_before": round(sum(e[0] for e in errors) / len(errors), 4),
             "refit_error_after": round(sum(e[1] for e in errors) / len(errors), 4)}
    return touched, stats


def _layer_calibration(gm: fx.GraphModule, layer: AttentionLayer, rec: Recorder,
                       original: dict) -> gqa_refit.LayerCalibration:
    """The layer's projections of its (converted-model) input, the rotary its paths apply,
    and what its output should be: the original residual stream minus the one it is added to."""
    x, D = rec.value(layer.q.args[0]), layer.head_dim
    proj = {tag: heads(nn.functional.linear(x, *linear_weights(gm, getattr(layer, tag))), D) for tag in "qkv"}
    cos, sin = rotary_of(layer, rec)
    for position, tag in enumerate("qkv"):
        want = rec.value(layer.site.args[position]).float()
        got = proj[tag] if tag == "v" else gqa_refit.rotate(proj[tag], cos, sin)
        if (got - want).abs().max() > 1e-4 * want.abs().max() + 1e-6:
            raise refusal(NAME, f"the {tag} of attention {layer.site.name} is not its projection followed by "
                                f"(rotate_half) rotary, which gqa_method=refit needs", layer.site, "gqa_method=lsq")
    W_o, b_o = linear_weights(gm, layer.o)
    residual = layer.residual
    if residual is not None:
        stream = residual.args[0] if residual.args[1] is layer.o else residual.args[1]
        target = original[residual] - rec.value(stream)
    else:
        target = original[layer.o]
    if b_o is not None:
        target = target - b_o
    mask, scale, causal, window, softcap = (rec.value(a) for a in layer.site.args[3:8])
    if mask is not None and bool(mask.bool().all()):
        mask = None
    return gqa_refit.LayerCalibration(proj["q"], proj["k"], proj["v"], cos, sin, W_o.detach().float(),
                                      target.float(), scale, causal, window, softcap, mask)


def _folded(gm: fx.GraphModule, layer: AttentionLayer, f: gqa_refit.LayerFactors, target: int,
            x: torch.Tensor, cal: gqa_refit.LayerCalibration):
    """The refit factors as q/k/v/o weights, and the attention inputs they give for ``x``."""
    group = layer.kv_heads // target
    (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = (linear_weights(gm, getattr(layer, t)) for t in "qkvo")
    weights = {
        "q": gqa_refit.fold_heads(Wq, bq, f.aq),
        "k": (gqa_merge.merge_weight(Wk, f.bk, group), None if bk is None else gqa_merge.merge_bias(bk, f.bk, group)),
        "v": (gqa_merge.merge_weight(Wv, f.bv, group), None if bv is None else gqa_merge.merge_bias(bv, f.bv, group)),
        "o": (gqa_refit.fold_output(Wo, f.eo), bo),
    }
    q, k, v = (heads(nn.functional.linear(x, *weights[t]), layer.head_dim) for t in "qkv")
    return weights, (gqa_refit.rotate(q, cal.cos, cal.sin), gqa_refit.rotate(k, cal.cos, cal.sin), v)
