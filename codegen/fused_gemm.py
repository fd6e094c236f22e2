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

``fuse_gemms`` rewrites a routed step graph (``skinny_gemm.route_linears``) at engine set-up,
where the GEMM table is measured. A call runs the fused kernel when the table chose the
template for its (M, S*N, K) (and, with a prologue, M <= PROLOGUE_MAX_M, where rereading the
rows per program stays cheaper than the group's own launch); otherwise it computes what the
graph did: the prologue group's kernel, the linear (template or cuBLAS, as the table
chose), the epilogue group's kernel. Off CUDA the
reference runs, unless $FUSEGEN_KERNELS=1 asks for the kernels in Triton's interpreter.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import triton
from torch import fx

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
        if self.epilogue:
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
        if self.epilogue:
            args += [f"se{i}_m, se{i}_n" for i in self.epilogue.extra]
            args += [f"so{j}_m, so{j}_n" for j in range(len(self.epilogue.out_dtypes))]
        else:
            args += ["stride_ym"]
        S = len(self.epilogue.offsets) if self.epilogue else 1
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

    def build(self) -> str:
        S = len(self.epilogue.offsets) if self.epilogue else 1
        what = []
        if self.prologue:
            what.append(f"prologue {self.prologue.group.name}")
        if self.epilogue:
            what.append(f"epilogue {self.epilogue.group.name} over {S} segment(s) of W")
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
        lines += ["    for k in range(k_begin, k_begin + k_chunk, BLOCK_K):", "        cols = k + rk[None, :]"]
        lines += _indent(tile, 4)
        lines.append(f"        xt = {x_name}.to({self.ldt})")
        for s in range(S):
            lines += [f"        b = tl.load(w_ptr + (OFF{s} + rn[:, None]) * stride_wn + cols * stride_wk, "
                      "mask=n_ok & (cols < K), other=0.0)",
                      "        if USE_DOT:",
                      "            if xt.dtype == tl.float32:",
                      f"                acc{s} = tl.dot(xt, tl.trans(b), acc{s}, input_precision=\"ieee\")",
                      "            else:",
                      f"                acc{s} = tl.dot(xt, tl.trans(b), acc{s})",
                      "        else:",
                      f"            acc{s} += tl.sum(xt.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)"]
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
        if self.epilogue:
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


class FusedGemm:
    """The call that replaces [prologue group] + linear (+ split) + [epilogue group]:
    ``(*prologue inputs | x, weight, bias, *epilogue extra inputs)`` -> (epilogue outputs or
    the linear's output, then the prologue's other outputs)."""

    def __init__(self, name: str, linear_dtype, prologue: Prologue | None, epilogue: Epilogue | None):
        self.__name__ = name
        self.prologue, self.epilogue = prologue, epilogue
        self.source = _Source(f"_{name}_kernel", linear_dtype, prologue, epilogue).build()
        self.kernel = getattr(cache.load(self.source), f"_{name}_kernel")

    def _split(self, args):
        n_in = len(self.prologue.group_inputs) if self.prologue else 1
        return list(args[:n_in]), args[n_in], args[n_in + 1], list(args[n_in + 2:])

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
        if self.epilogue is None:
            return (y, *side)
        e = self.epilogue
        group_args = [y[..., e.offsets[v]:e.offsets[v] + e.N] if kind == "seg" else extra[v] for kind, v in e.inputs]
        return (*e.group(*group_args), *side)

    def __call__(self, *args):
        ins, weight, bias, extra = self._split(args)
        row_input = self.prologue.group.input_layouts.index("row") if self.prologue else 0
        lead = ins[row_input].shape[:-1]
        K = weight.shape[1]
        M = 1
        for d in lead:
            M *= d
        config = None
        if kernels_wanted(ins) and M <= (PROLOGUE_MAX_M if self.prologue else skinny_gemm.MAX_M):
            config = skinny_gemm.TABLE.lookup(M, weight.shape[0], K, weight.dtype, bias is not None)
        if config is None:
            return self.reference(*args)
        try:
            p_views = [t.expand((*lead, K)).view(M, K) for t in ins]
            e_views = [t.expand((*lead, self.epilogue.N)).view(M, self.epilogue.N) for t in extra] \
                if self.epilogue else []
        except RuntimeError:   # a broadcast that is not one [M, columns] stride pattern
            return self.reference(*args)
        return self.launch(p_views, weight, bias, e_views, config, M, tuple(lead))

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


def fuse_gemms(gm: fx.GraphModule, prologues: bool = True) -> Counter:
    """Rewrite ``gm`` (a routed step graph) in place; counters of what was fused."""
    stats: Counter = Counter()
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    for linear in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS]:
        weight = linear.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        bias = linear.args[2] if len(linear.args) > 2 else None
        ep = _match_epilogue(gm, linear)
        anchor = ep[0] if ep is not None else linear
        pro = _match_prologue(gm, linear, index, anchor) if prologues else None
        if ep is None and pro is None:
            stats["linears_unfused"] += 1
            continue
        prologue = epilogue = None
        extra_args = []
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
        name = "gemm_" + "_".join(str(c.target) for c in
                                  ([pro[0]] if pro else []) + ([ep[0]] if ep else [])) + f"_{index[linear]}"
        fused = FusedGemm(name, linear.meta["val"].dtype, prologue, epilogue)
        with gm.graph.inserting_before(anchor):
            call = gm.graph.call_function(fused, (*head_args, weight, bias, *extra_args))
        n_first = len(epilogue.out_dtypes) if epilogue else 1
        # the epilogue's (or the linear's) outputs first, then the prologue's other outputs
        with gm.graph.inserting_after(call):
            if ep is not None:
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
        if ep is not None:
            stats["gemm_epilogues"] += 1
            stats[f"gemm_epilogue_segments_{len(epilogue.offsets)}"] += 1
        index = {n: i for i, n in enumerate(gm.graph.nodes)}
    gm.graph.lint()
    gm.recompile()
    return stats
