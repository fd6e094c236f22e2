"""Triton source for a FusedGroup, generated from the group's own nodes.

Two schedules:

    "row"        one program per row of the frame [M, N]; the whole row is in registers, so
                 reductions over the last dim (mean, sum, amax) are tl.sum / tl.max;
    "pointwise"  no reduction: programs tile the M*N elements, BLOCK at a time.

Inputs are loaded by layout: "row" [M, N], "col" [M, 1] (one value per row), "vec" [N]
(the same for every row), "scalar" (one element). Every op computes in fp32 and rounds its
result to the dtype the graph gave that node, as eager PyTorch does op by op.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import fx

from fusegen.fused_group import FusedGroup

aten = torch.ops.aten

TL_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
             torch.float64: "tl.float64"}
BINARY = {aten.add.Tensor: "({} + {})", aten.sub.Tensor: "({} - {})", aten.mul.Tensor: "({} * {})",
          aten.div.Tensor: "({} / {})"}
UNARY = {
    aten.neg.default: "(-{0})",
    aten.rsqrt.default: "(1.0 / tl.sqrt({0}))",
    aten.sqrt.default: "tl.sqrt({0})",
    aten.exp.default: "tl.exp({0})",
    aten.tanh.default: "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)",
    aten.sigmoid.default: "tl.sigmoid({0})",
    aten.silu.default: "({0} * tl.sigmoid({0}))",
    aten.relu.default: "tl.maximum({0}, 0.0)",
    aten.reciprocal.default: "(1.0 / {0})",
    aten.to.dtype: "{0}",
    aten._to_copy.default: "{0}",
}
POWERS = {-1.0: "(1.0 / {0})", -0.5: "(1.0 / tl.sqrt({0}))", 0.5: "tl.sqrt({0})", 1.0: "{0}",
          2.0: "({0} * {0})", 3.0: "({0} * {0} * {0})"}


def _literal(x) -> str:
    if isinstance(x, bool):
        return "1.0" if x else "0.0"
    if isinstance(x, float) and math.isinf(x):
        return "float('inf')" if x > 0 else "float('-inf')"
    return repr(float(x))


class _Emitter:
    def __init__(self, group: FusedGroup):
        self.group = group
        self.lines: list[str] = []
        self.names: dict[fx.Node, str] = {}
        self.fp32: set[str] = set()   # variables already held in fp32

    def operand(self, arg) -> str:
        if isinstance(arg, fx.Node):
            name = self.names[arg]
            return name if name in self.fp32 else f"{name}.to(tl.float32)"
        return _literal(arg)

    def node(self, node: fx.Node, name: str, row: bool) -> None:
        t = node.target
        dtype = TL_DTYPES[node.meta["val"].dtype]
        if t in BINARY:
            expr = BINARY[t].format(self.operand(node.args[0]), self.operand(node.args[1]))
        elif t is aten.pow.Tensor_Scalar:
            expr = POWERS[float(node.args[1])].format(self.operand(node.args[0]))
        elif t in UNARY:
            expr = UNARY[t].format(self.operand(node.args[0]))
        elif t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
            if not row:
                raise ValueError(f"{self.group.name}: reduction {t} in a pointwise group")
            x = self.operand(node.args[0])
            if t is aten.amax.default:
                expr = f"tl.max(tl.where(mask, {x}, float('-inf')), axis=0)"
            else:
                expr = f"tl.sum(tl.where(mask, {x}, 0.0), axis=0)"
                if t is aten.mean.dim:
                    expr = f"({expr} / N)"
        else:
            raise ValueError(f"{self.group.name}: no Triton rule for {t}")
        if dtype == "tl.float32":
            self.lines.append(f"    {name} = {expr}")
            self.fp32.add(name)
        else:
            self.lines.append(f"    {name} = ({expr}).to({dtype})")
        self.names[node] = name


def row_view(x: torch.Tensor, N: int) -> tuple[torch.Tensor, int]:
    """``x`` [*lead, N] and the stride between its rows, copying only when the lead dims do
    not collapse into one (e.g. one part of a fused projection's output does not copy)."""
    lead, strides = x.shape[:-1], x.stride()[:-1]
    if x.stride(-1) == 1 and all(strides[i] == strides[i + 1] * lead[i + 1] for i in range(len(lead) - 1)):
        return x, (strides[-1] if lead else N)
    return x.contiguous(), N


def _loads(layouts: list[str], row: bool) -> list[str]:
    index = {"row": "row * s{i} + cols", "col": "row", "vec": "cols", "scalar": "0"}
    masked = {"row", "vec"}
    lines = []
    for i, kind in enumerate(layouts):
        mask = ", mask=mask, other=0.0" if kind in masked or (not row and kind == "col") else ""
        lines.append(f"    a{i} = tl.load(in{i} + {index[kind].format(i=i)}{mask})")
    return lines


def _stores(layouts: list[str], names: list[str], row: bool) -> list[str]:
    lines = []
    for i, (kind, name) in enumerate(zip(layouts, names)):
        if kind == "row":
            where = "row * N + cols"
            lines.append(f"    tl.store(out{i} + {where}, {name}, mask=mask)")
        elif kind == "col":
            lines.append(f"    tl.store(out{i} + row, {name})" if row
                         else f"    tl.store(out{i} + row, {name}, mask=mask & (cols == 0))")
        else:
            raise ValueError(f"output layout {kind!r} is not produced by a row group")
    return lines


def generate_source(group: FusedGroup, kernel: str) -> str:
    """The Triton kernel and its launcher for ``group``, as Python source."""
    row = group.schedule == "row"
    graph = group.reference.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = list(next(n for n in graph.nodes if n.op == "output").args[0])
    em = _Emitter(group)
    for i, ph in enumerate(placeholders):
        em.names[ph] = f"a{i}"
        if ph.meta["val"].dtype == torch.float32:
            em.fp32.add(f"a{i}")
    for n in graph.nodes:
        if n.op == "call_function":
            em.node(n, f"v{len(em.lines)}", row)
    ins = ", ".join(f"in{i}" for i in range(len(placeholders)))
    strides = "".join(f", s{i}" for i, kind in enumerate(group.input_layouts) if kind == "row")
    outs = ", ".join(f"out{i}" for i in range(len(outputs)))
    ops = ", ".join(str(n.target).replace("aten.", "") for n in graph.nodes if n.op == "call_function")
    head = [
        f"@triton.jit",
        f"def {kernel}({ins}, {outs}{strides}, M, N: tl.constexpr, BLOCK: tl.constexpr):",
        f'    """Generated from {len(em.lines)} graph nodes ({group.schedule} schedule): {ops}."""',
    ]
    if row:
        head += ["    tl.static_assert(BLOCK >= N)",
                 "    row = tl.program_id(0)", "    cols = tl.arange(0, BLOCK)", "    mask = cols < N"]
    else:
        head += ["    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)", "    mask = offs < M * N",
                 "    row = offs // N", "    cols = offs % N"]
    body = _loads(group.input_layouts, row) + em.lines
    body += _stores(group.output_layouts, [em.names[o] for o in outputs], row)
    launcher = _launcher(kernel, group, outputs, row)
    imports = ["import torch", "import triton", "import triton.language as tl", "",
               "from fusegen.codegen.pointwise import row_view", "", ""]
    return "\n".join(imports + head
                     + body + ["", ""] + launcher) + "\n"


def _launcher(kernel: str, group: FusedGroup, outputs, row: bool) -> list[str]:
    lead, N = group.frame
    first_row = group.input_layouts.index("row")
    dtypes = [str(o.meta["val"].dtype) for o in outputs]
    rows = [i for i, kind in enumerate(group.input_layouts) if kind == "row"]
    lines = [
        "def launch(*inputs):",
        f'    """Runs {kernel} on CUDA tensors (or under TRITON_INTERPRET=1)."""',
        f"    frame = inputs[{first_row}].shape",
        f"    N = {N}",
        "    M = inputs[{}].numel() // N".format(first_row),
        "    flat, strides = list(inputs), []",
        f"    for i in {rows}:",
        "        flat[i], stride = row_view(inputs[i], N)",
        "        strides.append(stride)",
        "    for i, x in enumerate(flat):",
        f"        if i not in {rows}:",
        "            flat[i] = x.contiguous()",
        "    outs = []",
    ]
    for kind, dtype in zip(group.output_layouts, dtypes):
        shape = "frame" if kind == "row" else "(*frame[:-1], 1)"
        lines.append(f"    outs.append(torch.empty({shape}, dtype={dtype}, device=flat[0].device))")
    if row:
        lines += ["    BLOCK = triton.next_power_of_2(N)",
                  "    warps = 4 if BLOCK <= 2048 else 8 if BLOCK <= 8192 else 16",
                  f"    {kernel}[(M,)](*flat, *outs, *strides, M, N, BLOCK=BLOCK, num_warps=warps)"]
    else:
        lines += ["    BLOCK = 1024",
                  f"    {kernel}[(triton.cdiv(M * N, BLOCK),)](*flat, *outs, *strides, M, N, BLOCK=BLOCK, num_warps=4)"]
    lines.append("    return tuple(outs)")
    return lines


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]
