"""The arithmetic of merging key/value heads (used by convert_mha_to_gqa).

Heads g of one new group are merged as  k' = sum_g k_g B_g  (row vectors, B_g [D, D]), which
is realised on the projection weights as  W' = sum_g B_g^T W_g  and  b' = sum_g b_g B_g.

``mean`` — B_g = I / r: mean-pooling, the conversion of the GQA paper (Ainslie et al. 2023).

``lsq`` — least squares in the space each head is consumed in. For every token the merged
head minimises

    keys:    sum_g E_q[(q . (k' - k_g))^2] = sum_g (k' - k_g) C_g (k' - k_g)^T,
             C_g = E[q q^T] over the query heads that read key head g (calibration data)
    values:  sum_g || (v' - v_g) W_o^g ||^2  = sum_g (v' - v_g) M_g (v' - v_g)^T,
             M_g = sum over those query heads h of W_o^h W_o^h^T (their o_proj slices)

whose minimiser is  B_g = C_g (sum C)^-1  (resp. M). Under rotary embeddings, keys are
compared after rotation, so C_g is first projected onto the matrices that commute with every
rotation (per frequency pair: a I + b J); then B_g commutes too and the merge can be applied
to the unrotated projection weights.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def rotary_commutant(C: torch.Tensor) -> torch.Tensor:
    """Nearest (Frobenius) matrix commuting with rotate_half rotary embeddings: dims i and
    i + D/2 form frequency pair i; the result has blocks [[a, -b], [b, a]] per pair."""
    D = C.shape[-1]
    h = D // 2
    i = torch.arange(h)
    a = (C[..., i, i] + C[..., i + h, i + h]) / 2
    b = (C[..., i + h, i] - C[..., i, i + h]) / 2
    out = torch.zeros_like(C)
    out[..., i, i] = a
    out[..., i + h, i + h] = a
    out[..., i + h, i] = b
    out[..., i, i + h] = -b
    return out


def merge_matrices(metrics: torch.Tensor, group: int) -> torch.Tensor:
    """metrics [Hkv, D, D] (C_g or M_g) -> B [Hkv, D, D] with B_g = C_g (sum over g's group C)^-1."""
    H, D, _ = metrics.shape
    out = torch.empty_like(metrics)
    for j in range(H // group):
        block = metrics[j * group:(j + 1) * group].double()
        total = block.sum(0)
        total = total + EPS * total.diagonal().mean().clamp(min=EPS) * torch.eye(D, dtype=total.dtype)
        inv = torch.linalg.inv(total)
        out[j * group:(j + 1) * group] = (block @ inv).to(metrics.dtype)
    return out


def mean_matrices(H: int, D: int, group: int, dtype=torch.float32) -> torch.Tensor:
    return torch.eye(D, dtype=dtype).expand(H, D, D) / group


def merge_weight(W: torch.Tensor, B: torch.Tensor, group: int) -> torch.Tensor:
    """W [Hkv*D, in] (rows of head g = W_g) -> W' [Hkv/group*D, in], W'_j = sum_g B_g^T W_g."""
    H, D, _ = B.shape
    Wh = W.reshape(H, D, -1).double()
    merged = torch.einsum("gde,gdi->gei", B.double(), Wh)  # B_g^T W_g
    return merged.reshape(H // group, group, D, -1).sum(1).reshape(-1, W.shape[-1]).to(W.dtype)


def merge_bias(b: torch.Tensor, B: torch.Tensor, group: int) -> torch.Tensor:
    H, D, _ = B.shape
    merged = torch.einsum("gd,gde->ge", b.reshape(H, D).double(), B.double())
    return merged.reshape(H // group, group, D).sum(1).reshape(-1).to(b.dtype)


def output_metrics(W_o: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
    """M_g from o_proj's weight W_o [hidden, Hq*D] (linear layout): sum over the query heads h
    of group g of W_o^h W_o^h^T, with W_o^h = W_o[:, h*D:(h+1)*D]^T."""
    D = W_o.shape[1] // q_heads
    per_head = W_o.double().reshape(W_o.shape[0], q_heads, D).permute(1, 2, 0)  # [Hq, D, hidden]
    M = per_head @ per_head.transpose(1, 2)
    return M.reshape(kv_heads, q_heads // kv_heads, D, D).sum(1).float()
