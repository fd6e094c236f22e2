"""Fusion across the GEMM boundary: the FusedGroups around a decode linear become the skinny
GEMM's prologue and epilogue, generated from the groups' own nodes.

    h, x = fused_a(residual, y, w_norm)    # a row group (residual add + RMSNorm): the prologue
    z = linear(x, W)                        # [M, S*N] (q/k/v or gate/up fused by fuse_projections)
    g, u = split_with_sizes(z, [N, N])      # or z itself when S = 1
    out = fused_b(g, u, extra...)           # a pointwise group (silu(g) * u): the epilogue
 -> out, h = FusedGemm(residual, y, w_norm, W, bias, extra...)

The kernel is the skinny-GEMM template (codegen/skinny_gemm.py). With a prologue, a program
first sweeps its rows over all of K for the group's row reductions (mean of squares), then
recomputes the group's elementwise nodes on each [BLOCK_M, BLOCK_K] tile of its K range and
feeds the result to the product; the programs of the first N tile also store the group's
other outputs (the residual sum) over their K range. With an epilogue, each segment of W
feeding the group gets its own fp32 accumulator; where a tile is final (no split-K, or the
last split's fused reduction) the accumulators are rounded to the linear's dtype, as its
output would be, and the group's nodes run on them in registers. Neither the normalised
input nor the [M, S*N] product is written. Every node rounds to the dtype the graph gave
it, as the groups' own kernels do; the prologue's sums run in a different order than the
row kernel's, so results agree to the last fp32 bit of a sum, not bitwise.

The fused q/k/v projection gets a third epilogue: linear -> split(q, k, v) -> heads ->
rotary groups on q and k -> ``paged_kv_write(k, v)``. One program computes one head
(BLOCK_N = head dim) twice, from W's rows and from the same rows rotated by half a head (a
second read of the same tile, from L1), so ``rotate_half`` is an accumulator, not a shuffle;
q heads are stored token-major for attention, k and v heads go straight to their slots of
the paged pool. The q/k/v tensors and the KV-write launch disappear.

``fuse_gemms`` rewrites a routed step graph (``skinny_gemm.route_linears``) at engine set-up,
where the GEMM table is measured. A call runs the fused kernel when the table chose the
template for its (M, S*N, K) (and, with a prologue, M <= PROLOGUE_MAX_M, where rereading the
rows per program stays cheaper than the group's own launch); otherwise it computes what the
graph did: the prologue group's kernel, the linear (template or cuBLAS, as the table
chose), the epilogue group's kernel. Off CUDA the
reference runs, unless $FUSEGEN_KERNELS=1 asks for the kernels in Triton's interpreter.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter

import torch
import triton
from torch import fx
from triton.runtime.errors import OutOfResources

from fusegen.codegen import cache, skinny_gemm
from fusegen.codegen.launch import pdl
from fusegen.codegen.pointwise import TL_DTYPES, _Emitter
from fusegen.fused_group import FusedGroup, kernels_wanted

aten = torch.ops.aten
LINEARS = (aten.linear.default, skinny_gemm.linear)
REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
ROTATE_HALF = torch.ops.fusegen.rotate_half.default
PROLOGUE_MAX_M = 16


def _graph_parts(group: FusedGroup):
    graph = group.reference.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = list(next(n for n in graph.nodes if n.op == "output").args[0])
    return placeholders, outputs


def _indent(lines, by: int) -> list[str]:
    return [" " * by + line for line in lines]


class _Source:
    """Builds the kernel source for one (prologue, epilogue) pair."""

    def __init__(self, kernel: str, linear_dtype, prologue, epilogue):
        self.kernel, self.ldt = kernel, TL_DTYPES[linear_dtype]
        self.prologue, self.epilogue = prologue, epilogue   # FusedGemm's descriptions

    def signature(self) -> list[str]:
        args = []
        if self.prologue:
            n_in = len(self.prologue.group_inputs)
            args += [f"p{i}" for i in range(n_in)]
            args += [f"q{j}" for j in range(len(self.prologue.side_outputs))]
        else:
            args.append("x_ptr")
        args += ["w_ptr", "bias_ptr"]
        if isinstance(self.epilogue, QKVEpilogue):
            e = self.epilogue
            args += [f"eq{i}" for i in e.q_extra] + [f"ek{i}" for i in e.k_extra]
            args += ["q_out", "k_pool", "v_pool", "slot_ptr"]
        elif self.epilogue:
            args += [f"e{i}" for i in self.epilogue.extra]
            args += [f"out{j}" for j in range(len(self.epilogue.out_dtypes))]
        else:
            args.append("y_ptr")
        args += ["part_ptr", "count_ptr", "M", "K", "stride_wn", "stride_wk"]
        if self.prologue:
            args += [f"sp{i}_m, sp{i}_k" for i in range(len(self.prologue.group_inputs))]
            args += [f"sq{j}_m, sq{j}_k" for j in range(len(self.prologue.side_outputs))]
        else:
            args += ["stride_xm", "stride_xk"]
        if isinstance(self.epilogue, QKVEpilogue):
            e = self.epilogue
            args += [f"sq{i}_t, sq{i}_h, sq{i}_d" for i in e.q_extra] + [f"sk{i}_t, sk{i}_h, sk{i}_d" for i in e.k_extra]
            args += ["so_t, so_h, so_d", "pool_b, pool_r, pool_h, pool_d", "HQ, HKV", "PAGE: tl.constexpr"]
        elif self.epilogue:
            args += [f"se{i}_m, se{i}_n" for i in self.epilogue.extra]
            args += [f"so{j}_m, so{j}_n" for j in range(len(self.epilogue.out_dtypes))]
        else:
            args += ["stride_ym"]
        S = self._segments()
        args += ["N: tl.constexpr"] + [f"OFF{s}: tl.constexpr" for s in range(S)]
        args += ["HAS_BIAS: tl.constexpr", "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr",
                 "BLOCK_K: tl.constexpr", "SPLIT_K: tl.constexpr", "USE_DOT: tl.constexpr",
                 "EVEN_K: tl.constexpr", "USE_GDC: tl.constexpr"]
        return [f"def {self.kernel}(", *[f"        {a}," for a in args], "):"]

    def prologue_phase1(self) -> list[str]:
        """Loop over all of K accumulating the row reductions; names r{i}."""
        p = self.prologue
        placeholders, _ = _graph_parts(p.group)
        em = _Emitter(p.group)
        em.inputs = placeholders
        for i, ph in enumerate(placeholders):
            em.names[ph] = f"a{i}"
            if ph.meta["val"].dtype == torch.float32:
                em.fp32.add(f"a{i}")
        lines, tails = [], []
        reds = p.reductions
        for r, node in enumerate(reds):
            init = "float('-inf')" if node.target is aten.amax.default else "0.0"
            lines.append(f"    red{r} = tl.full((BLOCK_M, 1), {init}, dtype=tl.float32)")
        lines += ["    for k in range(0, K, BLOCK_K):", "        cols = k + rk[None, :]",
                  "        mask = m_ok & (cols < K)"]
        needed = {a for n in p.pre_nodes for a in n.all_input_nodes if a.op == "placeholder"}
        needed |= {a for n in reds for a in n.all_input_nodes if a.op == "placeholder"}
        body = [f"    a{i} = tl.load(p{i} + rows * sp{i}_m + cols * sp{i}_k, mask=mask, other=0.0)"
                for i, ph in enumerate(placeholders) if ph in needed]
        for n in p.pre_nodes:
            em.node(n, f"w{len(em.lines)}", row=True)
        body += em.lines
        for r, node in enumerate(reds):
            x = em.operand(node.args[0])
            if node.target is aten.amax.default:
                body.append(f"    red{r} = tl.maximum(red{r}, tl.max(tl.where(mask, {x}, float('-inf')), axis=1, keep_dims=True))")
            else:
                body.append(f"    red{r} += tl.sum(tl.where(mask, {x}, 0.0), axis=1, keep_dims=True)")
            value = f"red{r} / K" if node.target is aten.mean.dim else f"red{r}"
            dtype = node.meta["val"].dtype
            tails.append(f"    r{r} = {value}" if dtype == torch.float32 else f"    r{r} = ({value}).to({TL_DTYPES[dtype]})")
        lines += _indent(body, 4) + tails
        return lines

    def prologue_tile(self) -> tuple[list[str], str]:
        """Inside the K loop: the group's elementwise nodes on this tile; the x tile's name."""
        p = self.prologue
        placeholders, outputs = _graph_parts(p.group)
        em = _Emitter(p.group)
        em.inputs = placeholders
        for i, ph in enumerate(placeholders):
            em.names[ph] = f"a{i}"
            if ph.meta["val"].dtype == torch.float32:
                em.fp32.add(f"a{i}")
        for r, node in enumerate(p.reductions):
            em.names[node] = f"r{r}"
            if node.meta["val"].dtype == torch.float32:
                em.fp32.add(f"r{r}")
        lines = ["    mask = m_ok & (cols < K)"]
        lines += [f"    a{i} = tl.load(p{i} + rows * sp{i}_m + cols * sp{i}_k, mask=mask, other=0.0)"
                  for i in range(len(placeholders))]
        for n in p.group.reference.graph.nodes:
            if n.op == "call_function" and n not in p.reductions:
                em.node(n, f"v{len(em.lines)}", row=True)
        lines += em.lines
        if p.side_outputs:
            lines.append("    if pid_n == 0:")
            for j, o in enumerate(p.side_outputs):
                lines.append(f"        tl.store(q{j} + rows * sq{j}_m + cols * sq{j}_k, {em.names[outputs[o]]}, mask=mask)")
        return lines, em.names[outputs[p.x_output]]

    def epilogue_body(self) -> list[str]:
        e = self.epilogue
        placeholders, outputs = _graph_parts(e.group)
        em = _Emitter(e.group)
        em.inputs = placeholders
        for i, ph in enumerate(placeholders):
            em.names[ph] = f"c{i}"
            if i not in e.segments and ph.meta["val"].dtype == torch.float32:
                em.fp32.add(f"c{i}")
        for n in e.group.reference.graph.nodes:
            if n.op == "call_function":
                em.node(n, f"u{len(em.lines)}", row=False)
        body = []
        for i, s in e.segments.items():
            body += [f"    c{i} = acc{s}", "    if HAS_BIAS:",
                     f"        c{i} += tl.load(bias_ptr + OFF{s} + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]",
                     f"    c{i} = c{i}.to({self.ldt})"]
        body += [f"    c{i} = tl.load(e{i} + rows * se{i}_m + ncols * se{i}_n, mask=ymask, other=0.0)" for i in e.extra]
        body += em.lines   # pointwise nodes only: no column or mask terms
        body += [f"    tl.store(out{j} + rows * so{j}_m + ncols * so{j}_n, {em.names[o]}, mask=ymask)"
                 for j, o in enumerate(outputs)]
        return body

    def _segments(self) -> int:
        if isinstance(self.epilogue, QKVEpilogue):
            return 2   # the head's rows, and the same rows rotated by half a head (rotate_half)
        return len(self.epilogue.offsets) if self.epilogue else 1

    def qkv_body(self) -> list[str]:
        """One program = one head (BLOCK_N = head dim): q heads get the q group's rotary and
        are stored token-major, k heads the k group's rotary and go to the K pool, v heads go
        to the V pool, at each token's slot (slot < 0: not stored)."""
        e = self.epilogue
        body = ["    d = tl.arange(0, BLOCK_N)[None, :]",
                "    y = acc0", "    yr = acc1",
                "    if HAS_BIAS:",
                "        y += tl.load(bias_ptr + cn).to(tl.float32)[None, :]",
                "        yr += tl.load(bias_ptr + rot_rows).to(tl.float32)[None, :]",
                f"    y = y.to({self.ldt})", f"    yr = yr.to({self.ldt})",
                "    slot = tl.load(slot_ptr + rm, mask=rm < M, other=-1).to(tl.int64)[:, None]",
                "    smask = m_ok & (slot >= 0)",
                "    dst = (slot // PAGE) * pool_b + (slot % PAGE) * pool_r + d * pool_d"]
        for tag, group, extra, row_input in (("q", e.q_group, e.q_extra, e.q_row), ("k", e.k_group, e.k_extra, e.k_row)):
            placeholders, outputs = _graph_parts(group)
            em = _Emitter(group)
            em.inputs = placeholders
            lines = []
            for i, ph in enumerate(placeholders):
                name = f"{tag}x{i}"
                em.names[ph] = name
                if i == row_input:
                    lines.append(f"    {name} = y")
                else:
                    lines.append(f"    {name} = tl.load(e{tag}{i} + rows * s{tag}{i}_t + head * s{tag}{i}_h + d * s{tag}{i}_d, mask=m_ok, other=0.0)")
                    if ph.meta["val"].dtype == torch.float32:
                        em.fp32.add(name)
            for n in group.reference.graph.nodes:
                if n.op != "call_function":
                    continue
                if n.target is ROTATE_HALF:
                    name = f"{tag}r{len(em.lines)}"
                    em.lines.append(f"    {name} = (tl.where(d < BLOCK_N // 2, -1.0, 1.0) * yr.to(tl.float32)).to({TL_DTYPES[n.meta['val'].dtype]})")
                    em.names[n] = name
                else:
                    em.node(n, f"{tag}v{len(em.lines)}", row=False)
            lines += em.lines
            result = em.names[outputs[0]]
            if tag == "q":
                body.append("    if pid_n < HQ:")
                body += _indent(["    head = pid_n"] + lines, 4)
                body.append(f"        tl.store(q_out + rows * so_t + head * so_h + d * so_d, {result}, mask=m_ok)")
            else:
                body.append("    if (pid_n >= HQ) & (pid_n < HQ + HKV):")
                body += _indent(["    head = pid_n - HQ"] + lines, 4)
                body.append(f"        tl.store(k_pool + dst + head * pool_h, {result}.to(k_pool.dtype.element_ty), mask=smask)")
        body += ["    if pid_n >= HQ + HKV:",
                 "        tl.store(v_pool + dst + (pid_n - HQ - HKV) * pool_h, y.to(v_pool.dtype.element_ty), mask=smask)"]
        return body

    def build(self) -> str:
        S = self._segments()
        qkv = isinstance(self.epilogue, QKVEpilogue)
        what = []   # no group names: layers with the same code share the kernel
        if self.prologue:
            what.append(f"a prologue of {len(self.prologue.group_inputs)} input(s)")
        if isinstance(self.epilogue, QKVEpilogue):
            what.append("a q/k/v epilogue (rotary on q and k, paged KV write)")
        elif self.epilogue:
            what.append(f"an epilogue over {S} segment(s) of W")
        lines = ["import triton", "import triton.language as tl", "", "", "@triton.jit", *self.signature(),
                 f'    """Skinny GEMM with {" and ".join(what)}, generated from their graph nodes."""',
                 "    if USE_GDC:", "        tl.extra.cuda.gdc_wait()", "        tl.extra.cuda.gdc_launch_dependents()",
                 "    pid_n = tl.program_id(0)", "    pid_k = tl.program_id(1)",
                 "    rm = tl.arange(0, BLOCK_M)", "    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
                 "    rk = tl.arange(0, BLOCK_K)", "    rows = rm[:, None]",
                 "    k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K", "    k_begin = pid_k * k_chunk",
                 "    m_ok = rm[:, None] < M", "    n_ok = rn[:, None] < N"]
        if self.prologue:
            lines += self.prologue_phase1()
            tile, x_name = self.prologue_tile()
        else:
            tile = ["    a = tl.load(x_ptr + rows * stride_xm + cols * stride_xk, mask=m_ok & (cols < K), other=0.0)"]
            x_name = "a"
        lines += [f"    acc{s} = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)" for s in range(S)]
        # one row (fma): products accumulate elementwise, summed over K once, after the loop
        lines += [f"    accw{s} = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)" for s in range(S)]
        if qkv:   # the head's rows rotated by half a head; v heads need none (masked off)
            lines += ["    rot_rows = pid_n * BLOCK_N + (tl.arange(0, BLOCK_N) + BLOCK_N // 2) % BLOCK_N",
                      "    rot_ok = n_ok & (rn[:, None] < (HQ + HKV) * BLOCK_N)"]
        lines += ["    for k in range(k_begin, k_begin + k_chunk, BLOCK_K):", "        cols = k + rk[None, :]"]
        lines += _indent(tile, 4)
        lines.append(f"        xt = {x_name}.to({self.ldt})")
        for s in range(S):
            rows_expr = "rot_rows[:, None]" if qkv and s == 1 else f"(OFF{s} + rn[:, None])"
            ok = "rot_ok" if qkv and s == 1 else "n_ok"
            lines += [f"        b = tl.load(w_ptr + {rows_expr} * stride_wn + cols * stride_wk, "
                      f"mask={ok} & (cols < K), other=0.0)",
                      "        if USE_DOT:",
                      "            if xt.dtype == tl.float32:",
                      f"                acc{s} = tl.dot(xt, tl.trans(b), acc{s}, input_precision=\"ieee\")",
                      "            else:",
                      f"                acc{s} = tl.dot(xt, tl.trans(b), acc{s})",
                      "        elif BLOCK_M == 1:",
                      f"            accw{s} += xt.to(tl.float32) * b.to(tl.float32)",
                      "        else:",
                      f"            acc{s} += tl.sum(xt.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)"]
        lines.append("    if not USE_DOT and BLOCK_M == 1:")
        lines += [f"        acc{s} = tl.sum(accw{s}, axis=1)[None, :]" for s in range(S)]
        area = "BLOCK_M * BLOCK_N"
        lines += ["    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)", "    ncols = cn[None, :]",
                  "    ymask = m_ok & (ncols < N)",
                  "    if SPLIT_K > 1:",
                  f"        tile = part_ptr + pid_n * (SPLIT_K * {S} * {area}) + rows * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]"]
        lines += [f"        tl.store(tile + (pid_k * {S} + {s}) * ({area}), acc{s})" for s in range(S)]
        lines += ["        tl.debug_barrier()", "        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem=\"acq_rel\")",
                  "        last = ticket == SPLIT_K - 1", "        if last:"]
        for s in range(S):
            lines += [f"            acc{s} = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
                      "            for p in tl.static_range(SPLIT_K):",
                      f"                acc{s} += tl.load(tile + (p * {S} + {s}) * ({area}), cache_modifier=\".cg\")"]
        lines += ["            tl.atomic_xchg(count_ptr + pid_n, 0)", "    else:", "        last = True", "    if last:"]
        if qkv:
            lines += _indent(self.qkv_body(), 4)
        elif self.epilogue:
            lines += _indent(self.epilogue_body(), 4)
        else:
            lines += _indent(["    out = acc0",
                              "    if HAS_BIAS:",
                              "        out += tl.load(bias_ptr + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]",
                              "    tl.store(y_ptr + rows * stride_ym + ncols, out.to(y_ptr.dtype.element_ty), mask=ymask)"], 4)
        return "\n".join(lines) + "\n"


class Prologue:
    """A row group whose output ``x_output`` is the linear's input."""

    def __init__(self, group: FusedGroup, x_output: int):
        self.group, self.x_output = group, x_output
        placeholders, outputs = _graph_parts(group)
        self.group_inputs = placeholders
        self.side_outputs = [j for j in range(len(outputs)) if j != x_output]
        self.side_dtypes = [outputs[j].meta["val"].dtype for j in self.side_outputs]
        nodes = [n for n in group.reference.graph.nodes if n.op == "call_function"]
        self.reductions = [n for n in nodes if n.target in REDUCTIONS]
        pre: set = set()
        stack = [a for r in self.reductions for a in r.all_input_nodes]
        while stack:
            n = stack.pop()
            if n.op == "call_function" and n not in pre:
                pre.add(n)
                stack.extend(n.all_input_nodes)
        self.pre_nodes = [n for n in nodes if n in pre]


class Epilogue:
    """A pointwise group fed by segments of the linear's output."""

    def __init__(self, group: FusedGroup, segments: dict[int, int], offsets: list[int], inputs: list):
        self.group = group
        self.segments = segments          # group input index -> segment number
        self.offsets = offsets            # segment number -> first row of W
        self.inputs = inputs              # group input index -> ("seg", s) or ("arg", position in extra)
        self.extra = [i for i in range(len(inputs)) if i not in segments]
        self.N = group.frame[1]
        self.out_dtypes = [o.meta["val"].dtype for o in _graph_parts(group)[1]]


class QKVEpilogue:
    """The fused q/k/v projection's consumers: rotary groups on the q and k heads, and the
    paged KV write of the rotated k and of v."""

    def __init__(self, q_group: FusedGroup, k_group: FusedGroup, sizes: list[int], head_dim: int,
                 q_row: int, k_row: int):
        self.q_group, self.k_group = q_group, k_group
        self.sizes, self.D = sizes, head_dim
        self.q_row, self.k_row = q_row, k_row        # which group input is the projection's heads
        self.q_extra = [i for i in range(len(_graph_parts(q_group)[0])) if i != q_row]
        self.k_extra = [i for i in range(len(_graph_parts(k_group)[0])) if i != k_row]
        self.HQ, self.HKV = sizes[0] // head_dim, sizes[1] // head_dim


class FusedGemm:
    """The call that replaces [prologue group] + linear (+ split) + [epilogue group]:
    ``(*prologue inputs | x, weight, bias, *epilogue extra inputs)`` -> (epilogue outputs or
    the linear's output, then the prologue's other outputs)."""

    def __init__(self, name: str, linear_dtype, prologue: Prologue | None, epilogue):
        self.__name__ = name
        self.prologue, self.epilogue = prologue, epilogue
        kernel, self.source = cache.name_by_content(
            _Source(cache.PLACEHOLDER, linear_dtype, prologue, epilogue).build(), "gemm")
        self.kernel = getattr(cache.load(self.source), kernel)
        self.kind = self.source   # the same code at every layer: one compile, one measurement
        self.choice: dict[int, object] = {}   # M -> GemmConfig or None (unfused), from measure_fused

    def _split(self, args):
        n_in = len(self.prologue.group_inputs) if self.prologue else 1
        return list(args[:n_in]), args[n_in], args[n_in + 1], list(args[n_in + 2:])

    def _qkv_reference(self, y, extra):
        e = self.epilogue
        q_args, k_args = extra[:len(e.q_extra)], extra[len(e.q_extra):len(e.q_extra) + len(e.k_extra)]
        kv_pool, layer, slots = extra[-3:]
        q, k, v = (t.unflatten(-1, (-1, e.D)).transpose(1, 2) for t in y.split(e.sizes, -1))

        def run(group, row, heads, rest):
            args, it = [], iter(rest)
            for i in range(len(_graph_parts(group)[0])):
                args.append(heads if i == row else next(it))
            return group(*args)[0]

        q_rot = run(e.q_group, e.q_row, q, q_args)
        k_rot = run(e.k_group, e.k_row, k, k_args)
        torch.ops.fusegen.paged_kv_write(kv_pool, layer, k_rot, v, slots)
        return q_rot

    def reference(self, *args):
        ins, weight, bias, extra = self._split(args)
        side = ()
        if self.prologue:
            outs = self.prologue.group(*ins)
            x = outs[self.prologue.x_output]
            side = tuple(outs[j] for j in self.prologue.side_outputs)
        else:
            x = ins[0]
        y = skinny_gemm.linear(x, weight, bias)   # the template or cuBLAS, as the table chose
        if isinstance(self.epilogue, QKVEpilogue):
            return (self._qkv_reference(y, extra), *side)
        if self.epilogue is None:
            return (y, *side)
        e = self.epilogue
        group_args = [y[..., e.offsets[v]:e.offsets[v] + e.N] if kind == "seg" else extra[v] for kind, v in e.inputs]
        return (*e.group(*group_args), *side)

    def _rows(self, ins) -> tuple[tuple, int]:
        row_input = self.prologue.group.input_layouts.index("row") if self.prologue else 0
        lead = tuple(ins[row_input].shape[:-1])
        M = 1
        for d in lead:
            M *= d
        return lead, M

    def __call__(self, *args):
        ins, weight, bias, extra = self._split(args)
        lead, M = self._rows(ins)
        config = None
        if kernels_wanted(ins) and M <= (PROLOGUE_MAX_M if self.prologue else skinny_gemm.MAX_M):
            if M in self.choice:   # measured at set-up against the unfused path (measure_fused)
                config = self.choice[M]
            else:
                config = skinny_gemm.TABLE.lookup(M, weight.shape[0], weight.shape[1], weight.dtype, bias is not None)
        if config is None:
            return self.reference(*args)
        return self.fused(config, *args)

    def fused(self, config, *args):
        """The fused kernel with ``config`` (the reference where the inputs do not allow it)."""
        ins, weight, bias, extra = self._split(args)
        lead, M = self._rows(ins)
        K = weight.shape[1]
        try:
            p_views = [t.expand((*lead, K)).view(M, K) for t in ins] if self.prologue else [ins[0].reshape(M, K)]
            if isinstance(self.epilogue, QKVEpilogue):
                if len(lead) != 2 or lead[0] != 1:
                    return self.reference(*args)
                return self.launch_qkv(p_views, weight, bias, extra, config, M, lead)
            e_views = [t.expand((*lead, self.epilogue.N)).view(M, self.epilogue.N) for t in extra] \
                if self.epilogue else []
        except RuntimeError:   # a broadcast that is not one [M, columns] stride pattern
            return self.reference(*args)
        return self.launch(p_views, weight, bias, e_views, config, M, lead)

    def launch_qkv(self, p_views, weight, bias, extra, config, M, lead):
        e = self.epilogue
        K, D = weight.shape[1], e.D
        device = weight.device
        kv_pool, layer, slots = extra[-3:]
        frames = [(1, e.HQ, M, D)] * len(e.q_extra) + [(1, e.HKV, M, D)] * len(e.k_extra)
        views = [t.expand(f) for t, f in zip(extra[:-3], frames)]
        q_dtype = _graph_parts(e.q_group)[1][0].meta["val"].dtype
        q_out = torch.empty((1, M, e.HQ, D), dtype=q_dtype, device=device).transpose(1, 2)
        side = [torch.empty((M, K), dtype=dt, device=device) for dt in self.prologue.side_dtypes] \
            if self.prologue else []
        heads = e.HQ + 2 * e.HKV
        bm = config.block_m(M)
        block_k = config.block_k
        while not config.dot and bm * D * block_k > 32768 and block_k > 16:
            block_k //= 2   # the fma product tile [BLOCK_M, head dim, BLOCK_K] stays in registers
        split = 1   # about the grid the table's configuration had
        grid = triton.cdiv(weight.shape[0], config.block_n) * config.split_k
        while heads * split * 2 <= grid and split * 2 * block_k <= K // 2:
            split *= 2
        part, count = skinny_gemm.WORKSPACE.get(device, heads * split * 2 * bm * D, heads) \
            if split > 1 else (q_out, q_out)
        pool_k, pool_v = kv_pool[layer, 0], kv_pool[layer, 1]
        ptrs = [*p_views, *side] if self.prologue else [p_views[0]]
        ptrs += [weight, bias if bias is not None else weight, *views, q_out, pool_k, pool_v, slots]
        strides = [s for v in p_views for s in v.stride()] + [s for v in side for s in v.stride()]
        strides += [weight.stride(0), weight.stride(1)]
        strides = strides[-2:] + strides[:-2]   # stride_wn, stride_wk come first
        strides += [s for v in views for s in (v.stride(2), v.stride(1), v.stride(3))]
        strides += [q_out.stride(2), q_out.stride(1), q_out.stride(3), *pool_k.stride(), e.HQ, e.HKV]
        self.kernel[(heads, split)](
            *ptrs, part, count, M, K, *strides, PAGE=kv_pool.shape[3],
            N=weight.shape[0], OFF0=0, OFF1=0, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=D,
            BLOCK_K=block_k, SPLIT_K=split, USE_DOT=config.dot, EVEN_K=K % (split * block_k) == 0,
            num_warps=config.warps, num_stages=config.stages, **pdl(weight))
        return (q_out, *(s.view(*lead, K) for s in side))

    def launch(self, p_views, weight, bias, e_views, config, M, lead):
        K = weight.shape[1]
        device = weight.device
        S = len(self.epilogue.offsets) if self.epilogue else 1
        N = self.epilogue.N if self.epilogue else weight.shape[0]
        x_like = p_views[0]
        if self.epilogue:
            outs = [torch.empty((M, N), dtype=dt, device=device) for dt in self.epilogue.out_dtypes]
        else:
            outs = [torch.empty((M, N), dtype=x_like.dtype, device=device)]
        side = [torch.empty((M, K), dtype=dt, device=device) for dt in self.prologue.side_dtypes] \
            if self.prologue else []
        bm = config.block_m(M)
        tiles = triton.cdiv(N, config.block_n)
        part, count = skinny_gemm.WORKSPACE.get(device, tiles * config.split_k * S * bm * config.block_n, tiles) \
            if config.split_k > 1 else (outs[0], outs[0])
        ptrs = [*p_views, *side] if self.prologue else [x_like]
        ptrs += [weight, bias if bias is not None else weight]
        ptrs += [*e_views, *outs] if self.epilogue else outs
        strides = [s for v in p_views for s in v.stride()] + [s for v in side for s in v.stride()] \
            if self.prologue else list(x_like.stride())
        strides += [s for v in e_views for s in v.stride()] + [s for o in outs for s in o.stride()] \
            if self.epilogue else [outs[0].stride(0)]
        offsets = {f"OFF{s}": off for s, off in enumerate(self.epilogue.offsets)} if self.epilogue else {"OFF0": 0}
        self.kernel[(tiles, config.split_k)](
            *ptrs, part, count, M, K, weight.stride(0), weight.stride(1), *strides,
            N=N, **offsets, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, SPLIT_K=config.split_k, USE_DOT=config.dot,
            EVEN_K=K % (config.split_k * config.block_k) == 0,
            num_warps=config.warps, num_stages=config.stages, **pdl(weight))
        first = [o.view(*lead, N) for o in outs]
        return (*first, *(s.view(*lead, K) for s in side))


# --- matching -------------------------------------------------------------------------------

def _group(gm, node):
    if node is None or node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, FusedGroup) else None


def _match_epilogue(gm: fx.GraphModule, linear: fx.Node):
    """(epilogue call, split or None, {input index: column offset}) when every use of the
    linear's output is one pointwise group's "row" inputs of the segment width."""
    users = list(linear.users)
    split = None
    if len(users) == 1 and users[0].target is aten.split_with_sizes.default \
            and users[0].args[2] in (-1, linear.meta["val"].dim() - 1):
        split = users[0]
        getitems = list(split.users)
        if not all(g.target is operator.getitem for g in getitems):
            return None
        consumers = {u for g in getitems for u in g.users}
    else:
        getitems = [linear]
        consumers = set(users)
    if len(consumers) != 1:
        return None
    (call,) = consumers
    group = _group(gm, call)
    if group is None or group.schedule != "pointwise" or any(k != "row" for k in group.output_layouts) \
            or any(n.target is ROTATE_HALF for n in group.reference.graph.nodes):
        return None
    N = group.frame[1]
    segs = {}
    for i, a in enumerate(call.args):
        if a in getitems:
            if split is None:
                offset, width = 0, linear.meta["val"].shape[-1]
            else:
                sizes = list(split.args[1])
                offset, width = sum(sizes[:a.args[1]]), sizes[a.args[1]]
            if width != N or group.input_layouts[i] != "row":
                return None
            segs[i] = offset
    if not all(any(a is g for a in call.args) for g in getitems):
        return None
    return call, split, segs


def _heads_of(getitem: fx.Node):
    """getitem -> view [B, T, -1, D] -> transpose(1, 2): (the transpose, D), else None."""
    if len(getitem.users) != 1:
        return None
    (view,) = getitem.users
    if view.target not in (aten.view.default, aten.reshape.default) or len(view.users) != 1:
        return None
    shape = view.args[1]
    (tr,) = view.users
    if len(shape) != 4 or not isinstance(shape[-1], int) or tr.target is not aten.transpose.int \
            or tuple(tr.args[1:]) != (1, 2):
        return None
    return tr, shape[-1]


def _rotary_group(gm, heads: fx.Node):
    """The pointwise group with rotate_half that is the only user of ``heads``, and the
    index of ``heads`` among its inputs."""
    if len(heads.users) != 1:
        return None
    (call,) = heads.users
    group = _group(gm, call)
    if group is None or group.schedule != "pointwise" or len(group.output_layouts) != 1 \
            or not any(n.target is ROTATE_HALF for n in group.reference.graph.nodes) \
            or list(call.args).count(heads) != 1:
        return None
    return call, list(call.args).index(heads)


def _match_qkv(gm: fx.GraphModule, linear: fx.Node, index: dict):
    """(q call, k call, kv write, sizes, D, q row, k row) for linear -> split(q, k, v) ->
    heads -> rotary on q and k -> paged_kv_write(k, v), else None."""
    users = list(linear.users)
    if len(users) != 1 or users[0].target is not aten.split_with_sizes.default or len(users[0].args[1]) != 3:
        return None
    split = users[0]
    items = sorted(split.users, key=lambda g: g.args[1])
    if len(items) != 3 or any(g.target is not operator.getitem for g in items):
        return None
    heads = [_heads_of(g) for g in items]
    if any(h is None for h in heads) or len({d for _, d in heads}) != 1:
        return None
    D = heads[0][1]
    sizes = list(split.args[1])
    if D & (D - 1) or D < 16 or any(n % D for n in sizes) or sizes[1] != sizes[2]:
        return None
    q, k = _rotary_group(gm, heads[0][0]), _rotary_group(gm, heads[1][0])
    v_heads = heads[2][0]
    if q is None or k is None or len(v_heads.users) != 1:
        return None
    (write,) = v_heads.users
    k_items = list(k[0].users)
    if write.target is not torch.ops.fusegen.paged_kv_write.default or len(k_items) != 1 \
            or set(k_items[0].users) != {write} or write.args[2] is not k_items[0] or write.args[3] is not v_heads:
        return None
    if len(write.args) > 5 and write.args[5] is not None:   # an fp8 pool's write quantises: its own kernel
        return None
    if any(index[u] <= index[write] for g in q[0].users for u in g.users):
        return None
    return q[0], k[0], write, sizes, D, q[1], k[1]


def _match_prologue(gm: fx.GraphModule, linear: fx.Node, index: dict, anchor: fx.Node):
    """(prologue call, getitem of x, output index) when the linear's input is an output of a
    row group used only by this linear, and the group's other outputs are used only after
    ``anchor`` (where the fused call goes)."""
    x = linear.args[0]
    if not (isinstance(x, fx.Node) and x.target is operator.getitem and set(x.users) == {linear}):
        return None
    call = x.args[0]
    group = _group(gm, call)
    if group is None or group.schedule != "row" or any(k != "row" for k in group.output_layouts) \
            or any(n.target is ROTATE_HALF for n in group.reference.graph.nodes) \
            or group.frame[1] != x.meta["val"].shape[-1]:
        return None
    reductions = [n for n in group.reference.graph.nodes if n.target in REDUCTIONS]
    # one level of reductions: no reduction feeds another (RMSNorm yes, LayerNorm's variance no)
    for r in reductions:
        stack, seen = list(r.all_input_nodes), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.target in REDUCTIONS:
                return None
            stack.extend(n.all_input_nodes)
    if not reductions:
        return None
    for g in call.users:
        if g is x:
            continue
        if g.target is not operator.getitem or any(index[u] <= index[anchor] for u in g.users):
            return None
    return call, x, x.args[1]


def fuse_gemms(gm: fx.GraphModule, prologues: bool = True, rotary: bool = True) -> Counter:
    """Rewrite ``gm`` (a routed step graph) in place; counters of what was fused."""
    stats: Counter = Counter()
    if any("val" not in n.meta for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS):
        # The matching below reads shape values: compiled graphs carry them from capture,
        # loaded ones from fusegen/artifact/shapes.py; a graph without them runs unfused.
        logging.getLogger("fusegen.gemm").warning("GEMM fusion skipped: the graph's linears carry no "
                                                  "shape values (node.meta['val'])")
        stats["skipped_no_shapes"] = 1
        return stats
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    for linear in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS]:
        weight = linear.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        bias = linear.args[2] if len(linear.args) > 2 else None
        qkv = _match_qkv(gm, linear, index) if rotary else None
        ep = _match_epilogue(gm, linear) if qkv is None else None
        anchor = qkv[2] if qkv is not None else ep[0] if ep is not None else linear
        pro = _match_prologue(gm, linear, index, anchor) if prologues else None
        if ep is None and pro is None and qkv is None:
            stats["linears_unfused"] += 1
            continue
        prologue = epilogue = None
        extra_args = []
        if qkv is not None:
            q_call, k_call, write, sizes, D, q_row, k_row = qkv
            epilogue = QKVEpilogue(_group(gm, q_call), _group(gm, k_call), sizes, D, q_row, k_row)
            extra_args = [a for i, a in enumerate(q_call.args) if i != q_row]
            extra_args += [a for i, a in enumerate(k_call.args) if i != k_row]
            extra_args += [write.args[0], write.args[1], write.args[4]]
        if ep is not None:
            e_call, split, segs = ep
            group = _group(gm, e_call)
            offsets = sorted(set(segs.values()))
            segments = {i: offsets.index(off) for i, off in segs.items()}
            extra_args = [a for i, a in enumerate(e_call.args) if i not in segs]
            inputs = [("seg", segments[i]) if i in segs else ("arg", extra_args.index(a))
                      for i, a in enumerate(e_call.args)]
            epilogue = Epilogue(group, segments, offsets, inputs)
        if pro is not None:
            p_call, x_item, x_output = pro
            prologue = Prologue(_group(gm, p_call), x_output)
            head_args = list(p_call.args)
        else:
            head_args = [linear.args[0]]
        name = "gemm_" + "_".join(str(c.target) for c in ([pro[0]] if pro else []) + ([ep[0]] if ep else [])
                                  + (list(qkv[:2]) if qkv else [])) + f"_{index[linear]}"
        fused = FusedGemm(name, linear.meta["val"].dtype, prologue, epilogue)
        with gm.graph.inserting_before(anchor):
            call = gm.graph.call_function(fused, (*head_args, weight, bias, *extra_args))
        n_first = len(epilogue.out_dtypes) if isinstance(epilogue, Epilogue) else 1
        # the epilogue's (or the linear's) outputs first, then the prologue's other outputs
        with gm.graph.inserting_after(call):
            if qkv is not None:
                q_call, k_call, write = qkv[:3]
                for g in reversed(list(q_call.users)):
                    g.args = (call, 0)
                    call.append(g)
                split = next(iter(linear.users))
                gm.graph.erase_node(write)
                for node in [*k_call.users, k_call, q_call]:
                    gm.graph.erase_node(node)
                for g in sorted(split.users, key=lambda g: -g.args[1]):
                    view = next(iter(g.users))
                    tr = next(iter(view.users))
                    for node in (tr, view, g):
                        gm.graph.erase_node(node)
                gm.graph.erase_node(split)
            elif ep is not None:
                for g in list(ep[0].users):
                    g.args = (call, g.args[1])
                gm.graph.erase_node(ep[0])
                if ep[1] is not None:
                    for g in list(ep[1].users):
                        gm.graph.erase_node(g)
                    gm.graph.erase_node(ep[1])
            else:
                item = gm.graph.call_function(operator.getitem, (call, 0))
                item.meta["val"] = linear.meta["val"]
                linear.replace_all_uses_with(item)
        gm.graph.erase_node(linear)
        if pro is not None:
            p_call, x_item, x_output = pro
            gm.graph.erase_node(x_item)
            for g in reversed(list(p_call.users)):
                g.args = (call, n_first + prologue.side_outputs.index(g.args[1]))
                call.append(g)   # the side output's getitem moves after the fused call
            gm.graph.erase_node(p_call)
            stats["gemm_prologues"] += 1
        if qkv is not None:
            stats["gemm_qkv_epilogues"] += 1
        if ep is not None:
            stats["gemm_epilogues"] += 1
            stats[f"gemm_epilogue_segments_{len(epilogue.offsets)}"] += 1
        index = {n: i for i, n in enumerate(gm.graph.nodes)}
    gm.graph.lint()
    gm.recompile()
    return stats


def _packed_sizes(gm: fx.GraphModule, M: int) -> dict:
    """Values for the graph's symbolic sizes when the runtime packs M tokens as one row:
    the batch symbol (input_ids' dim 0) is 1 and the sequence symbol (dim 1) is M."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 2:
            subs = {}
            for d, value in zip(n.meta["val"].shape, (1, M)):
                if isinstance(d, torch.SymInt):
                    subs.update({sym: value for sym in d.node.expr.free_symbols})
            return subs
    return {}


def _concrete(d, subs: dict, M: int) -> int:
    if isinstance(d, int):
        return d
    expr = d.node.expr.subs(subs)
    return int(expr) if expr.is_number else M


def _sample(node: fx.Node, gm: fx.GraphModule, M: int, device, kv_pool, gen):
    """Arguments of a fused call at M tokens: graph weights as they are, the KV pool given,
    distinct random slots, random activations of the recorded shapes with the tokens packed
    as the runtime packs them (batch 1, sequence M)."""
    subs = _packed_sizes(gm, M)
    args = []
    for a in node.args:
        if not isinstance(a, fx.Node):
            args.append(a)
        elif a.op == "get_attr":
            t = gm
            for part in a.target.split("."):
                t = getattr(t, part)
            args.append(t)
        elif a.op == "placeholder" and a.target == "kv_pool":
            args.append(kv_pool)
        elif a.op == "placeholder" and a.target == "slot_mapping":
            slots = kv_pool.shape[2] * kv_pool.shape[3]
            args.append(torch.randperm(slots, device=device, generator=gen)[:M].to(torch.int32))
        else:
            v = a.meta["val"]
            shape = [_concrete(d, subs, M) for d in v.shape]
            args.append(torch.randn(shape, device=device, dtype=v.dtype, generator=gen))
    return args


def measure_fused(gm: fx.GraphModule, ms, device, kv_pool, margin: float = 0.97) -> list[dict]:
    """For every kind of fused call in ``gm`` and every M in ``ms``: the fused kernel with
    the template's best configuration for its linear, against the unfused path (groups'
    kernels and the linear the table chose), both replayed from one CUDA graph over weight
    copies larger than the L2. Each call then runs whichever was faster (``choice``)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(1)
    sites = [n for n in gm.graph.nodes if isinstance(n.target, FusedGemm)]
    done: dict = {}
    rows = []
    for node in sites:
        fused = node.target
        for M in ms:
            key = (fused.kind, M)
            if key in done:
                fused.choice[M] = done[key]
                continue
            limit = PROLOGUE_MAX_M if fused.prologue else skinny_gemm.MAX_M
            args = _sample(node, gm, M, device, kv_pool, gen)
            ins, weight, bias, _ = fused._split(args)
            best = skinny_gemm.TABLE.best_template(M, weight.shape[0], weight.shape[1], weight.dtype, bias is not None)
            if best is None or M > limit:
                done[key] = fused.choice[M] = None
                continue
            w_at = len(ins)
            copies = max(1, min(32, -(-skinny_gemm.L2_FLUSH_BYTES // (weight.numel() * weight.element_size()))))
            weights = [weight] + [weight.clone() for _ in range(copies - 1)]
            with_w = [args[:w_at] + [w] + args[w_at + 1:] for w in weights]
            unfused = skinny_gemm._time_us([lambda a=a: fused.reference(*a) for a in with_w])
            try:
                fast = skinny_gemm._time_us([lambda a=a: fused.fused(best, *a) for a in with_w])
            except (triton.CompilationError, OutOfResources) as exc:   # the tile does not build with this group
                logging.getLogger("fusegen.gemm").warning(
                    "%s at M=%d with %s does not build (%s: %s); it runs unfused",
                    fused.__name__, M, best, type(exc).__name__, str(exc).splitlines()[-1][:200])
                fast = float("inf")
            done[key] = fused.choice[M] = best if fast < margin * unfused else None
            rows.append({"call": fused.__name__, "M": M, "fused_us": fast, "unfused_us": unfused,
                         "config": str(best), "chosen": "fused" if fused.choice[M] else "unfused"})
            del weights, with_w
    return rows
