"""What an attention mask subgraph computes, found by running it.

Models build masks in many ways (HF's ``masking_utils`` index tricks, ``triu`` + ``-inf``,
``masked_fill``, sliding-window overlays). Rather than match their code, we cut out the
subgraph that computes the mask — it may only depend on the graph inputs and scalar
constants — and evaluate it on concrete inputs. The result is accepted when it equals

    keep[b, i, j] = (not causal or j <= i) and (window == 0 or i - j < window) and pad[b, j]

on every real (non-padding) query row, for several sizes and padding patterns, where
``pad`` is the ``attention_mask`` input (or all ones when the mask ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fusegen.ops import causal_keep
from fusegen.passes.infra import getattr_path

MASK_INPUTS = ("input_ids", "attention_mask", "position_ids")
VERY_NEGATIVE = -1e4  # additive mask entries at or below this count as "masked"


@dataclass(frozen=True)
class MaskSemantics:
    causal: bool
    window: int            # 0: unlimited
    key_padding: bool      # the mask applies the attention_mask input to keys


class MaskNotRecognised(Exception):
    pass


def ancestors(node: fx.Node) -> list[fx.Node]:
    """``node`` and everything it depends on, in graph order."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _extract(gm: fx.GraphModule, masks: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule computing the tuple ``masks`` from the graph inputs."""
    nodes = sorted(set().union(*(ancestors(m) for m in masks)), key=_order(gm))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in nodes:
        if n.op == "placeholder" and n.target not in MASK_INPUTS:
            raise MaskNotRecognised(f"mask depends on graph input {n.target!r}")
        if n.op == "get_attr":
            value = getattr_path(gm, n.target)
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                raise MaskNotRecognised(f"mask depends on tensor attribute {n.target!r} "
                                        f"{tuple(value.shape)} (a learned bias, not a mask)")
        if n.op == "call_module":
            raise MaskNotRecognised(f"mask calls module {n.target!r}")
    graph = fx.Graph()
    env = {}
    for ph in placeholders:  # keep the full signature so inputs line up
        env[ph] = graph.placeholder(ph.target)
    for n in nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[m] for m in masks))
    return fx.GraphModule(gm, graph)


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__


def _keep(value: torch.Tensor, kind: str, where: str) -> torch.Tensor:
    """Mask tensor -> bool 'may attend' tensor of shape [B?, H?, S, L]."""
    if kind == "fill":  # masked_fill(scores, mask, -inf): True = masked
        return ~value.bool()
    if value.dtype == torch.bool:
        return value
    finite_bad = (value != 0) & (value > VERY_NEGATIVE)
    if finite_bad.any():
        raise MaskNotRecognised(f"{where} adds values other than 0 and -inf (an attention bias)")
    return value == 0


def _rows(keep: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """[B, S, S] from a mask broadcastable to [B, H, S, S]; all heads must agree."""
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    keep = keep.expand(B, keep.shape[1], S, S)
    if not (keep == keep[:, :1]).all():
        raise MaskNotRecognised("mask differs between heads")
    return keep[:, 0]


def _inputs(B: int, S: int, pad: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(S)
    ids = torch.randint(0, 2, (B, S), generator=g).to(device)
    pos = torch.arange(S, device=device).expand(B, S).contiguous()
    return ids, pad.to(device), pos


def _padding_patterns(B: int, S: int) -> torch.Tensor:
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, : S // 3] = 0                   # left padding
    g = torch.Generator().manual_seed(B * S)
    holes = torch.rand(S, generator=g) < 0.3
    holes[-1] = False
    pad[2, holes] = 0                      # arbitrary holes
    return pad


def _structure(keep: torch.Tensor) -> tuple[bool, int]:
    """(causal, window) of a [S, S] keep matrix computed with no padding."""
    S = keep.shape[0]
    causal = not keep.triu(1).any()
    if not causal:
        return False, 0
    width = int(keep[-1].sum())
    window = 0 if width >= S else width
    return True, window


def _combined_keep(sub, masks, B, S, pad, device) -> torch.Tensor:
    """[B, S, S] keep matrix: the AND of every mask applied to the scores."""
    keep = torch.ones(B, S, S, dtype=torch.bool)
    for (node, kind), value in zip(masks, sub(*_inputs(B, S, pad, device))):
        keep &= _rows(_keep(value, kind, f"mask node {node.name!r}"), B, S).cpu()
    return keep


def analyze_mask(gm: fx.GraphModule, masks: list[tuple[fx.Node, str]], probe_len: int,
                 device=torch.device("cpu")) -> MaskSemantics:
    """Recover (causal, window, key_padding) of the masks applied to one site's scores
    (``kind`` per mask: "bool", "additive" or "fill"); raises MaskNotRecognised."""
    sub = _extract(gm, [node for node, _ in masks])
    where = "mask " + ", ".join(node.name for node, _ in masks)
    with torch.no_grad():
        ones = torch.ones(1, probe_len, dtype=torch.long)
        big = _combined_keep(sub, masks, 1, probe_len, ones, device)[0]
        causal, window = _structure(big)
        uses_padding = False
        for S in (7, 13):
            B = 3
            pad = _padding_patterns(B, S)
            got = _combined_keep(sub, masks, B, S, pad, device)
            base = causal_keep(S, S, causal, window, "cpu")
            with_pad = base[None] & pad.bool()[:, None, :]
            real = pad.bool()[:, :, None].expand(B, S, S)  # rows of real query tokens
            if torch.equal(got[real], with_pad[real]):
                uses_padding = uses_padding or not torch.equal(with_pad, base[None].expand(B, S, S))
            elif torch.equal(got, base[None].expand(B, S, S)):
                pass
            else:
                raise MaskNotRecognised(f"{where} is not causal/sliding-window/key-padding "
                                        f"at size {S}")
    return MaskSemantics(causal, window, uses_padding)
