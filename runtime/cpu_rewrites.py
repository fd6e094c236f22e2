"""Rewrites of the CPU step graph (cpu_graph.py applies them in the order of ``REWRITES``):
each takes the flat graph, changes it in place (the CPU graph is a copy the caller does not
hold) and returns how many sites it rewrote. They keep every value bitwise; what they cut is
ops, since a decode step's small ops cost their dispatch on the CPU, not their arithmetic.

    common_subexpressions   u = unsqueeze(cos, 1) in every layer   ->  one u for the step
    rms_norm                w * (x * rsqrt(mean(x ** 2, [-1], keepdim=True) + eps))
                                                                   ->  cpu_ops.rms_norm(x, w, eps)
    rotary                  x * cos + rotate_half(x) * sin         ->  cpu_ops.rotary(x, cos, s)
                                                                       s = cpu_ops.signed_sin(sin),
                                                                       once per sin
    rotary_heads            q, k = split(qkv)[0:2] as heads,       ->  q, k = cpu_ops.rotary_heads(
                            each rotary(.., cos, s)                           qkv, 0, [Hq, Hkv], ..)
                                                                       (one rotary over both)
    attention_tokens        paged_attention(q, ..) [B, Hq, T, D]   ->  cpu_ops.paged_attention_tokens(
                            .reshape(..).transpose(1, 2)                       q, ..)
                            .reshape(B, T, -1)                         (a decode step's attention
                                                                       comes out in that layout)
    onednn_linear           aten.linear(x, w, b)                   ->  mkldnn._linear_pointwise(x, w, b)
                            (float32; within float rounding, the only rewrite that is not bitwise)
    python_bindings         torch.ops.aten.mul.Tensor(a, b)        ->  torch.mul(a, b)
                            torch.ops.aten.view.default(x, shape)  ->  x.view(shape)

The last one is last: the others match aten overloads. An overload's Python wrapper and the
boxed call behind it cost ~1 us more per call than torch's own bindings of the same op.
"""

from __future__ import annotations

import functools
import logging
import operator
import time
from typing import Callable, Optional

import torch
from torch import fx

from fusegen.runtime import cpu_ops

log = logging.getLogger(__name__)

aten = torch.ops.aten
ROTATE_HALF = torch.ops.fusegen.rotate_half.default

# Python functions the flat graph calls: which argument each mutates (None: none).
_PYTHON_CALLS: dict[Callable, Optional[int]] = {
    operator.getitem: None, cpu_ops.kv_slots: None, cpu_ops.step_plan: None, cpu_ops.paged_attention: None,
    cpu_ops.paged_attention_tokens: None, cpu_ops.signed_sin: None, cpu_ops.rotary: None,
    cpu_ops.rotary_heads: None, cpu_ops.paged_kv_write: 0, cpu_ops.rms_norm: None,
}


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _operands(node: fx.Node, match: Callable) -> Optional[tuple]:
    """(match(a), b) or (match(b), a) for a binary node (a, b), whichever matches first."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    for first, other in ((a, b), (b, a)):
        found = match(first)
        if found is not None:
            return found, other
    return None


def _erase_unused(graph: fx.Graph, nodes) -> None:
    for node in nodes:
        if isinstance(node, fx.Node) and not node.users:
            graph.erase_node(node)


def _replace(graph: fx.Graph, node: fx.Node, target, args: tuple) -> fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


# --- common subexpressions -------------------------------------------------------------------

def common_subexpressions(graph: fx.Graph) -> int:
    """Drop a pure aten call that repeats an earlier one (same op, same arguments). Nothing
    that touches a tensor the graph mutates (an argument a call writes, what it was made
    from and what is made from it) is merged."""
    touched = _touched_by_mutation(graph)
    seen, removed = {}, 0
    for node in list(graph.nodes):
        if node in touched or not _pure(node):
            continue
        key = _key(node)
        if key is None:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            removed += 1
        else:
            seen[key] = node
    return removed


def _pure(node: fx.Node) -> bool:
    op = node.target
    return (node.op == "call_function" and isinstance(op, torch._ops.OpOverload) and op.namespace == "aten"
            and not op._schema.is_mutable and torch.Tag.nondeterministic_seeded not in op.tags)


def _mutated(node: fx.Node) -> list:
    """The arguments ``node`` may write: its schema's mutable ones, the one a known Python call
    writes, or every argument of a call we know nothing about."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        arguments = node.target._schema.arguments
        return [node.args[i] if i < len(node.args) else node.kwargs.get(a.name) for i, a in enumerate(arguments)
                if a.alias_info is not None and a.alias_info.is_write]
    if node.op == "call_function" and node.target in _PYTHON_CALLS:
        position = _PYTHON_CALLS[node.target]
        return [] if position is None else [node.args[position]]
    if node.op in ("call_function", "call_method", "call_module"):
        return list(node.all_input_nodes)
    return []


def _touched_by_mutation(graph: fx.Graph) -> set:
    """The mutated arguments, everything they were made from (their aliases among it) and
    everything made from them."""
    roots = [a for node in graph.nodes for a in _mutated(node) if isinstance(a, fx.Node)]
    return _closure(roots, lambda n: n.all_input_nodes) | _closure(roots, lambda n: n.users)


def _closure(start, step) -> set:
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def _key(node: fx.Node):
    """A hashable form of the call, scalars tagged with their type (mul(x, 1) is not
    mul(x, 1.0)); None when an argument cannot be hashed."""
    def form(a):
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, *map(form, a))
        if isinstance(a, (bool, int, float)):
            return (type(a).__name__, a)
        return a
    key = (node.target, form(node.args), form(sorted(node.kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


# --- RMSNorm ---------------------------------------------------------------------------------

def rms_norm(graph: fx.Graph) -> int:
    """w * (x * rsqrt(mean(x ** 2, [-1], keepdim=True) + eps)) -> cpu_ops.rms_norm(x, w, eps),
    either operand order of every mul and the add; x and w both float32 or both float64."""
    done = 0
    for node in list(graph.nodes):
        match = _rms_norm_match(node)
        if match is None:
            continue
        (normed, chain, x, eps), weight = match
        _replace(graph, node, cpu_ops.rms_norm, (x, weight, eps))
        _erase_unused(graph, chain)
        done += 1
    return done


def _rms_norm_match(node: fx.Node):
    if not _is(node, aten.mul.Tensor):
        return None
    match = _operands(node, _normalized)
    if match is None:
        return None
    (_, _, x, _), weight = match
    xv, wv, out = _val(x), _val(weight), _val(node)
    if not all(isinstance(t, torch.Tensor) for t in (xv, wv, out)):
        return None
    D = xv.shape[-1]
    if (xv.dtype not in (torch.float32, torch.float64) or wv.dtype != xv.dtype or out.dtype != xv.dtype
            or not isinstance(D, int) or tuple(wv.shape) != (D,) or out.shape != xv.shape):
        return None
    return match


def _normalized(node):
    """(node, its chain, x, eps) if node is x * rsqrt(mean(x ** 2, [-1], True) + eps)."""
    if not _is(node, aten.mul.Tensor):
        return None
    found = _operands(node, lambda r: _rsqrt_of_mean_square(r))
    if found is None:
        return None
    (chain, x, eps), other = found
    return (node, [node, *chain], x, eps) if other is x else None


def _rsqrt_of_mean_square(node):
    if not _is(node, aten.rsqrt.default) or not _is(node.args[0], aten.add.Tensor):
        return None
    add = node.args[0]
    found = _operands(add, lambda m: m if _is(m, aten.mean.dim) else None)
    if found is None or not isinstance(found[1], (int, float)) or isinstance(found[1], bool):
        return None
    mean, eps = found
    rank = getattr(_val(mean), "ndim", None)
    if (len(mean.args) != 3 or mean.kwargs or mean.args[2] is not True or rank is None
            or list(mean.args[1]) not in ([-1], [rank - 1]) or not _is(mean.args[0], aten.pow.Tensor_Scalar)):
        return None
    square = mean.args[0]
    if square.args[1] != 2 or square.kwargs:
        return None
    return [node, add, mean, square], square.args[0], float(eps)


# --- rotary ----------------------------------------------------------------------------------

def rotary(graph: fx.Graph) -> int:
    """x * cos + rotate_half(x) * sin -> cpu_ops.rotary(x, cos, signed_sin(sin)), either order
    of the add and of each mul, when sin spans the head dim (a broadcast sin of one column
    cannot be signed per half) and the result has x's shape."""
    signed: dict[fx.Node, fx.Node] = {}
    done = 0
    for node in list(graph.nodes):
        match = _rotary_match(node)
        if match is None:
            continue
        x, cos, sin, chain = match
        if sin not in signed:
            with graph.inserting_after(sin):
                signed[sin] = graph.call_function(cpu_ops.signed_sin, (sin,))
            signed[sin].meta = dict(sin.meta)
        _replace(graph, node, cpu_ops.rotary, (x, cos, signed[sin]))
        _erase_unused(graph, chain)
        done += 1
    return done


def _rotary_match(node: fx.Node):
    if not _is(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    for direct, turned in (node.args, node.args[::-1]):
        if not (_is(direct, aten.mul.Tensor) and _is(turned, aten.mul.Tensor)):
            continue
        half = _operands(turned, lambda r: r if _is(r, ROTATE_HALF) else None)
        if half is None:
            continue
        rotated, sin = half
        x = rotated.args[0]
        cos = _operands(direct, lambda a: a if a is x else None)
        if cos is None or not isinstance(sin, fx.Node) or not isinstance(cos[1], fx.Node):
            continue
        xv, sv, out = _val(x), _val(sin), _val(node)
        if not all(isinstance(t, torch.Tensor) for t in (xv, sv, out)):
            continue
        if out.shape != xv.shape or sv.ndim == 0 or sv.shape[-1] != xv.shape[-1] or not xv.dtype.is_floating_point:
            continue
        return x, cos[1], sin, [direct, turned, rotated]
    return None


# --- rotary of q and k in one call -------------------------------------------------------------

def rotary_heads(graph: fx.Graph) -> int:
    """Two rotary calls over the same cos and sin whose inputs are neighbouring pieces of one
    split of a projection's output, each viewed as heads,

        q, k, v = split(qkv, [Hq*D, Hkv*D, ..], -1)
        rotary(q.view(B, T, -1, D).transpose(1, 2), cos, s)      (and the same for k)

    -> one ``cpu_ops.rotary_heads(qkv, offset, [Hq, Hkv], D, cos, s)`` over the columns of
    both, its two outputs in their place: every value of the rotary is its element's alone,
    so computing the heads together changes none (the outputs are [B, H, T, D] views of one
    tensor laid out by token, as each was). The views and transposes go where nothing
    else reads them."""
    done, erased = 0, set()
    for node in list(graph.nodes):
        pair = None if node in erased else _rotary_pair(node)
        if pair is None:
            continue
        split, index, heads, D, cos, signed, first, second = pair
        sizes = split.args[1]
        earliest = next(n for n in graph.nodes if n is first or n is second)
        with graph.inserting_before(earliest):
            both = graph.call_function(cpu_ops.rotary_heads,
                                       (split.args[0], sum(sizes[:index]), heads, D, cos, signed))
            parts = [graph.call_function(operator.getitem, (both, i)) for i in range(2)]
        for rotated, part in zip((first, second), parts):
            part.meta = dict(rotated.meta)
            turned = rotated.args[0]
            chain = [turned, turned.args[0], turned.args[0].args[0]]   # transpose, view, piece
            rotated.replace_all_uses_with(part)
            graph.erase_node(rotated)
            erased.add(rotated)
            _erase_unused(graph, chain)
        done += 1
    return done


def _rotary_pair(node: fx.Node):
    """(split, index, [H1, H2], D, cos, s, first, second) when ``node`` is the first of two
    rotary calls as rotary_heads rewrites them (the second one found among the users of the
    split's next piece)."""
    first = _rotary_of_split_piece(node)
    if first is None:
        return None
    split, index, H1, D, cos, signed = first
    following = [n for n in split.users if _is(n, operator.getitem) and n.args[1] == index + 1]
    for piece in following:
        for view in piece.users:
            for turned in view.users:
                for second in turned.users:
                    found = _rotary_of_split_piece(second)
                    if (found is not None and found[:2] == (split, index + 1) and found[3:] == (D, cos, signed)
                            and second is not node):
                        return split, index, [H1, found[2]], D, cos, signed, node, second
    return None


def _rotary_of_split_piece(node):
    """(split, index, heads, D, cos, s) for rotary(transpose(view(split(x, sizes, -1)[i],
    [B, T, -1, D]), 1, 2), cos, s) over x [B, T, C], where the view and transpose feed this
    rotary only and the piece is a whole number of heads."""
    if not _is(node, cpu_ops.rotary) or node.kwargs:
        return None
    turned, cos, signed = node.args
    if not _is(turned, aten.transpose.int) or tuple(turned.args[1:]) != (1, 2) or len(turned.users) != 1:
        return None
    view = turned.args[0]
    if not _is(view, aten.view.default) or len(view.users) != 1:
        return None
    piece, shape = view.args
    if not _is(piece, operator.getitem) or not _is(piece.args[0], aten.split_with_sizes.default):
        return None
    split, index = piece.args
    x = _val(split.args[0])
    dim = split.args[2] if len(split.args) > 2 else 0
    if (not isinstance(x, torch.Tensor) or x.ndim != 3 or dim not in (-1, 2) or split.kwargs
            or not isinstance(index, int)):
        return None
    D = shape[-1] if isinstance(shape, (list, tuple)) and len(shape) == 4 and shape[2] == -1 else None
    size = split.args[1][index]
    if not isinstance(D, int) or D < 1 or not isinstance(size, int) or size % D:
        return None
    heads = _val(view)
    if not isinstance(heads, torch.Tensor) or not _known_equal(heads.shape, (*x.shape[:2], size // D, D)):
        return None
    return split, index, size // D, D, cos, signed


# --- attention laid out by token ----------------------------------------------------------------

def attention_tokens(graph: fx.Graph) -> int:
    """paged_attention(q, ..) [B, Hq, T, D] followed by a reshape to its own shape, transpose(1, 2)
    and a reshape to [B, T, Hq * D] (what the output projection reads), each the only reader
    of the one before -> cpu_ops.paged_attention_tokens(q, ..), the same values in that
    layout. The shapes are checked on the nodes' recorded values, as far as they are known
    statically (symbolic sizes compare as expressions)."""
    done = 0
    for node in list(graph.nodes):
        chain = _tokens_chain(node)
        if chain is None:
            continue
        last = chain[-1]
        with graph.inserting_before(node):
            new = graph.call_function(cpu_ops.paged_attention_tokens, node.args, node.kwargs)
        new.meta = dict(last.meta)
        last.replace_all_uses_with(new)
        for n in reversed([node, *chain]):
            graph.erase_node(n)
        done += 1
    return done


def _tokens_chain(node: fx.Node):
    if not _is(node, cpu_ops.paged_attention) or len(node.users) != 1:
        return None
    q = _val(node.args[0])
    (first,) = node.users
    if not _is(first, aten.reshape.default) or len(first.users) != 1:
        return None
    (turned,) = first.users
    if not _is(turned, aten.transpose.int) or tuple(turned.args[1:]) != (1, 2) or len(turned.users) != 1:
        return None
    (last,) = turned.users
    if not _is(last, aten.reshape.default):
        return None
    same, out = _val(first), _val(last)
    if not all(isinstance(t, torch.Tensor) for t in (q, same, out)) or q.ndim != 4:
        return None
    B, H, T, D = q.shape
    if not (_known_equal(same.shape, q.shape) and _known_equal(out.shape, (B, T, H * D))):
        return None
    return [first, turned, last]


def _known_equal(a, b) -> bool:
    """Shapes equal for every value of their symbols (False where that is not known)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


# --- linears through oneDNN ------------------------------------------------------------------

def onednn_linear(graph: fx.Graph) -> int:
    """aten.linear(x, w, b) -> oneDNN's inner product over the same weight tensor (no copy,
    any strides), for float32 x, w (2-D) and b. On this project's CPU machine (AMD EPYC,
    2 cores) MKL's sgemm, which aten.linear calls, reads one-row products' weights at
    13-22 GB/s and oneDNN at 20-33 GB/s (SmolLM2-135M, all linears of a decode step:
    28 ms -> 18 ms) and is 1.5-2.5x faster on prefill shapes too. The sums run in another
    order: values within float rounding of aten.linear (~1e-6 relative), not bitwise;
    the same on one thread as on two. MKL runs these one-row products on one thread, oneDNN
    splits each over torch's threads: where another process holds one of the cores, every
    split waits for it (decode step 37 ms on one thread, 179 ms on two, 2 cores with one
    busy); ``torch.set_num_threads(1)`` is the caller's remedy there. Skipped (and logged)
    where this torch has no oneDNN. Unlike MKL it reads row-major weights faster than
    column-major ones (SmolLM2-135M decode step 39.3 -> 34.1 ms), which is how the engine
    lays them where it takes this rewrite (cpu_graph.row_major_weights).

    Which library is faster depends on the CPU: on a 2-core Intel Xeon (AVX-512) MKL's sgemm
    is the faster one, all linears of the SmolLM2-135M decode step 24 ms against oneDNN's
    57 ms (engine decode 26 tok/s with aten.linear, 13 with this rewrite). The engine asks
    ``onednn_linear_pays`` first and leaves this rewrite out where it does not."""
    sites = [n for n in graph.nodes if _is(n, aten.linear.default) and _onednn_fits(n)]
    if sites and not _onednn_works():
        log.info("onednn_linear: torch.ops.mkldnn._linear_pointwise unavailable; %d linears stay aten.linear",
                 len(sites))
        return 0
    for node in sites:
        x, weight, bias = (*node.args, None)[:3]
        node.target, node.args, node.kwargs = _onednn_linear_op(), (x, weight, bias, "none", [], ""), {}
    return len(sites)


def _onednn_linear_op():
    """Looked up when used: torch.ops raises AttributeError for an op this torch lacks."""
    return torch.ops.mkldnn._linear_pointwise.default


def _onednn_fits(node: fx.Node) -> bool:
    if node.kwargs or not 2 <= len(node.args) <= 3:
        return False
    x, weight, bias = (*node.args, None)[:3]
    xv, wv, bv = _val(x), _val(weight), _val(bias)
    if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)) or xv.ndim < 1 or wv.ndim != 2:
        return False
    tensors = [xv, wv] + ([bv] if bias is not None else [])
    if bias is not None and not (isinstance(bv, torch.Tensor) and bv.ndim == 1):
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


@functools.cache
def _onednn_works() -> bool:
    """oneDNN built in, and its linear computing F.linear on a small case."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.randn(3, 5), torch.randn(7, 5), torch.randn(7)
        got = _onednn_linear_op()(x, w.t().contiguous().t(), b, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


# what onednn_linear_pays found, by the weights' shapes and strides and the thread count
_PAYS: dict[tuple, bool] = {}
ONEDNN_MARGIN = 0.9  # oneDNN's pass must take at most this share of aten.linear's


def onednn_linear_pays(weights, rounds: int = 3) -> bool:
    """Whether oneDNN's inner product (onednn_linear) runs one-row products over ``weights``
    (the float32 2-D weights a step's linears read, in step order) faster than aten.linear
    on this machine: each library's best of ``rounds`` passes over every weight, alternated,
    oneDNN kept only when its pass takes at most ONEDNN_MARGIN of aten's (a close call keeps
    aten.linear, which is bitwise the step graph's). aten.linear reads the weights as given
    (column-major, as the engine lays them for it), oneDNN row-major copies of them (as the
    engine lays them where it takes oneDNN: cpu_graph.row_major_weights), each library in
    the layout it reads faster; the copies live for the measurement only, and only the first
    MEASURE_BYTES of weights are timed (``measured_weights``). One row is a
    decode step, where these products cost most of the step. Measured once per process for
    weights of the same shapes and strides at the same torch thread count; False without a
    working oneDNN."""
    weights = [w for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2
               and w.dtype == torch.float32 and w.device.type == "cpu"]
    if not weights or not _onednn_works():
        return False
    key = (tuple((tuple(w.shape), w.stride()) for w in weights), torch.get_num_threads())
    if key not in _PAYS:
        _PAYS[key] = _measure_onednn(weights, rounds)
    return _PAYS[key]


# the weights onednn_linear_pays times (a prefix of the step's, in step order), at most this
# many bytes: oneDNN's pass reads row-major copies of them, which must not double a large
# model's memory (a 7B model in fp32 is 27 GB); far past any CPU's cache, so the products
# still stream from memory, and all of a small model's weights (SmolLM2-135M: 513 MiB)
MEASURE_BYTES = 1 << 30


def measured_weights(weights: list) -> list:
    """The prefix of ``weights`` that onednn_linear_pays times: at least one, at most
    MEASURE_BYTES in all."""
    chosen, total = [], 0
    for w in weights:
        size = w.numel() * w.element_size()
        if chosen and total + size > MEASURE_BYTES:
            break
        chosen.append(w)
        total += size
    return chosen


@torch.no_grad()
def _measure_onednn(weights, rounds: int) -> bool:
    count, weights = len(weights), measured_weights(weights)
    gen = torch.Generator().manual_seed(0)
    rows = {w.shape[1]: torch.randn(1, w.shape[1], generator=gen) for w in weights}
    onednn, row_major = _onednn_linear_op(), [w.contiguous() for w in weights]

    def aten_pass():
        for w in weights:
            torch._C._nn.linear(rows[w.shape[1]], w)

    def onednn_pass():
        for w in row_major:
            onednn(rows[w.shape[1]], w, None, "none", [], "")

    best = {aten_pass: float("inf"), onednn_pass: float("inf")}
    onednn_pass()   # oneDNN makes its primitives at the first call of each shape
    for _ in range(rounds):
        for run in best:
            start = time.perf_counter()
            run()
            best[run] = min(best[run], time.perf_counter() - start)
    pays = best[onednn_pass] <= ONEDNN_MARGIN * best[aten_pass]
    log.info("onednn_linear: one-row products over %d weights%s take %.2f ms through oneDNN (row-major), "
             "%.2f ms through aten.linear (as given) (%d threads): %s", len(weights),
             f" (the first of {count})" if count > len(weights) else "", 1e3 * best[onednn_pass],
             1e3 * best[aten_pass], torch.get_num_threads(), "oneDNN" if pays else "aten.linear")
    return pays


# --- Python bindings -------------------------------------------------------------------------

# overload -> (torch's own binding: a function, or the name of a Tensor method; how many
# positional arguments the binding takes in the schema's order, None: all)
BINDINGS: dict = {
    aten.add.Tensor: (torch.add, 2), aten.sub.Tensor: (torch.sub, 2), aten.mul.Tensor: (torch.mul, 2),
    aten.div.Tensor: (torch.div, 2), aten.neg.default: (torch.neg, 1), aten.rsqrt.default: (torch.rsqrt, 1),
    aten.pow.Tensor_Scalar: (torch.pow, 2), aten.mean.dim: (torch.mean, 3), aten.exp.default: (torch.exp, 1),
    aten.cos.default: (torch.cos, 1), aten.sin.default: (torch.sin, 1), aten.tanh.default: (torch.tanh, 1),
    aten.sigmoid.default: (torch.sigmoid, 1), aten.silu.default: (torch._C._nn.silu, 1),
    aten.gelu.default: (torch._C._nn.gelu, 1), aten.linear.default: (torch._C._nn.linear, 3),
    aten.embedding.default: (torch.embedding, 5), aten.index_select.default: (torch.index_select, 3),
    aten.cat.default: (torch.cat, 2), aten.split_with_sizes.default: (torch.split_with_sizes, 3),
    aten.rms_norm.default: (torch.rms_norm, 4), aten.layer_norm.default: (torch.layer_norm, 6),
    aten.softmax.int: (torch.softmax, 3), aten.transpose.int: (torch.transpose, 3),
    aten.unsqueeze.default: (torch.unsqueeze, 2), aten.reshape.default: (torch.reshape, 2),
    aten.permute.default: (torch.permute, 2), aten.view.default: ("view", 2),
    aten.expand.default: ("expand", 2), aten.to.dtype: ("to", 2), aten.sym_size.int: ("size", 2),
}


def python_bindings(graph: fx.Graph) -> int:
    """Every call of an overload in ``BINDINGS`` -> the same op through torch's binding, when
    its arguments are passed as the binding takes them (keyword-only ones by name)."""
    bound = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in BINDINGS:
            continue
        binding, positional = BINDINGS[node.target]
        schema = node.target._schema
        keyword_only = {a.name for a in schema.arguments if a.kwarg_only}
        if (positional is not None and len(node.args) > positional) or not set(node.kwargs) <= keyword_only:
            continue
        if isinstance(binding, str):
            node.op, node.target = "call_method", binding
        else:
            node.target = binding
        bound += 1
    return bound


REWRITES: list[tuple[str, Callable[[fx.Graph], int]]] = [
    ("common_subexpressions", common_subexpressions),
    ("rms_norm", rms_norm),
    ("rotary", rotary),
    ("rotary_heads", rotary_heads),
    ("attention_tokens", attention_tokens),
    ("onednn_linear", onednn_linear),
]
"""In order; then cpu_graph.py calls fusegen ops' Python functions directly and, last,
``python_bindings``."""
