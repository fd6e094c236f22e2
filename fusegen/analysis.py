"""A roofline cost model of an optimized graph.

Every costed node gets three sympy expressions in the symbols ``B`` (sequences) and ``T``
(tokens per sequence), with the model's sizes as numbers: FLOPs, bytes read, bytes written.
They are evaluated for two phases of serving:

    prefill  B sequences of T new tokens each, each attending causally over its own T tokens
    decode   B sequences with one new token each, each attending over a context of T tokens
             (the T-th being the new one)

and compared with a GPU's datasheet roof (Williams, Waterman, Patterson, "Roofline", CACM
2009): a node's time floor is ``max(FLOPs / peak, bytes / bandwidth)``; it is compute-bound
when its intensity ``FLOPs / (bytes read + written)`` reaches the ridge point
``peak / bandwidth``. A phase's floor is the sum of its nodes' floors (no overlap between
kernels). What each node kind moves::

    linear / lm_head  2*M*K*N FLOPs; reads x [M,K] and the weight [N,K] (+ bias); writes [M,N]
    attention         4*D*Hq per (query, key attended) pair -- only unmasked pairs, so causal
                      prefill counts T(T+1)/2 keys per head and sequence; reads q, the K and V
                      of the keys it attends (Hkv heads, once each); writes the output
    kv_write          reads this step's k, v and the slots; writes them into the cache
    fused             one generated kernel: reads each input once, writes each output once;
                      FLOPs = sum over its ops of the op's largest operand's element count
    embedding         reads one table row per token (and the ids); writes them
    index_select      reads the selected rows (and the indices); writes them
    other             views, reshapes, getitem are free; anything else reads its inputs and
                      writes its outputs (matmuls 2*M*K*N FLOPs, copies 0, else 1 per element)

Element sizes come from the graph's dtypes; ``dtype`` replaces the size of every floating
tensor (an fp32 CPU graph analysed for a bf16 GPU run). Metadata reads of attention (block
tables, sequence lengths) are left out: they are a few bytes per block.

Operand intensity (the convention of published decoding-efficiency analyses) is computed next
to the true FLOP/byte intensity: for one matrix product [M,K] x [K,N] it is the number of
multiply-accumulates per element of the two operands read,

    M*K*N / (M*K + K*N)

which equals FLOP per byte for 16-bit operands when only the operand reads are counted (the
output write is not). A linear is one such product with M = tokens. Attention is two per
head and sequence over the dense (unmasked) square: QK^T with (M, K, N) = (Tq, D, Tkv) and
PV with (Tq, Tkv, D), where Tq = new tokens and Tkv = context of the sequence.
"""

from __future__ import annotations

import json
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from fusegen.errors import MissingDependencyError
from fusegen.fused_group import FusedGroup

B, T = sympy.symbols("B T", integer=True, positive=True)


# --- hardware -------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense 16-bit tensor-core FLOP/s
    bandwidth: float   # HBM bytes/s

    @property
    def ridge(self) -> float:
        """FLOP per byte where the memory roof meets the compute roof."""
        return self.peak_flops / self.bandwidth


GPUS = {  # datasheet figures, dense (no sparsity)
    "h100": GPU("H100 SXM", 989e12, 3.35e12),
    "h200": GPU("H200 SXM", 989e12, 4.8e12),
    "a100": GPU("A100 SXM 80GB", 312e12, 2.039e12),
}


def gpu_spec(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    key = str(gpu).strip().lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


# --- phases and the symbols of a graph ------------------------------------------------------

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
            size = _expr(shape[dim])
            if isinstance(size, sympy.Symbol):
                subs[size] = value
    return subs


def _expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(size)


def _static(size, node: fx.Node, what: str) -> int:
    value = _expr(size)
    if not value.is_Integer:
        raise ValueError(f"cannot cost {node.name} ({node.target}): its {what} is {value}, "
                         f"expected a fixed number")
    return int(value)


# --- node costs -----------------------------------------------------------------------------

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
        return _expr(size).xreplace(self.subs)

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


# --- evaluation -----------------------------------------------------------------------------

@dataclass
class Row:
    """Numbers of a group of nodes (one kind, or all) in one phase."""
    kind: str
    count: int
    flops: float
    bytes_read: float
    bytes_written: float
    floor_s: float
    operand: dict[str, float]  # product name -> MAC per operand element
    ridge: float

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def bound(self) -> str:
        return "compute" if self.intensity >= self.ridge else "memory"


def _evaluate(cost: NodeCost, at: dict, gpu: GPU) -> None:
    v = {key: float(getattr(cost, key).xreplace(at)) for key in ("flops", "bytes_read", "bytes_written")}
    v["bytes"] = v["bytes_read"] + v["bytes_written"]
    v["intensity"] = v["flops"] / v["bytes"] if v["bytes"] else math.inf
    v["floor_s"] = max(v["flops"] / gpu.peak_flops, v["bytes"] / gpu.bandwidth)
    for name, p in cost.products.items():
        v[f"macs.{name}"] = float((p.macs * p.count).xreplace(at))
        v[f"operands.{name}"] = float((p.operands * p.count).xreplace(at))
    cost.values = v


def _row(kind: str, costs: list[NodeCost], gpu: GPU) -> Row:
    total = defaultdict(float)
    for c in costs:
        for key, value in c.values.items():
            total[key] += value
    # One kind's products share a meaning; over all kinds they do not.
    names = sorted({name for c in costs for name in c.products}) if kind != "total" else []
    operand = {n: total[f"macs.{n}"] / total[f"operands.{n}"] for n in names}
    return Row(kind, len(costs), total["flops"], total["bytes_read"], total["bytes_written"],
               total["floor_s"], operand, gpu.ridge)


KIND_ORDER = ("embedding", "fused", "linear", "attention", "kv_write", "index_select", "lm_head",
              "other")


@dataclass
class PhaseCost:
    phase: Phase
    nodes: list[NodeCost]
    batch: int
    seq: int
    gpu: GPU

    def __post_init__(self):
        at = {B: self.batch, T: self.seq}
        for cost in self.nodes:
            _evaluate(cost, at, self.gpu)

    def value(self, expr: sympy.Expr) -> float:
        return float(sympy.sympify(expr).xreplace({B: self.batch, T: self.seq}))

    def bound(self, cost: NodeCost) -> str:
        return "compute" if cost.values["intensity"] >= self.gpu.ridge else "memory"

    def by_kind(self) -> list[Row]:
        groups = defaultdict(list)
        for c in self.nodes:
            groups[c.kind].append(c)
        return [_row(k, groups[k], self.gpu) for k in sorted(groups, key=KIND_ORDER.index)]

    def total(self) -> Row:
        return _row("total", self.nodes, self.gpu)

    @property
    def floor_s(self) -> float:
        return self.total().floor_s

    @property
    def generated(self) -> int:
        """Tokens the step generates: one per sequence."""
        return int(self.value(self.phase.sequences))

    def describe(self) -> str:
        p = self.phase
        seqs, q, ctx = (int(self.value(e)) for e in (p.sequences, p.queries, p.context))
        if p.note:
            return f"{seqs} sequences of {ctx} tokens; {p.note}"
        if p.name == "prefill":
            return f"{seqs} sequences x {q} tokens, causal ({seqs * q} tokens in the step)"
        return f"{seqs} sequences x {q} new token over a context of {ctx}"


# --- the analysis ---------------------------------------------------------------------------

def _fmt_intensity(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


@dataclass
class Analysis:
    """Both phases of one graph at one (batch, seq) on one GPU."""
    model: str
    gpu: GPU
    dtype: torch.dtype
    batch: int
    seq: int
    phases: dict[str, PhaseCost]

    def table(self) -> str:
        """Fixed-width text: per phase, one line per node kind, the total, operand intensities."""
        g = self.gpu
        lines = [f"roofline: {self.model}, {str(self.dtype).removeprefix('torch.')} on {g.name} "
                 f"({g.peak_flops / 1e12:.0f} TFLOP/s dense 16-bit, {g.bandwidth / 1e12:.2f} TB/s, "
                 f"ridge {g.ridge:.1f} FLOP/B)"]
        for pc in self.phases.values():
            lines += ["", f"{pc.phase.name}: {pc.describe()}", _table_head()]
            lines += [_table_line(r) for r in pc.by_kind()]
            lines += [_table_line(pc.total())]
            lines += _operand_lines(pc)
            if pc.phase.name == "decode":
                lines.append(f"  floor per step {pc.floor_s * 1e6:.1f} µs (one token of each "
                             f"sequence), per generated token {pc.floor_s / pc.generated * 1e6:.2f} µs")
        return "\n".join(lines)

    def summary_rows(self) -> list[dict]:
        """Flat rows, one per (phase, kind) and one per phase total. ``operand_intensity`` is
        None for kinds without matrix products; for attention it is the lower of QK^T and PV."""
        rows = []
        for pc in self.phases.values():
            for r in [*pc.by_kind(), pc.total()]:
                rows.append({"phase": pc.phase.name, "kind": r.kind, "count": r.count,
                             "gflop": r.flops / 1e9, "mb": r.bytes / 1e6,
                             "intensity": None if math.isinf(r.intensity) else r.intensity,
                             "operand_intensity": min(r.operand.values()) if r.operand else None,
                             "bound": r.bound, "floor_us": r.floor_s * 1e6})
        return rows

    def to_dict(self) -> dict:
        """Everything, JSON-serialisable: kinds, totals and every node with its expressions."""
        return {"model": self.model, "dtype": str(self.dtype).removeprefix("torch."),
                "batch": self.batch, "seq": self.seq,
                "gpu": {"name": self.gpu.name, "peak_flops": self.gpu.peak_flops,
                        "bandwidth": self.gpu.bandwidth, "ridge": self.gpu.ridge},
                "phases": {name: _phase_dict(pc) for name, pc in self.phases.items()}}

    def plot(self, path) -> None:
        """Write a log-log roofline PNG: the roof, the ridge, one point per (phase, kind) at its
        intensity and the FLOP/s it reaches at its floor. Kinds without FLOPs are left out
        (they sit at intensity 0)."""
        _plot(self, path)


def _table_head() -> str:
    return (f"  {'kind':<13}{'count':>6}{'GFLOP':>12}{'MB':>12}{'FLOP/B':>10}  "
            f"{'bound':<8}{'floor µs':>11}")


def _table_line(r: Row) -> str:
    return (f"  {r.kind:<13}{r.count:>6}{r.flops / 1e9:>12.3f}{r.bytes / 1e6:>12.3f}"
            f"{_fmt_intensity(r.intensity):>10}  {r.bound:<8}{r.floor_s * 1e6:>11.2f}")


def _operand_lines(pc: PhaseCost) -> list[str]:
    rows = {r.kind: r for r in pc.by_kind()}
    parts = []
    if "linear" in rows:
        parts.append(f"linear {rows['linear'].operand['gemm']:.1f}")
    if "attention" in rows:
        op = rows["attention"].operand
        parts.append(f"attention QK^T {op['qk']:.1f}, PV {op['pv']:.1f}")
    if not parts:
        return []
    return ["  operand intensity (MAC per operand element read): " + "; ".join(parts)]


def _phase_dict(pc: PhaseCost) -> dict:
    def row(r: Row) -> dict:
        return {"kind": r.kind, "count": r.count, "flops": r.flops, "bytes_read": r.bytes_read,
                "bytes_written": r.bytes_written,
                "intensity": None if math.isinf(r.intensity) else r.intensity, "bound": r.bound,
                "floor_us": r.floor_s * 1e6, "operand_intensity": r.operand}

    def node(c: NodeCost) -> dict:
        v = c.values
        return {"name": c.name, "kind": c.kind, "target": c.target, "flops": v["flops"],
                "bytes_read": v["bytes_read"], "bytes_written": v["bytes_written"],
                "floor_us": v["floor_s"] * 1e6, "flops_expr": str(c.flops),
                "bytes_expr": str(sympy.simplify(c.bytes)),
                "operand_intensity": {n: {"expr": str(e), "value": pc.value(e)}
                                      for n, e in c.operand_intensity.items()}}

    p = pc.phase
    return {"sequences": str(p.sequences), "queries": str(p.queries), "context": str(p.context),
            "note": p.note, "floor_us": pc.floor_s * 1e6, "kinds": [row(r) for r in pc.by_kind()],
            "total": row(pc.total()), "nodes": [node(c) for c in pc.nodes]}


def _plot(analysis: Analysis, path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise MissingDependencyError("the roofline plot needs matplotlib: pip install matplotlib "
                                     "(or the project's [plot] extra)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, points = analysis.gpu, _plot_points(analysis)
    xs = [p[0] for p in points] + [g.ridge]
    x = [min(xs) / 10, max(xs) * 4]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    grid = [x[0] * (x[1] / x[0]) ** (i / 200) for i in range(201)]
    roof = [min(g.peak_flops, g.bandwidth * i) for i in grid]
    ax.plot(grid, roof, color="black", lw=2,
            label=f"roof: {g.bandwidth / 1e12:.2f} TB/s, {g.peak_flops / 1e12:.0f} TFLOP/s")
    ax.axvline(g.ridge, color="gray", ls="--", lw=1)
    ax.text(g.ridge, roof[0], f" ridge {g.ridge:.0f} FLOP/B", rotation=90, va="bottom",
            fontsize=8, color="gray")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for px, py, phase, kind in points:
        ax.scatter(px, py, color=colors[KIND_ORDER.index(kind) % len(colors)], zorder=3,
                   marker=_MARKERS[phase], edgecolors="black", linewidths=0.5)
    for i, (px, py, label) in enumerate(_labels(points)):
        above = i % 2 == 0  # alternate sides of the roof so neighbours do not overlap
        ax.annotate(label, (px, py), textcoords="offset points", fontsize=8,
                    xytext=(-6, 6) if above else (6, -12), ha="right" if above else "left")
    for phase, marker in _MARKERS.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=phase)
    ax.set(xscale="log", yscale="log", xlim=x, ylim=(None, g.peak_flops * 3),
           xlabel="arithmetic intensity (FLOP/byte)",
           ylabel="FLOP/s at the time floor",
           title=f"{analysis.model} on {g.name}: B={analysis.batch}, T={analysis.seq}, "
                 f"{str(analysis.dtype).removeprefix('torch.')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_MARKERS = {"prefill": "o", "decode": "s"}


def _plot_points(analysis: Analysis) -> list[tuple[float, float, str, str]]:
    """(intensity, FLOP/s at the floor, phase, kind) of every kind that has FLOPs."""
    return [(r.intensity, r.flops / r.floor_s, pc.phase.name, r.kind)
            for pc in analysis.phases.values() for r in pc.by_kind() if r.flops > 0 and r.bytes > 0]


def _labels(points) -> list[tuple[float, float, str]]:
    """One label per cluster of points that would print on top of each other, by intensity."""
    clusters: list[list] = []
    for px, py, phase, kind in sorted(points):
        last = clusters[-1] if clusters else None
        if last and abs(math.log10(px / last[0][0])) < 0.03 and abs(math.log10(py / last[0][1])) < 0.03:
            last.append((px, py, f"{phase} {kind}"))
        else:
            clusters.append([(px, py, f"{phase} {kind}")])
    return [(c[0][0], c[0][1], ", ".join(p[2] for p in c)) for c in clusters]


# --- entry points ---------------------------------------------------------------------------

def analyze_graph(gm: fx.GraphModule, facts: dict, batch: int, seq: int, gpu: str | GPU = "h100",
                  dtype: torch.dtype | None = None) -> Analysis:
    """Both phases of ``gm`` at ``batch`` sequences of ``seq`` tokens on ``gpu``."""
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    spec = gpu_spec(gpu)
    block_size = facts.get("kv", {}).get("block_size", 16)
    phases = {}
    for phase in phases_for(graph_kind(gm)):
        phases[phase.name] = PhaseCost(phase, graph_costs(gm, phase, block_size, dtype), batch, seq, spec)
    return Analysis(facts.get("model_class", type(gm).__name__), spec,
                    dtype or facts.get("dtype") or _graph_dtype(gm), batch, seq, phases)


def _graph_dtype(gm: fx.GraphModule) -> torch.dtype:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr" and isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
            return val.dtype
    return torch.float32


def analyze(compiled, batch: int, seq: int, gpu: str | GPU = "h100",
            dtype: torch.dtype | None = None) -> Analysis:
    """Roofline analysis of a ``CompiledModel`` (see the module docstring)."""
    return analyze_graph(compiled.graph_module, compiled.facts, batch, seq, gpu, dtype)


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[key]


def run_cli(model_name: str, batch: int, seq: int, gpu: str, dtype: str | None, plot: str | None,
            json_path: str | None, config: str | None) -> int:
    """``fusegen-cli analyze``: load, compile, analyse, print the table; write the PNG and
    JSON when asked."""
    import fusegen
    from fusegen.config import CompileConfig
    from fusegen.models import load_model

    spec, override = gpu_spec(gpu), parse_dtype(dtype)  # bad names fail before the slow part
    compiled = fusegen.compile(load_model(model_name), CompileConfig.from_string(config or ""))
    result = analyze(compiled, batch, seq, spec, override)
    print(result.table())
    if plot:
        result.plot(plot)
        print(f"roofline plot: {plot}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
        print(f"json: {json_path}")
    return 0
