"""The graph side of convert_mha_to_gqa: the projections feeding and following an attention
op (every method), and for ``gqa_method=refit`` (gqa_calibrated_refit.py) an attention
layer's four projections and what lies between them, recording activations, permuting
heads, and the sequential run that refits each layer on the converted model's own inputs.

One layer, as the refit reads it (separate ``linear`` projections; rotary, if any, in the
rotate_half layout — checked on the calibration activations, refused otherwise):

    x ─┬─ q linear ─ view ─ transpose ─ rotary ─┐
       ├─ k linear ─ view ─ transpose ─ rotary ─┼─ fusegen.attention ─ reshape ─ o linear ─ add ─▶
       └─ v linear ─ view ─ transpose ──────────┘                                 residual ─┘
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, fx

from fusegen.errors import PassError
from fusegen.passes.infra import getattr_path, refusal, val

aten = torch.ops.aten
NAME = "convert_mha_to_gqa"      # the pass these helpers serve: its errors name it
KEEP_HEADS = "gqa_kv_heads=0"   # the model's own KV heads: the conversion is opt-in


@dataclass
class AttentionLayer:
    index: int
    site: fx.Node                    # the fusegen.attention node
    q: fx.Node                       # the four aten.linear nodes
    k: fx.Node
    v: fx.Node
    o: fx.Node
    residual: Optional[fx.Node]      # the add of o's output to the residual stream, if one
    head_dim: int

    @property
    def q_heads(self) -> int:
        return val(self.site.args[0]).shape[1]

    @property
    def kv_heads(self) -> int:
        return val(self.site.args[1]).shape[1]


def residual_add(o_proj: fx.Node) -> Optional[fx.Node]:
    """The one ``add`` that puts the attention output back into the residual stream."""
    adds = [u for u in o_proj.users if u.target is aten.add.Tensor and len(u.args) == 2
            and all(isinstance(a, fx.Node) for a in u.args)]
    return adds[0] if len(adds) == 1 and len(o_proj.users) == 1 else None


def linear_weights(gm: fx.GraphModule, linear: fx.Node) -> tuple[Tensor, Optional[Tensor]]:
    bias = linear.args[2] if len(linear.args) > 2 else None
    return getattr_path(gm, linear.args[1].target), None if bias is None else getattr_path(gm, bias.target)


def set_weight(gm: fx.GraphModule, linear: fx.Node, position: int, name: str, value: Tensor) -> None:
    """Argument ``position`` of ``linear`` becomes the new buffer ``name`` holding ``value``."""
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(linear):
        attr = gm.graph.get_attr(name)
    attr.meta["val"] = val(linear.args[position])
    args = list(linear.args)
    args[position] = attr
    linear.args = tuple(args)


def set_linear(gm: fx.GraphModule, linear: fx.Node, tag: str, W: Tensor, b: Optional[Tensor]) -> None:
    set_weight(gm, linear, 1, f"fusegen_gqa_{tag}_weight", W.contiguous())
    if b is not None:
        set_weight(gm, linear, 2, f"fusegen_gqa_{tag}_bias", b.contiguous())


# --- finding the projections ------------------------------------------------------------

def back_to_linear(start: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
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


def forward_to_linear(start: fx.Node) -> fx.Node:
    frontier = list(start.users)
    for _ in range(8):
        for node in frontier:
            if node.target in (aten.linear.default, aten.addmm.default):
                return node
        frontier = [u for n in frontier for u in n.users]
    raise refusal(NAME, f"{start.name}: no output projection found after attention", start, KEEP_HEADS)


def follow_head_count(linear: fx.Node, old_heads: int, new_heads: int) -> None:
    for user in linear.users:  # [B, S, H, D] reshape with an explicit head count
        if user.target in (aten.view.default, aten.reshape.default) and len(user.args[1]) == 4 \
                and user.args[1][2] == old_heads:
            shape = list(user.args[1])
            shape[2] = new_heads
            user.args = (user.args[0], shape)


def layer_output(site: fx.Node) -> fx.Node:
    """What the rest of the model sees of a layer's attention: the residual stream after it
    (o_proj's output added to it), else o_proj's output."""
    o_proj = forward_to_linear(site)
    return residual_add(o_proj) or o_proj


# --- permuting heads ------------------------------------------------------------------------

def _rows(t: Optional[Tensor], order: list[int], D: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(len(order), D, *t.shape[1:])[order].reshape(t.shape)


def permute_heads(gm: fx.GraphModule, layer: AttentionLayer, kv_order: list[int], q_order: list[int]) -> None:
    """Reorder one layer's heads: rows of the k/v projections by ``kv_order``, rows of the q
    projection and the matching columns of o_proj by ``q_order``. With the query heads
    following their KV head (gqa_refit.head_order) the layer computes what it did."""
    D = layer.head_dim
    for tag, linear, order in (("q", layer.q, q_order), ("k", layer.k, kv_order), ("v", layer.v, kv_order)):
        W, b = linear_weights(gm, linear)
        set_linear(gm, linear, f"{tag}{layer.index}", _rows(W, order, D), _rows(b, order, D))
    W_o, b_o = linear_weights(gm, layer.o)
    columns = W_o.reshape(W_o.shape[0], len(q_order), D)[:, q_order].reshape(W_o.shape)
    set_linear(gm, layer.o, f"o{layer.index}", columns, None)


# --- recording ------------------------------------------------------------------------------

class Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of ``wanted`` nodes in ``values`` (the
    interpreter frees others after their last use); ``hooks[node](recorder)`` computes a
    node's value instead of its target (the sequential refit)."""

    def __init__(self, gm: fx.GraphModule, wanted=(), hooks: Optional[dict] = None):
        super().__init__(gm)
        self.wanted, self.hooks = set(wanted), hooks or {}
        self.values: dict[fx.Node, Tensor] = {}

    def run_node(self, n: fx.Node):
        hook = self.hooks.get(n)
        result = hook(self) if hook is not None else super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        return result

    def value(self, node):
        if not isinstance(node, fx.Node):
            return node
        return self.values[node] if node in self.values else self.env[node]


def graph_args(ids: Tensor):
    B, S = ids.shape
    return ids, torch.ones_like(ids), torch.arange(S).expand(B, S)


def heads(t: Tensor, D: int) -> Tensor:
    """[N, S, H*D] -> [N, H, S, D] (float32)."""
    N, S = t.shape[:2]
    return t.float().reshape(N, S, -1, D).transpose(1, 2)


def between(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """The nodes on some path from ``start`` to ``end`` (``end`` included), in graph order."""
    below, stack = set(), [start]
    while stack:
        for user in stack.pop().users:
            if user not in below:
                below.add(user)
                if user is not end:
                    stack.append(user)
    found, stack = set(), [end]
    while stack:
        node = stack.pop()
        if node in below and node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return [n for n in start.graph.nodes if n in found]


def path_inputs(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    """What the nodes between ``start`` and ``end`` read besides each other (rotary tables, sizes)."""
    path = set(between(start, end)) | {start}
    return {i for n in path - {start} for i in n.all_input_nodes if i not in path}


def _eval_path(start: fx.Node, end: fx.Node, value: Tensor, rec: Recorder) -> Tensor:
    """Value of ``end`` when ``start`` outputs ``value``, the path's other inputs as recorded."""
    local = {start: value}
    for node in between(start, end):
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda a: local[a] if a in local else rec.value(a))
        local[node] = node.target(*args, **kwargs)
    return local[end]


def rotary_of(layer: AttentionLayer, rec: Recorder) -> tuple[Tensor, Tensor]:
    """cos, sin [N, S, D] of the key path, read by sending two probes through it: keys
    (1...1, 0...0) come out as (cos, sin) halves, (0...0, 1...1) as (-sin, cos)."""
    x = rec.value(layer.k.args[0])
    D, half = layer.head_dim, layer.head_dim // 2
    first = torch.zeros(*x.shape[:-1], D, dtype=x.dtype)
    second = first.clone()
    first[..., :half] = 1
    second[..., half:] = 1
    a = _eval_path(layer.k, layer.site.args[1], first, rec)[:, 0].float()
    b = _eval_path(layer.k, layer.site.args[1], second, rec)[:, 0].float()
    return torch.cat([a[..., :half], b[..., half:]], -1), torch.cat([-b[..., :half], a[..., half:]], -1)


@dataclass
class SequentialRefit:
    """Refit the layers in graph order, each on the activations that the layers converted
    before it produce. ``refit(layer, recorder)`` returns the layer's new weights
    ``{"q": (W, b), "k": ..., "v": ..., "o": ...}`` and the attention inputs (q, k, v) they
    give; the run goes on with those, so the next layer sees the converted model."""
    gm: fx.GraphModule
    layers: list[AttentionLayer]
    refit: Callable[[AttentionLayer, Recorder], tuple[dict, tuple]]
    weights: dict = field(default_factory=dict)   # layer index -> {"q": (W, b), ...}

    def run(self, ids: Tensor) -> Tensor:
        hooks, wanted = {}, set()
        for layer in self.layers:
            hooks[layer.site] = lambda rec, layer=layer: self._site(layer, rec)
            hooks[layer.o] = lambda rec, layer=layer: self._output(layer, rec)
            wanted |= {layer.q.args[0]} | path_inputs(layer.k, layer.site.args[1])
        with torch.no_grad():
            return Recorder(self.gm, wanted, hooks).run(*graph_args(ids))

    def _site(self, layer: AttentionLayer, rec: Recorder) -> Tensor:
        self.weights[layer.index], (q, k, v) = self.refit(layer, rec)
        args = [rec.value(a) for a in layer.site.args]
        return layer.site.target(q.to(args[0].dtype), k.to(args[1].dtype), v.to(args[2].dtype), *args[3:])

    def _output(self, layer: AttentionLayer, rec: Recorder) -> Tensor:
        W, b = self.weights[layer.index]["o"]
        return torch.nn.functional.linear(rec.value(layer.o.args[0]), W, b)
