"""The two serving phases in the symbols ``B`` (sequences) and ``T`` (tokens per sequence), and
the binding of a graph's size symbols to them."""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
from torch import fx

B, T = sympy.symbols("B T", integer=True, positive=True)


@dataclass(frozen=True)
class Phase:
    """``sequences`` sequences, each with ``queries`` new tokens at the end of a context of
    ``context`` tokens (all in the symbols B, T)."""
    name: str
    sequences: sympy.Expr
    queries: sympy.Expr
    context: sympy.Expr
    note: str = ""

    @property
    def tokens(self) -> sympy.Expr:
        return self.sequences * self.queries


PREFILL = Phase("prefill", B, T, T)
DECODE = Phase("decode", B, sympy.Integer(1), T)


def graph_kind(gm: fx.GraphModule) -> str:
    names = {n.target for n in gm.graph.nodes if n.op == "placeholder"}
    return "paged" if "kv_pool" in names else "dense" if "kv_cache" in names else "stateless"


def phases_for(kind: str) -> tuple[Phase, Phase]:
    if kind == "stateless":
        rerun = Phase("decode", B, T, T, "no KV cache: each step reruns every sequence's "
                                         "whole context for one new token")
        return PREFILL, rerun
    return PREFILL, DECODE


def _size_bindings(kind: str, phase: Phase, block_size: int) -> dict[str, dict[int, sympy.Expr]]:
    """Placeholder name -> {dim: size in B, T} for the graph kinds fusegen builds."""
    blocks = sympy.ceiling(phase.context / block_size)
    if kind == "paged":  # tokens of all sequences packed in one row
        return {"input_ids": {0: sympy.Integer(1), 1: phase.tokens}, "seq_lens": {0: phase.sequences},
                "logits_indices": {0: phase.sequences},
                "block_tables": {0: phase.sequences, 1: blocks},
                "kv_pool": {2: phase.sequences * blocks}}
    if kind == "dense":
        return {"input_ids": {0: phase.sequences, 1: phase.queries},
                "attention_mask": {0: phase.sequences, 1: phase.context},
                "kv_cache": {2: phase.sequences, 4: phase.context}}
    return {"input_ids": {0: phase.sequences, 1: phase.context},
            "attention_mask": {0: phase.sequences, 1: phase.context}}


def bind_symbols(gm: fx.GraphModule, phase: Phase, block_size: int) -> dict:
    """The graph's size symbols -> their values in B, T for ``phase``."""
    bindings = _size_bindings(graph_kind(gm), phase, block_size)
    subs = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.target not in bindings:
            continue
        shape = node.meta["val"].shape
        for dim, value in bindings[node.target].items():
            size = size_expr(shape[dim])
            if isinstance(size, sympy.Symbol):
                subs[size] = value
    return subs


def size_expr(size) -> sympy.Expr:
    """A tensor size (an int or a SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(size)

