"""``gqa_method=refit`` on the graph (called by convert_mha_to_gqa): the calibrated refit.

Every layer's KV heads are grouped by similarity and reordered so that each group is
contiguous (query heads follow their KV head), then the layers are refit one after another
in the order the graph runs them (``SequentialRefit``): each gets the activations the
already converted layers produce, its merged K/V and per-head Q/O factors are fit so that
the residual stream after its attention is the original model's again, and the factors are
folded into its q/k/v/o weights. gqa_refit.py holds the arithmetic, gqa_layers.py the graph
helpers.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fusegen.passes import gqa_merge, gqa_refit
from fusegen.passes.gqa_layers import (NAME, AttentionLayer, Recorder, SequentialRefit, back_to_linear,
                                       between, follow_head_count, forward_to_linear, heads,
                                       linear_weights, permute_heads, residual_add, rotary_of, set_linear)
from fusegen.passes.infra import refusal

aten = torch.ops.aten


def attention_layer(index: int, site: fx.Node, head_dim: int) -> AttentionLayer:
    """The attention op ``site`` with its q/k/v/o projections; refused unless they are the
    separate linears of one input that the refit rewrites."""
    q, k, v = (back_to_linear(site.args[i])[0] for i in range(3))
    o = forward_to_linear(site)
    if any(n.target is not aten.linear.default for n in (q, k, v, o)) or len({q, k, v}) < 3:
        raise refusal(NAME, "gqa_method=refit needs separate q, k, v and o linear projections",
                      site, "gqa_method=lsq")
    if not q.args[0] is k.args[0] is v.args[0]:
        raise refusal(NAME, "gqa_method=refit needs q, k and v projected from one input", site, "gqa_method=lsq")
    return AttentionLayer(index, site, q, k, v, o, residual_add(o), head_dim)


def refit_layers(gm: fx.GraphModule, layers: list[AttentionLayer], ids: torch.Tensor, target: int,
                 steps: int, original: dict) -> tuple[list[fx.Node], dict]:
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
            follow_head_count(linear, Hkv, target)
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
