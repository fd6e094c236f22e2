"""Symbolic costs of the nodes of a graph: FLOPs, bytes read and bytes written of every node
that moves memory, in the symbols ``B`` and ``T``, one rule per node kind."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from fusegen.analysis.phases import B, T, Phase, bind_symbols, graph_kind, size_expr
from fusegen.fused_group import FusedGroup

KIND_ORDER = ("embedding", "fused", "linear", "attention", "kv_write", "index_select", "lm_head",
              "other")


@dataclass(frozen=True)
class Product:
    """``count`` matrix products [M,K] x [K,N], for the operand-intensity convention."""
    m: sympy.Expr
    k: sympy.Expr
    n: sympy.Expr
    count: sympy.Expr = sympy.Integer(1)

    @property
    def macs(self) -> sympy.Expr:
        return self.m * self.k * self.n

    @property
    def operands(self) -> sympy.Expr:
        return self.m * self.k + self.k * self.n

    @property
    def intensity(self) -> sympy.Expr:
        return sympy.simplify(self.macs / self.operands)


@dataclass
class NodeCost:
    """One node's cost in B, T; ``values`` holds them evaluated for the analysed sizes."""
    name: str
    kind: str
    target: str
    flops: sympy.Expr
    bytes_read: sympy.Expr
    bytes_written: sympy.Expr
    products: dict[str, Product] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> sympy.Expr:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> sympy.Expr:
        return self.flops / self.bytes

    @property
    def operand_intensity(self) -> dict[str, sympy.Expr]:
        """Product name ("gemm"; "qk", "pv" for attention) -> MAC per operand element."""
        return {name: p.intensity for name, p in self.products.items()}


_aten = torch.ops.aten
_FREE = {_aten.view, _aten._unsafe_view, _aten.reshape, _aten.transpose, _aten.permute, _aten.t,
         _aten.unsqueeze, _aten.squeeze, _aten.expand, _aten.expand_as, _aten.slice, _aten.select,
         _aten.split, _aten.split_with_sizes, _aten.unbind, _aten.chunk, _aten.narrow, _aten.alias,
         _aten.detach, _aten.as_strided, _aten.contiguous, _aten.flatten, _aten.unflatten,
         _aten.view_as, _aten.sym_size, _aten.sym_numel, _aten.sym_stride}
_COPIES = {_aten.cat, _aten.to, _aten._to_copy, _aten.clone, _aten.copy, _aten.stack,
           _aten.repeat, _aten.repeat_interleave, _aten.index, _aten.gather, _aten.zeros,
           _aten.ones, _aten.full, _aten.empty, _aten.arange, _aten.zeros_like, _aten.ones_like}
_MATMULS = {_aten.matmul, _aten.mm, _aten.bmm, _aten.addmm, _aten.baddbmm}
_fg = torch.ops.fusegen
_ATTENTION = {_fg.paged_attention.default: (1, 4, 7, 8),  # pool arg, its Hkv dim, causal, window
              _fg.dense_kv_attention.default: (1, 3, 5, 6),
              _fg.attention.default: (1, 1, 5, 6)}
_KV_WRITES = {_fg.paged_kv_write.default, _fg.dense_kv_write.default}


def _packet(target):
    return getattr(target, "overloadpacket", None)


def is_free(node: fx.Node) -> bool:
    """Views, getitem and size queries: nodes that move no memory."""
    if node.op != "call_function":
        return node.op != "call_module"
    if node.target is operator.getitem or _packet(node.target) in _FREE:
        return True
    val = node.meta.get("val")
    return val is not None and not isinstance(val, (torch.Tensor, tuple, list))


class _Sizer:
    """Element counts and byte sizes of node values, in B, T."""

    def __init__(self, subs: dict, dtype: torch.dtype | None):
        self.subs, self.dtype = subs, dtype

    def expr(self, size) -> sympy.Expr:
        return size_expr(size).xreplace(self.subs)

    def numel(self, val) -> sympy.Expr:
        return sympy.Mul(*[self.expr(s) for s in val.shape])

    def itemsize(self, val) -> int:
        if self.dtype is not None and val.dtype.is_floating_point:
            return self.dtype.itemsize
        return val.dtype.itemsize

    def nbytes(self, val) -> sympy.Expr:
        return self.numel(val) * self.itemsize(val)

    def read(self, node) -> sympy.Expr:
        """Bytes to read ``node``'s value; an expanded tensor is read from its base."""
        if not isinstance(node, fx.Node) or not isinstance(node.meta.get("val"), torch.Tensor):
            return sympy.Integer(0)
        for view in _view_chain(node):
            if _packet(view.target) in (_aten.expand, _aten.expand_as):
                return self.read(view.args[0])
        return self.nbytes(node.meta["val"])

    def written(self, val) -> sympy.Expr:
        tensors = val if isinstance(val, (tuple, list)) else [val]
        return sympy.Add(*[self.nbytes(t) for t in tensors if isinstance(t, torch.Tensor)])


def _view_chain(node: fx.Node) -> list[fx.Node]:
    """``node`` and the free nodes it is a view of, up to the node that made the data."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function" and is_free(node) and node.args:
        chain.append(node)
        node = node.args[0]
    return chain + ([node] if isinstance(node, fx.Node) else [])


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    flat = []
    for a in (*node.args, *node.kwargs.values()):
        flat.extend(a if isinstance(a, (list, tuple)) else [a])
    return [a for a in flat if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]


def _arg(node: fx.Node, index: int):
    return node.args[index] if index < len(node.args) else None


def _static(size, node: fx.Node, what: str) -> int:
    value = size_expr(size)
    if not value.is_Integer:
        raise ValueError(f"cannot cost {node.name} ({node.target}): its {what} is {value}, "
                         f"expected a fixed number")
    return int(value)


def _linear_cost(node: fx.Node, sz: _Sizer, kind: str) -> NodeCost:
    if _packet(node.target) is _aten.linear:
        x, w, bias = node.args[0], node.args[1], _arg(node, 2)
        k, n = sz.expr(w.meta["val"].shape[1]), sz.expr(w.meta["val"].shape[0])
    else:  # addmm(bias, x, w[K, N]) or mm(x, w[K, N])
        bias, x, w = (node.args if _packet(node.target) is _aten.addmm else (None, *node.args))
        k, n = sz.expr(w.meta["val"].shape[0]), sz.expr(w.meta["val"].shape[1])
    m = sz.numel(x.meta["val"]) / k
    read = sz.read(x) + sz.read(w) + sz.read(bias)
    return NodeCost(node.name, kind, str(node.target), 2 * m * k * n, read,
                    sz.written(node.meta["val"]), {"gemm": Product(m, k, n)})


def keys_attended(queries, context, causal: bool, window: int) -> sympy.Expr:
    """(query, key) pairs one sequence's head computes: its queries are the last positions
    p = L-Q .. L-1 of a context of L; a causal query sees min(p + 1, window) keys."""
    if not causal:
        if window:
            raise ValueError("a sliding window on non-causal attention is not modelled")
        return queries * context
    pairs = sympy.factor(queries * context - queries * (queries - 1) / 2)
    if window:
        def beyond(x):  # sum over p < x of max(p + 1 - window, 0)
            over = sympy.Max(x - window, 0)
            return over * (over + 1) / 2
        pairs -= beyond(context) - beyond(context - queries)
    return pairs


def _attention_cost(node: fx.Node, sz: _Sizer, phase: Phase) -> NodeCost:
    pool_arg, kv_dim, causal_arg, window_arg = _ATTENTION[node.target]
    q = node.args[0]
    # Sizes are read through sympy: int() on a SymInt would specialise the shared shape env.
    hq = _static(q.meta["val"].shape[1], node, "query heads")
    d = _static(q.meta["val"].shape[3], node, "head dim")
    pool = node.args[pool_arg].meta["val"]
    hkv = _static(pool.shape[kv_dim], node, "KV heads")
    causal, window = bool(_arg(node, causal_arg)), int(_arg(node, window_arg) or 0)
    seqs, tq, tkv = phase.sequences, phase.queries, phase.context
    pairs = seqs * keys_attended(tq, tkv, causal, window)
    distinct_keys = sympy.Min(tkv, tq + window - 1) if window else tkv
    kv_read = 2 * seqs * distinct_keys * hkv * d * sz.itemsize(pool)
    products = {"qk": Product(tq, sympy.Integer(d), tkv, seqs * hq),
                "pv": Product(tq, tkv, sympy.Integer(d), seqs * hq)}
    return NodeCost(node.name, "attention", str(node.target), 4 * d * hq * pairs,
                    sz.read(q) + kv_read, sz.written(node.meta["val"]), products)


def _kv_write_cost(node: fx.Node, sz: _Sizer) -> NodeCost:
    cache, k, v = node.args[0], node.args[2], node.args[3]
    slots = node.args[4] if node.target is _fg.paged_kv_write.default else None
    item = sz.itemsize(cache.meta["val"])
    written = (sz.numel(k.meta["val"]) + sz.numel(v.meta["val"])) * item
    return NodeCost(node.name, "kv_write", str(node.target), sympy.Integer(0),
                    sz.read(k) + sz.read(v) + sz.read(slots), written)


def _fused_cost(node: fx.Node, sz: _Sizer, group: FusedGroup) -> NodeCost:
    flops = sympy.Integer(0)
    for op in group.reference.graph.nodes:
        if op.op != "call_function" or is_free(op) or _packet(op.target) in _COPIES:
            continue
        operands = [op.meta["val"], *(a.meta["val"] for a in _tensor_args(op))]
        counts = [sz.numel(v) for v in operands if isinstance(v, torch.Tensor)]
        flops += sympy.Max(*counts) if len(counts) > 1 else counts[0]
    read = sympy.Add(*[sz.read(a) for a in _tensor_args(node)])
    return NodeCost(node.name, "fused", f"{group.name} ({group.schedule})", flops, read,
                    sz.written(node.meta["val"]))


def _gather_cost(node: fx.Node, sz: _Sizer, kind: str, index: fx.Node) -> NodeCost:
    out = node.meta["val"]
    return NodeCost(node.name, kind, str(node.target), sympy.Integer(0),
                    sz.nbytes(out) + sz.read(index), sz.written(out))


def _other_cost(node: fx.Node, sz: _Sizer) -> NodeCost:
    out, args = node.meta.get("val"), _tensor_args(node)
    packet = _packet(node.target)
    if packet in _MATMULS:
        mat1 = args[1] if packet in (_aten.addmm, _aten.baddbmm) else args[0]
        flops = 2 * sz.numel(out) * sz.expr(mat1.meta["val"].shape[-1])
    elif packet in _COPIES or out is None:
        flops = sympy.Integer(0)
    else:
        outs = out if isinstance(out, (tuple, list)) else [out]
        flops = sympy.Add(*[sz.numel(t) for t in outs if isinstance(t, torch.Tensor)])
    read = sympy.Add(*[sz.read(a) for a in args])
    written = sz.written(out) if out is not None else sympy.Integer(0)
    return NodeCost(node.name, "other", str(node.target), flops, read, written)


def _is_weight_product(node: fx.Node) -> bool:
    packet = _packet(node.target)
    if packet is _aten.linear:
        return True
    if packet in (_aten.addmm, _aten.mm):  # a weight, possibly seen through t() or a view
        return _view_chain(node.args[-1])[-1].op == "get_attr"
    return False


def node_cost(node: fx.Node, gm: fx.GraphModule, sz: _Sizer, phase: Phase) -> NodeCost | None:
    """The cost of one node, or None for a free node."""
    if node.op == "call_module":
        group = gm.get_submodule(node.target)
        if not isinstance(group, FusedGroup):
            raise ValueError(f"cannot cost call_module {node.name} -> {type(group).__name__}: "
                             f"only FusedGroup modules are modelled")
        return _fused_cost(node, sz, group)
    if is_free(node):
        return None
    if node.target in _ATTENTION:
        return _attention_cost(node, sz, phase)
    if node.target in _KV_WRITES:
        return _kv_write_cost(node, sz)
    if _is_weight_product(node):
        feeds_output = any(u.op == "output" for u in node.users)
        return _linear_cost(node, sz, "lm_head" if feeds_output else "linear")
    if _packet(node.target) is _aten.embedding:
        return _gather_cost(node, sz, "embedding", node.args[1])
    if _packet(node.target) is _aten.index_select:
        return _gather_cost(node, sz, "index_select", node.args[2])
    return _other_cost(node, sz)


def graph_costs(gm: fx.GraphModule, phase: Phase, block_size: int = 16,
                dtype: torch.dtype | None = None) -> list[NodeCost]:
    """Symbolic costs (in B, T) of every node of ``gm`` that moves memory, in graph order."""
    subs = bind_symbols(gm, phase, block_size)
    sz = _Sizer(subs, dtype)
    costs = []
    for node in gm.graph.nodes:
        cost = node_cost(node, gm, sz, phase)
        if cost is None or cost.kind == "other" and cost.flops == 0 and cost.bytes == 0:
            continue
        unbound = (cost.flops + cost.bytes).free_symbols - {B, T}
        if unbound:
            raise ValueError(f"cannot cost {node.name} ({node.target}): its sizes use "
                             f"{', '.join(sorted(map(str, unbound)))}, which no graph input of a "
                             f"{graph_kind(gm)} graph binds")
        costs.append(cost)
    return costs
