"""Standard-domain spellings of aten's shape and indexing ops: identities, gathers, slices,
concat and split, transposes, (un)squeezes, reshapes, expands and sym_size.

A handler ``(g, n, a)`` gets the node's arguments by schema name in ``a``. It returns False,
having emitted nothing, where the arguments fall outside what its ONNX op expresses exactly;
the node then goes to the "aten" domain instead."""

from __future__ import annotations

import torch
from torch import fx

from fusegen.onnx_view.values import dtype_of, meta_val, onnx_dim

INT64_MAX = 2**63 - 1

aten = torch.ops.aten


def _same_dim(size, dim) -> bool:
    """Whether a size argument (an int or a symbolic-int node) is the tensor dim ``dim``."""
    size = meta_val(size)
    a = size.node.expr if isinstance(size, torch.SymInt) else size
    b = dim.node.expr if isinstance(dim, torch.SymInt) else dim
    return bool(a == b)


def _identity(g, n, a):
    g.emit(n, "Identity", [g.value(a["self"])], [g.out(n)])
    return True


def _gather(table: str, index: str, axis: str | None):
    """embedding(weight, indices) -> Gather axis 0; index_select(x, dim, index) -> Gather axis dim."""
    def handler(g, n, a):
        if axis is not None and meta_val(a[index]).dim() != 1:
            return False
        dim = 0 if axis is None else a[axis]
        g.emit(n, "Gather", [g.value(a[table]), g.value(a[index])], [g.out(n)], axis=dim)
        return True
    return handler


def _select(g, n, a):
    index = g.operand(n, a["index"], torch.int64)
    g.emit(n, "Gather", [g.value(a["self"]), index], [g.out(n)], axis=a["dim"])
    return True


def _slice(g, n, a):
    step = a["step"]
    if isinstance(step, fx.Node):
        return False
    start = 0 if a["start"] is None else a["start"]
    end = INT64_MAX if a["end"] is None else a["end"]
    inputs = [g.value(a["self"]), g.int_vector(n, [start]), g.int_vector(n, [end]),
              g.const([a["dim"]], torch.int64), g.const([step], torch.int64)]
    g.emit(n, "Slice", inputs, [g.out(n)])
    return True


def _cat(g, n, a):
    dtype, rank = dtype_of(n), meta_val(n).dim()
    if any(meta_val(t).dim() != rank for t in a["tensors"]):
        return False
    g.emit(n, "Concat", [g.operand(n, t, dtype) for t in a["tensors"]], [g.out(n)], axis=a["dim"])
    return True


def _split(g, n, a):
    """split_with_sizes with its sizes; split / chunk with the sizes their outputs have."""
    vals, dim = n.meta["val"], a["dim"]
    sizes = a.get("split_sizes")
    if sizes is None:
        sizes = [onnx_dim(v.shape[dim]) for v in vals]
        if any(isinstance(s, str) for s in sizes):
            return False
    inputs = [g.value(a["self"]), g.int_vector(n, list(sizes))]
    g.emit(n, "Split", inputs, g.outs(n, vals), axis=dim)
    return True


def _transpose(g, n, a):
    rank = meta_val(a["self"]).dim()
    perm = list(range(rank))
    if "dims" in a:
        perm = [d % rank for d in a["dims"]]
    elif "dim0" in a:
        d0, d1 = a["dim0"] % rank, a["dim1"] % rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:  # t(): 0-d and 1-d tensors are returned as they are
        perm = perm[::-1]
    g.emit(n, "Transpose", [g.value(a["self"])], [g.out(n)], perm=perm)
    return True


def _unsqueeze(g, n, a):
    g.emit(n, "Unsqueeze", [g.value(a["self"]), g.const([a["dim"]], torch.int64)], [g.out(n)])
    return True


def _squeeze(g, n, a):
    """Only dims known to be 1 are squeezed (PyTorch leaves other dims alone, ONNX fails)."""
    shape = meta_val(a["self"]).shape
    dims = a.get("dim")
    dims = range(len(shape)) if dims is None else [dims] if isinstance(dims, int) else dims
    sizes = {d % len(shape): onnx_dim(shape[d]) for d in dims} if len(shape) else {}
    if any(isinstance(s, str) for s in sizes.values()):
        return False
    axes = sorted(d for d, s in sizes.items() if s == 1)
    if not axes:
        return _identity(g, n, a)
    g.emit(n, "Squeeze", [g.value(a["self"]), g.const(axes, torch.int64)], [g.out(n)])
    return True


def _reshape(g, n, a):
    """A size equal to the input's dim at the same index becomes 0 (ONNX: copy that dim), so
    the usual ``view(x, [B, S, -1, D])`` is a constant shape; other symbolic sizes are
    computed. A literal 0 size needs ``allowzero=1`` and so no copied dims."""
    x = a["self"]
    size, in_shape = list(a.get("size", a.get("shape"))), meta_val(x).shape
    allowzero = any(not isinstance(s, fx.Node) and s == 0 for s in size)
    if not allowzero:
        size = [0 if isinstance(s, fx.Node) and i < len(in_shape) and _same_dim(s, in_shape[i]) else s
                for i, s in enumerate(size)]
    g.emit(n, "Reshape", [g.value(x), g.int_vector(n, size)], [g.out(n)], allowzero=1 if allowzero else None)
    return True


def _expand(g, n, a):
    """PyTorch's -1 and sizes equal to the input's dim become 1 (ONNX Expand broadcasts)."""
    x = a["self"]
    size, in_shape = list(a["size"]), meta_val(x).shape
    lead = len(size) - len(in_shape)
    size = [1 if (not isinstance(s, fx.Node) and s == -1) or (i >= lead and _same_dim(s, in_shape[i - lead]))
            else s for i, s in enumerate(size)]
    g.emit(n, "Expand", [g.value(x), g.int_vector(n, size)], [g.out(n)])
    return True


def _sym_size(g, n, a):
    rank = meta_val(a["self"]).dim()
    dim = a["dim"] % rank
    shape = g.emit(n, "Shape", [g.value(a["self"])], 1, start=dim, end=dim + 1)[0]
    scalar = g.emit(n, "Squeeze", [shape], [g.out(n)])[0]
    g.vectors[scalar] = shape
    return True


SHAPE_OPS = {
    aten.clone.default: _identity, aten.alias.default: _identity, aten.detach.default: _identity,
    aten.lift_fresh_copy.default: _identity,
    aten.embedding.default: _gather("weight", "indices", None),
    aten.index_select.default: _gather("self", "index", "dim"),
    aten.select.int: _select, aten.slice.Tensor: _slice, aten.cat.default: _cat,
    aten.split_with_sizes.default: _split, aten.split.Tensor: _split, aten.chunk.default: _split,
    aten.transpose.int: _transpose, aten.permute.default: _transpose, aten.t.default: _transpose,
    aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten._unsafe_view.default: _reshape,
    aten.expand.default: _expand, aten.sym_size.int: _sym_size,
}
