"""Triton source for a FusedGroup, generated from the group's own nodes.

Two schedules:

    "row"        a program holds ROWS whole rows of the frame [M, N] in registers (several
                 when N is short, ``row_schedule``), so reductions over the last dim (mean,
                 sum, amax) are tl.sum / tl.max along the columns;
    "pointwise"  no reduction: programs tile the M*N elements, BLOCK at a time.

Every input is read in place: its strides broadcast to the frame [*lead, N] (0 along
broadcast dims) are kernel arguments, and a program decomposes its row index over the lead
dims. ``fusegen.rotate_half`` of an input is the same load at permuted columns. Full-frame
outputs are laid out as eager PyTorch lays out a pointwise result: dense, in the dim order
of the first full-frame input (``output_order``), so a group over a transposed view (rotary
on [B, H, T, D] heads of a token-major projection) writes token-major memory and a later
transpose-reshape back to tokens is a view, not a copy. Every op computes in fp32 and rounds its
result to the dtype the graph gave that node, as eager PyTorch does op by op.
"""

from __future__ import annotations

import hashlib
import math

import torch
import triton
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
    aten.cos.default: "tl.cos({0})",   # libdevice's cosf/sinf on NVIDIA: full range reduction,
    aten.sin.default: "tl.sin({0})",   # as rotary tables at positions in the thousands need
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
        self.inputs: list[fx.Node] = []  # the group's placeholders, in order

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
        elif t is torch.ops.fusegen.rotate_half.default:
            i = self.inputs.index(node.args[0])  # a group input: read it at permuted columns
            expr = (f"tl.where(cols < N // 2, -1.0, 1.0) * tl.load(in{i} + off{i} + ((cols + N // 2) % N) * c{i}, "
                    f"mask=mask, other=0.0).to(tl.float32)")
        elif t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
            if not row:
                raise ValueError(f"{self.group.name}: reduction {t} in a pointwise group")
            x = self.operand(node.args[0])
            if t is aten.amax.default:
                expr = f"tl.max(tl.where(mask, {x}, float('-inf')), axis=1, keep_dims=True)"
            else:
                expr = f"tl.sum(tl.where(mask, {x}, 0.0), axis=1, keep_dims=True)"
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


def input_strides(x: torch.Tensor, frame: tuple) -> list[int]:
    """Strides of ``x`` broadcast to ``frame`` [*lead, N]: lead-dim strides, then the column
    stride (0 along broadcast dims), so kernels read every input in place."""
    return list(x.expand(frame).stride())


def output_order(x: torch.Tensor) -> list[int]:
    """The physical order (outermost first) of a dense result laid out like ``x``: its dims
    of size > 1 by decreasing stride (ties in dim order), size-1 dims first; the plain order
    unless the last dim stays innermost (the kernels' column loop)."""
    big = sorted((d for d in range(x.dim()) if x.shape[d] > 1), key=lambda d: -x.stride(d))
    if big and big[-1] != x.dim() - 1:
        return list(range(x.dim()))
    return [d for d in range(x.dim()) if x.shape[d] <= 1] + big


def _offsets(num_inputs: int, lead_rank: int, row: bool, row_outputs: list[int] = ()) -> list[str]:
    """Decompose the row index over the lead dims; each input's offset of its row, and each
    full-frame output's."""
    lines = ["    r = row"]
    for d in range(lead_rank - 1, 0, -1):
        lines.append(f"    i{d} = r % L{d}")
        lines.append(f"    r = r // L{d}")
    lines.append("    i0 = r")
    for i in range(num_inputs):
        terms = " + ".join(f"i{d} * s{i}_{d}" for d in range(lead_rank))
        lines.append(f"    off{i} = {terms}")
    for i in row_outputs:
        terms = " + ".join(f"i{d} * o{i}_{d}" for d in range(lead_rank))
        lines.append(f"    ooff{i} = {terms}")
    return lines


def _loads(num_inputs: int, row: bool) -> list[str]:
    return [f"    a{i} = tl.load(in{i} + off{i} + cols * c{i}, mask=mask, other=0.0)" for i in range(num_inputs)]


def _stores(layouts: list[str], names: list[str], row: bool) -> list[str]:
    lines = []
    for i, (kind, name) in enumerate(zip(layouts, names)):
        if kind == "row":
            lines.append(f"    tl.store(out{i} + ooff{i} + cols * oc{i}, {name}, mask=mask)")
        elif kind == "col":
            lines.append(f"    tl.store(out{i} + row, {name}, mask=row < M)" if row
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
    em.inputs = placeholders
    for i, ph in enumerate(placeholders):
        em.names[ph] = f"a{i}"
        if ph.meta["val"].dtype == torch.float32:
            em.fp32.add(f"a{i}")
    for n in graph.nodes:
        if n.op == "call_function":
            em.node(n, f"v{len(em.lines)}", row)
    ins = ", ".join(f"in{i}" for i in range(len(placeholders)))
    lead_rank = len(group.frame[0])
    strides = "".join(f", s{i}_{d}" for i in range(len(placeholders)) for d in range(lead_rank))
    strides += "".join(f", c{i}" for i in range(len(placeholders)))
    row_outputs = _row_outputs(group)
    strides += "".join(f", o{i}_{d}" for i in row_outputs for d in range(lead_rank))
    strides += "".join(f", oc{i}" for i in row_outputs)
    strides += "".join(f", L{d}" for d in range(1, lead_rank))
    outs = ", ".join(f"out{i}" for i in range(len(outputs)))
    ops = ", ".join(str(n.target).replace("aten.", "") for n in graph.nodes if n.op == "call_function")
    head = [
        f"@triton.jit",
        f"def {kernel}({ins}, {outs}{strides}, M, N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, USE_GDC: tl.constexpr):",
        f'    """Generated from {len(em.lines)} graph nodes ({group.schedule} schedule): {ops}."""',
    ]
    head += ["    if USE_GDC:", "        tl.extra.cuda.gdc_wait()", "        tl.extra.cuda.gdc_launch_dependents()"]
    if row:
        head += ["    tl.static_assert(BLOCK >= N)",
                 "    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]",
                 "    cols = tl.arange(0, BLOCK)[None, :]", "    mask = (row < M) & (cols < N)"]
    else:
        head += ["    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)", "    mask = offs < M * N",
                 "    row = offs // N", "    cols = offs % N"]
    body = _offsets(len(placeholders), lead_rank, row, row_outputs) + _loads(len(placeholders), row) + em.lines
    body += _stores(group.output_layouts, [em.names[o] for o in outputs], row)
    launcher = _launcher(kernel, group, outputs, row)
    imports = ["import torch", "import triton", "import triton.language as tl", "",
               "from fusegen.codegen.launch import pdl",
               "from fusegen.codegen.pointwise import input_strides, output_order, row_schedule", "", ""]
    return "\n".join(imports + head
                     + body + ["", ""] + launcher) + "\n"


def _launcher(kernel: str, group: FusedGroup, outputs, row: bool) -> list[str]:
    lead, N = group.frame
    first_row = group.input_layouts.index("row")
    dtypes = [str(o.meta["val"].dtype) for o in outputs]
    lines = [
        "def launch(*inputs):",
        f'    """Runs {kernel} on CUDA tensors (or under TRITON_INTERPRET=1)."""',
        f"    frame = inputs[{first_row}].shape",
        f"    N = {N}",
        f"    M = inputs[{first_row}].numel() // N",
        "    strides = [input_strides(x, frame) for x in inputs]",
        "    args = [s[d] for s in strides for d in range(len(frame) - 1)] + [s[-1] for s in strides]",
        f"    order = output_order(inputs[{first_row}])",
        "    outs = []",
    ]
    for kind, dtype in zip(group.output_layouts, dtypes):
        if kind == "row":
            lines.append(f"    outs.append(torch.empty_permuted(frame, order, dtype={dtype}, device=inputs[0].device))")
        else:
            lines.append(f"    outs.append(torch.empty((*frame[:-1], 1), dtype={dtype}, device=inputs[0].device))")
    lines += [
        f"    row_outs = [outs[i] for i in {_row_outputs(group)}]",
        "    args += [o.stride(d) for o in row_outs for d in range(len(frame) - 1)] + [o.stride(-1) for o in row_outs]",
        "    args += list(frame[1:-1])",
    ]
    if row:
        lines += ["    BLOCK = triton.next_power_of_2(N)",
                  "    rows, warps = row_schedule(M, BLOCK)",
                  f"    {kernel}[(triton.cdiv(M, rows),)](*inputs, *outs, *args, M, N, BLOCK=BLOCK, ROWS=rows, num_warps=warps, **pdl(inputs[0]))"]
    else:
        lines += ["    BLOCK = 1024",
                  f"    {kernel}[(triton.cdiv(M * N, BLOCK),)](*inputs, *outs, *args, M, N, BLOCK=BLOCK, ROWS=1, num_warps=4, **pdl(inputs[0]))"]
    lines.append("    return tuple(outs)")
    return lines


ROW_ELEMS = 4096   # elements a row-schedule program holds (several rows when N is short)


def row_schedule(M: int, block: int) -> tuple[int, int]:
    """(rows per program, warps) of the row schedule for M rows of ``block`` columns: short
    rows are packed several to a program so every program moves about ROW_ELEMS elements,
    and each thread holds 16 of them (two 16-byte loads in bf16)."""
    rows = max(1, min(ROW_ELEMS // block, triton.next_power_of_2(max(M, 1))))
    warps = max(1, min(16, rows * block // (32 * 16)))
    return rows, warps


def _row_outputs(group: FusedGroup) -> list[int]:
    """Indices of the full-frame outputs (their strides are kernel arguments)."""
    return [i for i, kind in enumerate(group.output_layouts) if kind == "row"]


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]
