"""normalize_graph: one spelling per computation, so each pattern pass needs one pattern.

- ``x / c`` with a Python scalar ``c``  ->  ``x * (1/c)``; ``c * x`` -> ``x * c``;
- ``transpose(x, -1, -2)``  ->  ``transpose(x, rank-1, rank-2)`` with the smaller dim first;
- ``softmax.int`` / ``_softmax`` on the last dim  ->  ``_softmax(x, rank-1, False)`` when no dtype
  change is involved;
- ``cat([-x[..., D/2:], x[..., :D/2]], -1)`` (rotary's rotate_half)  ->  ``fusegen.rotate_half(x)``,
  one op a generated kernel can read as a permuted load;
- ``reshape`` -> ``view`` is NOT done: reshape may copy, view may not, and export kept the
  distinction the model's code made.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from fusegen.passes.infra import PassContext, PassResult, erase_unused, graph_pass, val

aten = torch.ops.aten


def _rank(node: fx.Node) -> int | None:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _scalar_div_to_mul(node: fx.Node) -> bool:
    if node.target is aten.div.Tensor and isinstance(node.args[1], (int, float)) and node.args[1] != 0 \
            and not node.kwargs:
        node.target = aten.mul.Tensor
        node.args = (node.args[0], 1.0 / node.args[1])
        return True
    return False


def _scalar_first_mul(node: fx.Node) -> bool:
    if node.target is aten.mul.Tensor and isinstance(node.args[0], (int, float)) \
            and isinstance(node.args[1], fx.Node):
        node.args = (node.args[1], node.args[0])
        return True
    return False


def _canonical_transpose(node: fx.Node) -> bool:
    if node.target is not aten.transpose.int:
        return False
    rank = _rank(node.args[0])
    if rank is None:
        return False
    a, b = sorted(d % rank for d in node.args[1:3])
    if (a, b) != tuple(node.args[1:3]):
        node.args = (node.args[0], a, b)
        return True
    return False


def _canonical_softmax(node: fx.Node) -> bool:
    if node.target not in (aten.softmax.int, aten._softmax.default):
        return False
    rank = _rank(node.args[0])
    if rank is None:
        return False
    dim = node.args[1] % rank
    if node.target is aten.softmax.int:
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        if dtype is not None and dtype != val(node.args[0]).dtype:
            return False
        node.target, node.args, node.kwargs = aten._softmax.default, (node.args[0], dim, False), {}
        return True
    if dim != node.args[1]:
        node.args = (node.args[0], dim, node.args[2])
        return True
    return False


def _slice_of(node, rank: int):
    """(source, start, end) of ``x[..., start:end]`` on the last dim, else None."""
    if not (isinstance(node, fx.Node) and node.target is aten.slice.Tensor):
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    if dim % rank != rank - 1:
        return None
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    return node.args[0], start, end


def _rotate_half(node: fx.Node) -> bool:
    if node.target is not aten.cat.default or len(node.args[0]) != 2:
        return False
    rank = _rank(node)
    dim = node.args[1] if len(node.args) > 1 else 0
    if rank is None or dim % rank != rank - 1:
        return False
    first, second = node.args[0]
    if not (isinstance(first, fx.Node) and first.target is aten.neg.default):
        return False
    upper, lower = _slice_of(first.args[0], rank), _slice_of(second, rank)
    D = val(node).shape[-1]
    if upper is None or lower is None or upper[0] is not lower[0] or not isinstance(D, int) or D % 2:
        return False
    upper_reaches_end = upper[2] is None or upper[2] >= D
    if upper[1] != D // 2 or not upper_reaches_end or lower[1] != 0 or lower[2] != D // 2:
        return False
    node.target, node.args, node.kwargs = torch.ops.fusegen.rotate_half.default, (upper[0],), {}
    return True


RULES = {
    "rotate_half": _rotate_half,
    "div_to_mul": _scalar_div_to_mul,
    "mul_scalar_last": _scalar_first_mul,
    "transpose_canonical": _canonical_transpose,
    "softmax_canonical": _canonical_softmax,
}


@graph_pass("normalize_graph")
def normalize_graph(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for name, rule in RULES.items():
            if rule(node):
                stats[name] += 1
    if stats["rotate_half"]:
        erase_unused(gm)  # the slices and neg the rewritten cat read
    return PassResult(gm, bool(stats), dict(stats))
