"""Pointwise groups fused into the skinny GEMM that feeds them, as its epilogue.

    y = linear(x, W)                       # [M, S*N] (q/k/v or gate/up fused by fuse_projections)
    a, b = split_with_sizes(y, [N, N])     # or y itself when S = 1
    out = fused_k(a, b, extra...)          # a pointwise FusedGroup (silu(a) * b, ...)
 -> out = GemmEpilogue(x, W, bias, extra...)

The generated kernel is the skinny-GEMM template (codegen/skinny_gemm.py) with one fp32
accumulator per segment of W feeding the group: a program reads its BLOCK_N rows of each
segment, and where the tile is final (no split-K, or the last split's reduction) the
accumulators are rounded to the linear's dtype, as the linear's own output would be, and
the group's nodes run on them in registers (the same emitter as the group's own kernel).
The [M, S*N] product is never written.

``fuse_epilogues`` rewrites a routed step graph (``skinny_gemm.route_linears``) at engine
set-up, where the GEMM table is measured: a call runs the fused kernel when the table chose
the template for its (M, S*N, K); otherwise (more than 64 rows, cuBLAS won, an extra input
whose broadcast cannot be read as [M, N]) it computes what the graph did, F.linear and then
the group's own kernel. Off CUDA the reference runs, unless $FUSEGEN_KERNELS=1 asks for
the kernels in Triton's interpreter (tests).
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import triton
from torch import fx

from fusegen.codegen import cache
from fusegen.codegen import skinny_gemm
from fusegen.codegen.launch import pdl
from fusegen.codegen.pointwise import TL_DTYPES, _Emitter
from fusegen.fused_group import FusedGroup, kernels_wanted

aten = torch.ops.aten
LINEARS = (aten.linear.default, skinny_gemm.linear)


def generate_source(group: FusedGroup, segments: dict[int, int], linear_dtype: torch.dtype,
                    kernel: str) -> str:
    """The Triton kernel for ``group`` with its inputs ``segments`` (input index -> segment
    number, in W's row order) taken from the accumulators."""
    graph = group.reference.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = list(next(n for n in graph.nodes if n.op == "output").args[0])
    extra = [i for i in range(len(placeholders)) if i not in segments]
    S = len(set(segments.values()))
    em = _Emitter(group)
    em.inputs = placeholders
    ldt = TL_DTYPES[linear_dtype]
    for i, ph in enumerate(placeholders):
        em.names[ph] = f"a{i}"
        if i not in segments and ph.meta["val"].dtype == torch.float32:
            em.fp32.add(f"a{i}")
    for n in graph.nodes:
        if n.op == "call_function":
            em.node(n, f"v{len(em.lines)}", row=False)
    ext = "".join(f", e{i}" for i in extra)
    outs = "".join(f", out{j}" for j in range(len(outputs)))
    strides = "".join(f", se{i}_m, se{i}_n" for i in extra) + "".join(f", so{j}_m, so{j}_n" for j in range(len(outputs)))
    segs = "".join(f", OFF{s}: tl.constexpr" for s in range(S))
    ops = ", ".join(str(n.target).replace("aten.", "") for n in graph.nodes if n.op == "call_function")
    lines = [
        "import triton", "import triton.language as tl", "", "",
        "@triton.jit",
        f"def {kernel}(x_ptr, w_ptr, bias_ptr{ext}{outs}, part_ptr, count_ptr, M, K, stride_xm, stride_xk,",
        f"        stride_wn, stride_wk{strides}, N: tl.constexpr{segs}, HAS_BIAS: tl.constexpr,",
        "        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,",
        "        USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, USE_GDC: tl.constexpr):",
        f'    """Skinny GEMM over {S} segment(s) of W, epilogue from {len(em.lines)} graph nodes: {ops}."""',
        "    if USE_GDC:", "        tl.extra.cuda.gdc_wait()", "        tl.extra.cuda.gdc_launch_dependents()",
        "    pid_n = tl.program_id(0)", "    pid_k = tl.program_id(1)",
        "    rm = tl.arange(0, BLOCK_M)", "    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)", "    rk = tl.arange(0, BLOCK_K)",
        "    k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K", "    k_begin = pid_k * k_chunk",
        "    m_ok = rm[:, None] < M", "    n_ok = rn[:, None] < N", "    x_rows = x_ptr + rm[:, None] * stride_xm",
    ]
    lines += [f"    acc{s} = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)" for s in range(S)]
    lines += ["    for k in range(k_begin, k_begin + k_chunk, BLOCK_K):",
              "        cols = k + rk[None, :]",
              "        k_ok = cols < K if not EVEN_K else cols >= 0",
              "        a = tl.load(x_rows + cols * stride_xk, mask=m_ok & k_ok, other=0.0)"]
    for s in range(S):
        lines += [f"        b = tl.load(w_ptr + (OFF{s} + rn[:, None]) * stride_wn + cols * stride_wk, mask=n_ok & k_ok, other=0.0)",
                  "        if USE_DOT:",
                  "            if x_ptr.dtype.element_ty == tl.float32:",
                  f"                acc{s} = tl.dot(a, tl.trans(b), acc{s}, input_precision=\"ieee\")",
                  "            else:",
                  f"                acc{s} = tl.dot(a, tl.trans(b), acc{s})",
                  "        else:",
                  f"            acc{s} += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)"]
    tile = "BLOCK_M * BLOCK_N"
    lines += ["    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)", "    rows = rm[:, None]", "    cols = cn[None, :]",
              "    mask = m_ok & (cols < N)",
              "    if SPLIT_K > 1:",
              f"        tile = part_ptr + pid_n * (SPLIT_K * {S} * {tile}) + rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]"]
    lines += [f"        tl.store(tile + (pid_k * {S} + {s}) * ({tile}), acc{s})" for s in range(S)]
    lines += ["        tl.debug_barrier()",
              "        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem=\"acq_rel\")",
              "        last = ticket == SPLIT_K - 1",
              "        if last:"]
    for s in range(S):
        lines += [f"            acc{s} = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
                  "            for p in tl.static_range(SPLIT_K):",
                  f"                acc{s} += tl.load(tile + (p * {S} + {s}) * ({tile}), cache_modifier=\".cg\")"]
    lines += ["            tl.atomic_xchg(count_ptr + pid_n, 0)",
              "    else:",
              "        last = True",
              "    if last:"]
    body = []
    for i, s in segments.items():
        body.append(f"    a{i} = acc{s}")
        body.append("    if HAS_BIAS:")
        body.append(f"        a{i} += tl.load(bias_ptr + OFF{s} + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]")
        body.append(f"    a{i} = a{i}.to({ldt})")
    for i in extra:
        body.append(f"    a{i} = tl.load(e{i} + rows * se{i}_m + cols * se{i}_n, mask=mask, other=0.0)")
    body += em.lines
    for j, o in enumerate(outputs):
        body.append(f"    tl.store(out{j} + rows * so{j}_m + cols * so{j}_n, {em.names[o]}, mask=mask)")
    lines += ["    " + b for b in body]
    return "\n".join(lines) + "\n"


class GemmEpilogue:
    """The call that replaces linear (+ split) + pointwise group in a routed step graph."""

    def __init__(self, name: str, group: FusedGroup, segments: dict[int, int], offsets: list[int],
                 inputs: list, linear_dtype: torch.dtype):
        self.__name__ = name
        self.group = group
        self.segments = segments          # group input index -> segment number
        self.offsets = offsets            # segment number -> first row of W
        self.inputs = inputs              # group input index -> ("seg", s) or ("arg", position)
        self.N = group.frame[1]
        self.source = generate_source(group, segments, linear_dtype, f"_{name}_kernel")
        self.kernel = getattr(cache.load(self.source), f"_{name}_kernel")
        self.out_dtypes = [o.meta["val"].dtype for o in
                           next(n for n in group.reference.graph.nodes if n.op == "output").args[0]]

    def reference(self, x, weight, bias, *extra):
        y = torch.nn.functional.linear(x, weight, bias)
        args = [y[..., self.offsets[v]:self.offsets[v] + self.N] if kind == "seg" else extra[v]
                for kind, v in self.inputs]
        return self.group(*args)

    def __call__(self, x, weight, bias, *extra):
        K = x.shape[-1]
        M = x.numel() // K
        config = skinny_gemm.TABLE.lookup(M, weight.shape[0], K, x.dtype, bias is not None) \
            if kernels_wanted([x]) and M <= skinny_gemm.MAX_M else None
        if config is None:
            return self.reference(x, weight, bias, *extra)
        frame = (*x.shape[:-1], self.N)
        try:
            views = [t.expand(frame).view(M, self.N) for t in extra]
        except RuntimeError:   # a broadcast that is not one [M, N] stride pattern
            return self.reference(x, weight, bias, *extra)
        return self.launch(x, weight, bias, views, config, M, frame)

    def launch(self, x, weight, bias, views, config, M, frame):
        x2 = x.reshape(M, x.shape[-1])
        outs = [torch.empty((M, self.N), dtype=dt, device=x.device) for dt in self.out_dtypes]
        bm = config.block_m(M)
        tiles = triton.cdiv(self.N, config.block_n)
        S = len(self.offsets)
        part, count = skinny_gemm.WORKSPACE.get(x.device, tiles * config.split_k * S * bm * config.block_n, tiles) \
            if config.split_k > 1 else (outs[0], outs[0])
        strides = [s for v in views for s in v.stride()] + [s for o in outs for s in o.stride()]
        offsets = {f"OFF{s}": off for s, off in enumerate(self.offsets)}
        self.kernel[(tiles, config.split_k)](
            x2, weight, bias if bias is not None else x2, *views, *outs, part, count,
            M, x2.shape[1], x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), *strides,
            N=self.N, **offsets, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, SPLIT_K=config.split_k, USE_DOT=config.dot,
            EVEN_K=x2.shape[1] % (config.split_k * config.block_k) == 0,
            num_warps=config.warps, num_stages=config.stages, **pdl(x))
        return tuple(o.view(frame) for o in outs)


def _match(gm: fx.GraphModule, node: fx.Node):
    """(linear node, split node or None, segments, offsets, input map) when ``node`` (a
    pointwise FusedGroup call) can be the epilogue of the linear feeding it, else None."""
    group = gm.get_submodule(node.target)
    if not isinstance(group, FusedGroup) or group.schedule != "pointwise" \
            or any(k != "row" for k in group.output_layouts) \
            or any(n.target is torch.ops.fusegen.rotate_half.default for n in group.reference.graph.nodes):
        return None
    N = group.frame[1]
    linear, split, segs = None, None, {}
    for i, a in enumerate(node.args):
        src, offset = None, None
        if isinstance(a, fx.Node) and a.op == "call_function" and a.target in LINEARS:
            src, offset, width = a, 0, a.meta["val"].shape[-1]
        elif isinstance(a, fx.Node) and a.target is operator.getitem and a.args[0].target is aten.split_with_sizes.default:
            sp = a.args[0]
            if sp.args[0].op == "call_function" and sp.args[0].target in LINEARS and sp.args[2] in (-1, sp.meta["val"][0].dim() - 1):
                sizes = list(sp.args[1])
                src, offset, width, split = sp.args[0], sum(sizes[:a.args[1]]), sizes[a.args[1]], sp
        if src is None:
            continue
        if (linear is not None and src is not linear) or width != N or group.input_layouts[i] != "row":
            return None
        linear = src
        segs[i] = offset
    if linear is None or not _only_feeds(linear, split, node):
        return None
    weight = linear.args[1]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    return linear, split, segs


def _only_feeds(linear: fx.Node, split, node: fx.Node) -> bool:
    if split is None:
        return set(linear.users) == {node}
    return set(linear.users) == {split} and all(set(g.users) <= {node} for g in split.users)


def fuse_epilogues(gm: fx.GraphModule) -> Counter:
    """Rewrite ``gm`` (a routed step graph) in place; counters of what was fused."""
    stats: Counter = Counter()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        found = _match(gm, node)
        if found is None:
            if isinstance(gm.get_submodule(node.target), FusedGroup):
                stats["groups_not_epilogues"] += 1
            continue
        linear, split, segs = found
        group = gm.get_submodule(node.target)
        offsets = sorted(set(segs.values()))
        segments = {i: offsets.index(off) for i, off in segs.items()}
        extra_args = [a for i, a in enumerate(node.args) if i not in segs]
        inputs = [("seg", segments[i]) if i in segs else ("arg", extra_args.index(a)) for i, a in enumerate(node.args)]
        x, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        fused = GemmEpilogue(f"gemm_{node.target}", group, segments, offsets, inputs,
                             linear.meta["val"].dtype)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(fused, (x, weight, bias, *extra_args))
        call.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        if split is not None:
            for g in list(split.users):
                gm.graph.erase_node(g)
            gm.graph.erase_node(split)
        gm.graph.erase_node(linear)
        stats["gemm_epilogues"] += 1
        stats[f"gemm_epilogue_segments_{len(offsets)}"] += 1
    gm.recompile()
    return stats
