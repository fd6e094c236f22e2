"""The arithmetic of ``gqa_method=refit`` (used by convert_mha_to_gqa): grouping key/value
heads by similarity, and a calibrated refit of one attention layer after its heads merge.

Per token, with row vectors and the projections' outputs taken before rotary (R):

    q_h = x Wq_h^T,  k_g = x Wk_g^T,  v_g = x Wv_g^T            h < Hq, g < Hkv
    y   = sum_h attn(R q_h, R k_g(h), v_g(h)) Wo_h^T             g(h) = h // (Hq / Hkv)

The converted layer has T = Hkv / r key/value heads; head j merges the r heads of group j:

    k'_j = sum_{g in j} k_g Bk_g      v'_j = sum_{g in j} v_g Bv_g     (as in gqa_merge.py)
    q'_h = q_h Aq_h                   y'   = sum_h attn(R q'_h, R k'_j(h), v'_j(h)) Eo_h Wo_h^T

Every factor is a D x D matrix inside one head, so the refit lives in the heads' own bases:
2 Hkv + 2 Hq matrices per layer (74k numbers for SmolLM2, against 0.8M in its four
projections). Few free numbers is what lets a refit on a few thousand calibration tokens
carry over to other text. The factors fold into the weights exactly (rotary comes after
the projection):  Wk'_j = sum_g Bk_g^T Wk_g,  Wq'_h = Aq_h^T Wq_h,  Wo'_h = Wo_h Eo_h^T.

Bk and Bv start from the lsq merge (the closed form), Aq and Eo from the identity; Adam
then minimises  ||y' - y*||^2 / ||y*||^2  in fp32 over minibatches of calibration
sequences, y* being what the original model's attention output should be here (see
convert_mha_to_gqa: the sequential refit gives each layer its converted inputs and asks it
to restore the original residual stream).

Grouping: heads whose keys and values carry the same information up to a change of basis
merge best, so similarity is linear CKA (Kornblith et al. 2019, invariant to rotations and
scale) of two heads' keys plus that of their values; groups are grown greedily from the
most similar pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fusegen.passes import gqa_merge

LEARNING_RATE = 2e-3
BATCH_SEQUENCES = 8   # calibration sequences per Adam step
EXACT = 1e-10         # relative error of a merge that is already exact (duplicate heads)


# --- grouping -------------------------------------------------------------------------------

def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA of two sets of features [N, D] (1: the same up to rotation and scale)."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    cross = (a.T @ b).square().sum()
    norms = (a.T @ a).square().sum().sqrt() * (b.T @ b).square().sum().sqrt()
    return float(cross / norms) if norms > 0 else 0.0


def head_similarity(k: Tensor, v: Tensor) -> Tensor:
    """k, v [N, Hkv, S, D] -> [Hkv, Hkv]: CKA of keys + CKA of values, per pair of heads."""
    H = k.shape[1]
    flat = [(k[:, g].reshape(-1, k.shape[-1]), v[:, g].reshape(-1, v.shape[-1])) for g in range(H)]
    sim = torch.ones(H, H, dtype=torch.float64) * 2
    for a in range(H):
        for b in range(a + 1, H):
            sim[a, b] = sim[b, a] = linear_cka(flat[a][0], flat[b][0]) + linear_cka(flat[a][1], flat[b][1])
    return sim


def group_heads(similarity: Tensor, groups: int) -> list[list[int]]:
    """Split the heads into ``groups`` groups of equal size, the most similar together:
    each group starts from the most similar pair left and takes the head most similar on
    average to its members until full. Groups are sorted, and listed by their first head."""
    H = similarity.shape[0]
    size = H // groups
    if size == 1 or groups == 1:
        return [list(range(g * size, (g + 1) * size)) for g in range(groups)]
    left, out = set(range(H)), []
    while left:
        pairs = [(a, b) for a in sorted(left) for b in sorted(left) if a < b]
        a, b = max(pairs, key=lambda p: (similarity[p[0], p[1]].item(), -p[0], -p[1]))
        group = [a, b]
        while len(group) < size:
            rest = sorted(left - set(group))
            group.append(max(rest, key=lambda c: (similarity[c, group].mean().item(), -c)))
        out.append(sorted(group))
        left -= set(group)
    return sorted(out)


def head_order(groups: list[list[int]], q_heads: int, kv_heads: int) -> tuple[list[int], list[int]]:
    """(kv order, q order): new KV head i is old head kv[i], new query head p is old query
    head q[p]; a group's heads become neighbours and their query heads follow them, so query
    head p still reads (the merge of) the KV head it read."""
    per_kv = q_heads // kv_heads
    kv = [g for group in groups for g in group]
    q = [h for g in kv for h in range(g * per_kv, (g + 1) * per_kv)]
    return kv, q


# --- one layer ------------------------------------------------------------------------------

def rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """rotate_half rotary: t [N, H, S, D], cos/sin [N or 1, S, D]."""
    half = t.shape[-1] // 2
    return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]


@dataclass
class LayerCalibration:
    """One attention layer's calibration activations (fp32, heads already in merge order)."""
    q: Tensor                # [N, Hq, S, D] query projection per head, before rotary
    k: Tensor                # [N, Hkv, S, D]
    v: Tensor                # [N, Hkv, S, D]
    cos: Tensor              # [N or 1, S, D] (ones and zeros: no rotary)
    sin: Tensor
    w_o: Tensor              # [hidden, Hq*D] o_proj weight, linear layout
    target: Tensor           # [N, S, hidden] what y' (o_proj output without its bias) should be
    scale: float
    causal: bool = True
    window: int = 0
    softcap: float = 0.0
    key_mask: Optional[Tensor] = None  # [N, S], nonzero = keep


@dataclass
class LayerFactors:
    bk: Tensor               # [Hkv, D, D]
    bv: Tensor               # [Hkv, D, D]
    aq: Tensor               # [Hq, D, D]
    eo: Tensor               # [Hq, D, D]


def initial_factors(cal: LayerCalibration, kv_heads: int) -> LayerFactors:
    """lsq merge matrices for keys and values (gqa_merge.py), identity for q and o."""
    Hq, Hkv, D = cal.q.shape[1], cal.k.shape[1], cal.q.shape[-1]
    group = Hkv // kv_heads
    q = rotate(cal.q, cal.cos, cal.sin).double()
    C = torch.einsum("nhsd,nhse->hde", q, q).reshape(Hkv, Hq // Hkv, D, D).sum(1)
    if bool(cal.sin.abs().max() > 0):  # rotary: keys are compared after rotation
        C = gqa_merge.rotary_commutant(C)
    M = gqa_merge.output_metrics(cal.w_o, Hq, Hkv)
    eye = torch.eye(D)
    return LayerFactors(gqa_merge.merge_matrices(C.float(), group), gqa_merge.merge_matrices(M, group),
                        eye.repeat(Hq, 1, 1), eye.repeat(Hq, 1, 1))


def merged_output(cal: LayerCalibration, f: LayerFactors, rows: Tensor, kv_heads: int) -> Tensor:
    """y' [n, S, hidden] of the layer with ``kv_heads`` merged heads, for sequences ``rows``."""
    Hq, Hkv, D = cal.q.shape[1], cal.k.shape[1], cal.q.shape[-1]
    cos = cal.cos[rows] if cal.cos.shape[0] > 1 else cal.cos
    sin = cal.sin[rows] if cal.sin.shape[0] > 1 else cal.sin
    n, S = len(rows), cal.q.shape[2]
    k = (cal.k[rows] @ f.bk).reshape(n, kv_heads, Hkv // kv_heads, S, D).sum(2)
    v = (cal.v[rows] @ f.bv).reshape(n, kv_heads, Hkv // kv_heads, S, D).sum(2)
    q = rotate(cal.q[rows] @ f.aq, cos, sin)
    k = rotate(k, cos, sin).repeat_interleave(Hq // kv_heads, 1)
    v = v.repeat_interleave(Hq // kv_heads, 1)
    out = _attention(q, k, v, cal, rows) @ f.eo                           # [n, Hq, S, D]
    return out.transpose(1, 2).reshape(n, S, Hq * D) @ cal.w_o.T


def _attention(q: Tensor, k: Tensor, v: Tensor, cal: LayerCalibration, rows: Tensor) -> Tensor:
    """fusegen.attention's semantics, differentiable (k, v already expanded to Hq heads)."""
    if cal.softcap == 0.0 and cal.window == 0 and cal.key_mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=cal.causal, scale=cal.scale)
    S = q.shape[2]
    j, p = torch.arange(S)[None, :], torch.arange(S)[:, None]
    keep = torch.ones(S, S, dtype=torch.bool)
    if cal.causal:
        keep &= j <= p
    if cal.window > 0:
        keep &= (p - j) < cal.window
    keep = keep[None, None]
    if cal.key_mask is not None:
        keep = keep & cal.key_mask[rows].bool()[:, None, None, :]
    scores = q @ k.transpose(-1, -2) * cal.scale
    if cal.softcap > 0.0:
        scores = torch.tanh(scores / cal.softcap) * cal.softcap
    scores = scores.masked_fill(~keep, float("-inf"))
    any_key = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_key, 0.0), -1) * any_key
    return probs @ v


def relative_error(cal: LayerCalibration, f: LayerFactors, kv_heads: int) -> float:
    """||y' - y*||^2 / ||y*||^2 over every calibration sequence."""
    err = ref = 0.0
    with torch.no_grad():
        for rows in torch.arange(cal.q.shape[0]).split(BATCH_SEQUENCES):
            out = merged_output(cal, f, rows, kv_heads)
            err += (out - cal.target[rows]).square().sum().item()
            ref += cal.target[rows].square().sum().item()
    return err / ref if ref > 0 else 0.0


def refit_layer(cal: LayerCalibration, start: LayerFactors, kv_heads: int, steps: int,
                seed: int = 0) -> tuple[LayerFactors, float, float]:
    """Adam on the four factors (``steps`` minibatches of calibration sequences, cosine
    learning rate); returns the factors and the relative error before and after."""
    before = relative_error(cal, start, kv_heads)
    if steps == 0 or before < EXACT:  # nothing to fit: Adam's normalised steps would only add noise
        return start, before, before
    params = [t.detach().clone().requires_grad_(True) for t in (start.bk, start.bv, start.aq, start.eo)]
    factors = LayerFactors(*params)
    opt = torch.optim.Adam(params, lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    generator = torch.Generator().manual_seed(seed)
    N = cal.q.shape[0]
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randperm(N, generator=generator)[:BATCH_SEQUENCES]
            target = cal.target[rows]
            loss = (merged_output(cal, factors, rows, kv_heads) - target).square().sum() / target.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    done = LayerFactors(*(p.detach() for p in params))
    after = relative_error(cal, done, kv_heads)
    if after > before:  # never leave a layer worse than its closed-form start
        return start, before, before
    return done, before, after


# --- folding into weights -------------------------------------------------------------------

def fold_heads(W: Tensor, b: Optional[Tensor], A: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Rows of head h (W [H*D, in], b [H*D]) -> A_h^T W_h and b_h A_h: the projection then
    computes q_h A_h."""
    H, D, _ = A.shape
    Wh = W.reshape(H, D, -1).double()
    W2 = torch.einsum("hde,hdi->hei", A.double(), Wh).reshape(W.shape).to(W.dtype)
    b2 = None if b is None else torch.einsum("hd,hde->he", b.reshape(H, D).double(), A.double()).reshape(-1).to(b.dtype)
    return W2, b2


def fold_output(W_o: Tensor, E: Tensor) -> Tensor:
    """o_proj weight [hidden, H*D] -> its columns of head h times E_h^T: it then reads o_h E_h."""
    H, D, _ = E.shape
    Wh = W_o.double().reshape(W_o.shape[0], H, D)
    return torch.einsum("ohd,hed->ohe", Wh, E.double()).reshape(W_o.shape).to(W_o.dtype)
