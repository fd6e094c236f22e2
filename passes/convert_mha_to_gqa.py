"""convert_mha_to_gqa (opt-in, lossy): reduce every layer's KV heads to ``gqa_kv_heads``.

Contiguous groups of ``r = Hkv / target`` key/value heads become one head (query heads keep
their order, so query head h now reads KV head h // (Hq / target)). The K and V projection
weights and biases are replaced by merged ones (see gqa_merge.py for ``mean`` and ``lsq``),
the head count in the reshape after each projection follows, and the attention ops read
the smaller k/v as they are — their group size comes from the shapes.

``refit`` (gqa_calibrated_refit.py; gqa_refit.py for the arithmetic) first groups
the KV heads whose keys and values are most alike and reorders the heads so that each group
is contiguous (query heads follow their KV head: rows of q_proj, columns of o_proj), then
refits the layers one after another, in the order the graph runs them: each layer gets the
activations the already converted layers produce and fits its merged K/V and its Q and O
projections (D x D factors per head, from the lsq merge) so that the residual stream after
its attention is the original model's again. ``gqa_refit_steps`` Adam steps per layer.

``gqa_distill_steps`` (any method, opt-in; gqa_distill.py) then fits the converted layers'
q/k/v/o weights to the original graph's next-token distributions on the calibration text.

Quality is always measured: perplexity of the graph on the calibration tokens before and
after, and how far each layer's attention output (as the residual stream after it) is from
the original's (``attention_error_after``, mean over layers of the relative squared error),
reported in the pass counters together with the KV-cache bytes per token.

Supported projections: separate ``linear`` K/V projections (Llama, Mistral, Qwen2, ...) and
GPT-2's fused Conv1D ``c_attn`` (``addmm`` into [q | k | v] columns, then ``split``); ``refit``
needs separate q/k/v/o linears and rotary (if any) in the rotate_half layout.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
from torch import fx, nn

from fusegen.errors import PassError
from fusegen.passes import gqa_merge
from fusegen.passes.gqa_calibrated_refit import attention_layer, refit_layers
from fusegen.passes.gqa_distill import distill_attention
from fusegen.passes.gqa_layers import (KEEP_HEADS, NAME, Recorder, back_to_linear, follow_head_count,
                                       forward_to_linear, graph_args, layer_output, set_weight)
from fusegen.passes.infra import (PassContext, PassResult, call_nodes, erase_unused, getattr_path,
                                  graph_pass, refresh_vals, refusal, val)

aten = torch.ops.aten
attention_op = torch.ops.fusegen.attention.default


def _output_weight(gm: fx.GraphModule, site: fx.Node) -> torch.Tensor:
    """o_proj's weight in linear layout [hidden, Hq*D]."""
    proj = forward_to_linear(site)
    if proj.target is aten.addmm.default:
        return getattr_path(gm, proj.args[2].target).t()
    return getattr_path(gm, proj.args[1].target)


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
    follow_head_count(linear, old_heads, new_heads)


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
    teacher = copy.deepcopy(gm) if ctx.config.gqa_distill_steps else None   # the graph before converting
    layers = [attention_layer(i, site, D) for i, site in enumerate(sites)] if method == "refit" else None
    outputs = [layer_output(site) for site in sites]
    wanted = outputs + ([n for layer in layers for n in (layer.k, layer.v)] if layers else [])
    moments, ppl_before, original = _calibrate(gm, sites, ids, wanted)
    if method == "refit":
        touched, extra = refit_layers(gm, layers, ids, target, ctx.config.gqa_refit_steps, original)
    else:
        touched, extra = _merge(gm, sites, method, moments, target), {}
    refresh_vals(gm, touched)
    erase_unused(gm)
    gm.recompile()
    if teacher is not None:
        extra.update(distill_attention(gm, teacher, sites, ids, ctx.config.gqa_distill_steps))
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
        k_lin, k_path = back_to_linear(site.args[1])
        v_lin, v_path = back_to_linear(site.args[2])
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


def _relative_error(original: dict, converted: dict, nodes: list[fx.Node]) -> float:
    errors = [((converted[n].double() - original[n].double()).square().sum()
               / original[n].double().square().sum().clamp(min=1e-30)).item() for n in nodes]
    return sum(errors) / len(errors)


