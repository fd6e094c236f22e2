"""Skinny GEMM: ``y = x @ W.T (+ bias)`` for M <= 64 packed tokens, the shape of decode.

A decode step's linears are weight-read bound: x is [M, K] with M the batch, W [N, K] is
read once. The kernel tiles N by BLOCK_N and, when the N tiles alone do not fill the GPU,
splits K into SPLIT_K ranges (``split-K``); every program streams BLOCK_N rows of W through
its K range once. The reduction over the splits is fused: each program stores its fp32
partial tile, then takes a ticket from the tile's counter; the program that draws the last
ticket sums the partials in split order (deterministic), adds the bias, writes y and resets
the counter, so the workspace needs no clearing between launches (CUDA-graph safe; launches
that share a workspace must run in stream order).

    USE_DOT = 1   tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] (BLOCK_M >= 16)
    USE_DOT = 0   fp32 multiply and row sums on [BLOCK_M, BLOCK_N, BLOCK_K] (small M); one
                  row (BLOCK_M = 1) accumulates the products elementwise in a [BLOCK_N, BLOCK_K]
                  tile and sums it once after the K loop: a row sum per K block costs warp
                  shuffles and, across warps, shared memory and barriers (per weight byte more
                  instructions than the SM can issue at the memory's rate)

Which configuration runs for a shape, or whether cuBLAS (``F.linear``) does, is measured on
the device (``GemmTable.measure``) when the engine is set up; ``linear`` looks the choice up.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fusegen.codegen import launch
from fusegen.codegen.launch import pdl, prefetch_rows
from fusegen.fused_group import kernels_wanted

MAX_M = 64   # the template serves at most this many packed tokens


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
                        M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                        EVEN_K: tl.constexpr, USE_GDC: tl.constexpr, PREFETCH: tl.constexpr = 0):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K   # each split's K range, whole BLOCK_Ks
    k_begin = pid_k * k_chunk
    if USE_GDC:
        if PREFETCH > 0:   # W is no kernel's output: its stream starts before the wait (launch.py)
            span = tl.minimum(k_chunk, K - k_begin) * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
            prefetch_rows(w_ptr + rn * stride_wn + k_begin, tl.minimum(span, PREFETCH) // 16 * 16, rn < N)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_rows = w_ptr + rn[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)   # one row: products summed at the end
    for k in range(k_begin, k_begin + k_chunk, BLOCK_K):
        cols = k + rk[None, :]
        if EVEN_K:
            a = tl.load(x_rows + cols * stride_xk, mask=m_ok, other=0.0)
            b = tl.load(w_rows + cols * stride_wk, mask=n_ok, other=0.0)
        else:
            a = tl.load(x_rows + cols * stride_xk, mask=m_ok & (cols < K), other=0.0)
            b = tl.load(w_rows + cols * stride_wk, mask=n_ok & (cols < K), other=0.0)
        if USE_DOT:
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")   # fp32 stays fp32, not tf32
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        elif BLOCK_M == 1:
            acc_w += a.to(tl.float32) * b.to(tl.float32)
        else:
            acc += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    if not USE_DOT and BLOCK_M == 1:
        acc = tl.sum(acc_w, axis=1)[None, :]
    _finish_tile(acc, pid_n, pid_k, M, N, y_ptr, stride_ym, bias_ptr, bias_ptr, part_ptr, count_ptr,
                 HAS_BIAS, False, BLOCK_M, BLOCK_N, SPLIT_K)


@triton.jit
def _finish_tile(acc, pid_n, pid_k, M, N, y_ptr, stride_ym, bias_ptr, scale_ptr, part_ptr, count_ptr,
                 HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[m, n] = acc[m, n] * scale[n] (with HAS_SCALE) + bias[n] for the program's fp32 tile
    of output columns pid_n * BLOCK_N + [0, BLOCK_N), its K range pid_k. With SPLIT_K > 1 the
    tile's partial sums meet in the workspace and the last of its programs finishes them
    (the ticket reduction in the module docstring); the scale and bias apply once, to the
    sum. Shared by the quantized-weight template (quant_gemm.py)."""
    rm = tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + cn[None, :]
    y_mask = (rm[:, None] < M) & (cn[None, :] < N)
    if SPLIT_K == 1:
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tile = part_ptr + pid_n * (SPLIT_K * BLOCK_M * BLOCK_N) \
            + rm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile + pid_k * (BLOCK_M * BLOCK_N), acc)
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:   # the last split of this tile: reduce in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(tile + s * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
            if HAS_SCALE:
                total *= tl.load(scale_ptr + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                total += tl.load(bias_ptr + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


SEED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    dot: bool = False
    warps: int = 4
    stages: int = 3

    def block_m(self, M: int) -> int:
        return max(triton.next_power_of_2(M), 16 if self.dot else 1)

    def __str__(self) -> str:
        return (f"{'dot' if self.dot else 'fma'} n{self.block_n} k{self.block_k} s{self.split_k} "
                f"w{self.warps} st{self.stages}")


class _Workspace:
    """Per device: the fp32 partial tiles and the per-tile tickets of split-K launches. The
    tickets start at zero and every launch leaves them at zero. A buffer that is outgrown is
    kept alive: CUDA graphs captured earlier still point at it."""

    def __init__(self):
        self.parts: dict[torch.device, torch.Tensor] = {}
        self.counts: dict[torch.device, torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, device, part_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        part, count = self.parts.get(device), self.counts.get(device)
        grow_part = part is None or part.numel() < part_elems
        grow_count = count is None or count.numel() < tiles
        if (grow_part or grow_count) and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the skinny-GEMM workspace must be sized before CUDA-graph capture "
                               "(run the shape once outside the capture)")
        if grow_part:
            self.retired += [part] if part is not None else []
            part = self.parts[device] = torch.empty(max(part_elems, 1 << 16), dtype=torch.float32, device=device)
        if grow_count:
            self.retired += [count] if count is not None else []
            count = self.counts[device] = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
        return part, count


WORKSPACE = _Workspace()


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  config: GemmConfig) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the template; x [..., K] with at most MAX_M rows."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > MAX_M:
        raise ValueError(f"skinny_linear serves at most {MAX_M} rows, got {M}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bm = config.block_m(M)
    tiles = triton.cdiv(N, config.block_n)
    part, count = WORKSPACE.get(x.device, tiles * config.split_k * bm * config.block_n, tiles) \
        if config.split_k > 1 else (y, y)
    even_k = K % (config.split_k * config.block_k) == 0
    _skinny_gemm_kernel[(tiles, config.split_k)](
        x2, weight, bias if bias is not None else y, y, part, count,
        M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, USE_DOT=config.dot, EVEN_K=even_k,
        num_warps=config.warps, num_stages=config.stages, **pdl(x), **_prefetch(weight, config))
    return y.view(*x.shape[:-1], N)


def _prefetch(weight: torch.Tensor, config: GemmConfig) -> dict:
    """``PREFETCH``: the bytes per weight row a program prefetches before its PDL wait (none
    off PDL). Shared by the quantized-weight template."""
    if not (launch.enabled() and weight.is_cuda and launch.prefetchable(weight)):
        return {}
    return {"PREFETCH": max(launch.PREFETCH_BYTES // config.block_n, 16)}


# --- the measured table ----------------------------------------------------------------------

def candidates(M: int, N: int, K: int, sms: int) -> list[GemmConfig]:
    """The configurations worth timing for [M, K] x [K, N] on ``sms`` SMs: tile widths and
    depths that keep the weight stream vectorised, and the split-K that brings the grid to
    at least two programs per SM."""
    out = []
    dot_choices = (False, True) if M >= 4 else (False,)
    for dot in dot_choices:
        widths = (16, 32, 64) if dot else ((8, 16, 32) if M <= 2 else (8, 16))
        for bn in widths:
            for bk in ((64, 128) if dot else (128, 256, 512)):
                if not dot and triton.next_power_of_2(M) * bn * bk > 32768:
                    continue   # the fp32 product tile would not fit in registers
                tiles = triton.cdiv(N, bn)
                split = 1
                while tiles * split < 2 * sms and split * 2 * bk <= K // 2:
                    split *= 2
                for sk in sorted({max(split // 2, 1), split}):
                    for warps in (4, 8):
                        out.append(GemmConfig(bn, bk, sk, dot, warps, 3))
    return out


L2_FLUSH_BYTES = 256 << 20   # weights cycled per timing: more than any GPU's L2


def _time_us(fns, reps: int = 5) -> float:
    """Median microseconds per call of the calls ``fns`` (one per weight copy), replayed
    from a CUDA graph as decode runs them: the copies together exceed the L2, so every call
    streams its weight from memory, and no host launch time is counted."""
    for fn in fns:   # compiles, and sizes the split-K workspace outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del graph
    return statistics.median(times)


@dataclass
class Choice:
    M: int
    N: int
    K: int
    config: GemmConfig | None   # None: the baseline (cuBLAS, or dequantize + cuBLAS)
    us: float
    cublas_us: float            # the baseline's time
    fmt: str = "none"           # the weight's storage format (fusegen/quant.py)
    template_us: float = float("inf")   # the template's best time, chosen or not

    @property
    def kernel(self) -> str:
        if self.config is None:
            return "cublas" if self.fmt == "none" else "dequant+cublas"
        return f"triton {self.config}"


class PlainWeight:
    """What the table times for a linear whose weight is a plain [N, K] tensor: this
    template against cuBLAS. A stored format brings its own (quant_gemm.QuantizedWeight):
    ``weight`` makes the operands a call takes after x, ``template``/``baseline`` run one."""

    fmt = "none"

    def weight(self, N: int, K: int, dtype, device, gen) -> tuple:
        return (torch.randn(N, K, device=device, dtype=dtype, generator=gen) * K ** -0.5,)

    def weight_bytes(self, N: int, K: int, dtype) -> int:
        return N * K * torch.empty((), dtype=dtype).element_size()

    def candidates(self, M: int, N: int, K: int, sms: int) -> list[GemmConfig]:
        return candidates(M, N, K, sms)

    def template(self, x, weight: tuple, bias, config: GemmConfig):
        return skinny_linear(x, *weight, bias, config)

    def baseline(self, x, weight: tuple, bias):
        return torch.nn.functional.linear(x, *weight, bias)

    def exact(self, x, weight: tuple, bias):
        """The product in fp32, to check the chosen configuration against."""
        return torch.nn.functional.linear(x.float(), weight[0].float(), None if bias is None else bias.float())


PLAIN = PlainWeight()


def operand_for(fmt: str):
    """The table's operand for weights stored in ``fmt`` ("none": a plain weight)."""
    if fmt == "none":
        return PLAIN
    from fusegen.codegen.quant_gemm import OPERANDS

    return OPERANDS[fmt]


def table_key(M: int, N: int, K: int, dtype, has_bias: bool, fmt: str = "none") -> tuple:
    """The table's key; a plain weight's is (M, N, K, dtype, has_bias). Under dependent
    launches (launch.py) it ends in "pdl": the template then overlaps the kernel before it,
    which cuBLAS does not, so the choice is measured and looked up apart."""
    key = (M, N, K, dtype, has_bias) if fmt == "none" else (M, N, K, dtype, has_bias, fmt)
    return key + ("pdl",) if launch.enabled() else key


class GemmTable:
    """Per (M, N, K, dtype, bias[, weight format]): the faster of the template's best
    configuration and the baseline (cuBLAS; for a stored format, dequantize + cuBLAS),
    measured on the device with random data."""

    def __init__(self):
        self.choices: dict[tuple, Choice] = {}
        self.trace: dict[tuple, dict[GemmConfig, float]] = {}   # every candidate's time
        self.measured = 0   # shapes timed on the device by this table (seeded ones are not)

    def export(self) -> list[dict]:
        """The choices as JSON rows (an artifact ships them: fusegen/artifact/tuning.py)."""
        rows = []
        for key, c in self.choices.items():
            row = {"M": c.M, "N": c.N, "K": c.K, "dtype": str(key[3]).removeprefix("torch."),
                   "bias": bool(key[4]), "fmt": c.fmt, "pdl": key[-1] == "pdl", "us": c.us,
                   "cublas_us": c.cublas_us,
                   "template_us": c.template_us if c.template_us != float("inf") else None,
                   "config": None if c.config is None else dataclasses.asdict(c.config)}
            trace = self.trace.get(key)
            best = min(trace, key=trace.get) if trace else None
            row["best"] = None if best is None else dataclasses.asdict(best)   # what fused GEMMs build on
            rows.append(row)
        return rows

    def seed(self, rows: list[dict]) -> int:
        """Take ``export()`` rows measured on this kind of device as if measured here (a
        shape already in the table keeps its own); returns how many were new. A malformed
        row raises ValueError."""
        added = 0
        for row in rows:
            try:
                dtype = SEED_DTYPES[row["dtype"]]
                config = None if row["config"] is None else GemmConfig(**row["config"])
                M, N, K = (int(row[k]) for k in ("M", "N", "K"))
                key = (M, N, K, dtype, bool(row["bias"])) + ((row["fmt"],) if row["fmt"] != "none" else ())
                key += ("pdl",) if row["pdl"] else ()
                choice = Choice(M, N, K, config, float(row["us"]), float(row["cublas_us"]), row["fmt"],
                                float("inf") if row.get("template_us") is None else float(row["template_us"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"GEMM table row {row!r}: {exc}") from None
            if key not in self.choices:
                self.choices[key] = choice
                if row.get("best") is not None:
                    self.trace[key] = {GemmConfig(**row["best"]): choice.template_us}
                added += 1
        return added

    def best_template(self, M: int, N: int, K: int, dtype, has_bias: bool, fmt: str = "none") -> GemmConfig | None:
        """The template's fastest measured configuration, whether or not it beat the baseline."""
        trace = self.trace.get(table_key(M, N, K, dtype, has_bias, fmt))
        return min(trace, key=trace.get) if trace else None

    def lookup(self, M: int, N: int, K: int, dtype, has_bias: bool, fmt: str = "none") -> GemmConfig | None:
        choice = self.choices.get(table_key(M, N, K, dtype, has_bias, fmt))
        return None if choice is None else choice.config

    def measure(self, shapes, ms, dtype, device, margin: float = 0.97, operand=PLAIN) -> list[Choice]:
        """Time every (M, N, K) for M in ``ms`` and (N, K, has_bias) in ``shapes``, the weight
        stored as ``operand`` says; the template is chosen when it beats the baseline by
        ``1 - margin`` at least."""
        device = torch.device(device)
        if not ms or not shapes:
            return []
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        made = []
        gen = torch.Generator(device=device).manual_seed(0)
        for N, K, has_bias in shapes:
            copies = max(1, min(32, -(-L2_FLUSH_BYTES // operand.weight_bytes(N, K, dtype))))
            ws = [operand.weight(N, K, dtype, device, gen) for _ in range(copies)]
            b = torch.randn(N, device=device, dtype=dtype, generator=gen) if has_bias else None
            for M in ms:
                key = table_key(M, N, K, dtype, has_bias, operand.fmt)
                if key in self.choices or M > MAX_M:
                    continue
                self.measured += 1
                x = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
                base_us = _time_us([lambda w=w: operand.baseline(x, w, b) for w in ws])
                timings = self.trace[key] = {}
                for cfg in operand.candidates(M, N, K, sms):
                    try:
                        timings[cfg] = _time_us([lambda w=w, cfg=cfg: operand.template(x, w, b, cfg) for w in ws])
                    except (triton.CompilationError, OutOfResources):   # a tile that does not build or fit
                        continue
                best = min(timings, key=timings.get) if timings else None
                best_us = timings[best] if timings else float("inf")
                if best is not None:
                    got = operand.template(x, ws[0], b, best).float()
                    if not torch.allclose(got, operand.exact(x, ws[0], b), rtol=3e-2, atol=3e-2):
                        raise RuntimeError(f"skinny GEMM {best} disagrees with F.linear at M{M} N{N} K{K} "
                                           f"(weights {operand.fmt})")
                config = best if best_us < margin * base_us else None
                choice = Choice(M, N, K, config, best_us if config else base_us, base_us, operand.fmt, best_us)
                self.choices[key] = choice
                made.append(choice)
        return made

    def report(self, copy_tbps: float | None = None) -> str:
        """One line per shape: the kernel chosen, its time, the baseline's, and % of ``copy_tbps``
        (bytes read: the weight as stored, x and y)."""
        lines = []
        for key, c in sorted(self.choices.items(), key=lambda kv: (kv[1].fmt, kv[0][:3])):
            dtype = key[3]
            size = torch.empty((), dtype=dtype).element_size()
            bytes_ = operand_for(c.fmt).weight_bytes(c.N, c.K, dtype) + (c.M * c.K + c.M * c.N) * size
            share = f"  {bytes_ / c.us / 1e6 / copy_tbps:5.0%} of copy" if copy_tbps else ""
            base = "cuBLAS" if c.fmt == "none" else "dequant"
            weights = "" if c.fmt == "none" else f" {c.fmt}"
            lines.append(f"M{c.M:<3} N{c.N:<6} K{c.K:<6}{weights:<5} {c.kernel:<34} {c.us:8.1f} us  "
                         f"({base} {c.cublas_us:8.1f} us, template {c.template_us:8.1f} us){share}")
        return "\n".join(lines)


TABLE = GemmTable()
FUSED_REPORT: list[dict] = []   # the last measure_fused rows (fused vs unfused per call kind and M)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` through the measured table: the template where it won for this shape,
    cuBLAS (or the CPU's GEMM) everywhere else. Off CUDA only with $FUSEGEN_KERNELS=1
    (Triton's interpreter, for tests)."""
    if kernels_wanted([x]):
        M = x.numel() // x.shape[-1]
        config = TABLE.lookup(M, weight.shape[0], weight.shape[1], x.dtype, bias is not None)
        if config is not None:
            return skinny_linear(x, weight, bias, config)
    return torch.nn.functional.linear(x, weight, bias)


def route_linears(gm, ms, device, epilogues: bool = True, kv_pool=None) -> tuple:
    """A copy of ``gm``'s graph (sharing its weights) whose ``aten.linear`` nodes call
    ``linear`` and whose quantized linears call ``quant_gemm.linear``, with the table
    measured for their shapes at every M in ``ms``, and (with
    ``epilogues``) the pointwise groups that consume a linear fused into it
    (codegen/fused_gemm.py); returns the copy, the choices for its shapes and the
    fusion counters. The table's report is logged."""
    import functools
    import logging

    from torch import fx

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    shapes = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        weight = node.args[1]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        w = functools.reduce(getattr, weight.target.split("."), gm)
        if w.dim() == 2:
            node.target = linear
            has_bias = len(node.args) > 2 and node.args[2] is not None
            shapes.add((w.shape[0], w.shape[1], has_bias, w.dtype))
    routed = fx.GraphModule(gm, graph)
    for dtype in {s[3] for s in shapes}:
        TABLE.measure(sorted(s[:3] for s in shapes if s[3] == dtype), ms, dtype, device)
    choices = [c for key, c in TABLE.choices.items()
               if c.fmt == "none" and c.M in ms and (c.N, c.K, key[4], key[3]) in shapes
               and (key[-1] == "pdl") == launch.enabled()]
    from fusegen.codegen.quant_gemm import route_quantized   # its weights' linears, on the same table

    choices += route_quantized(routed, ms, device)
    stats = {}
    if epilogues:
        from fusegen.codegen.fused_gemm import fuse_gemms

        stats = dict(fuse_gemms(routed))
        if kv_pool is not None and torch.device(device).type == "cuda" and ms:
            from fusegen.codegen.fused_gemm import measure_fused

            FUSED_REPORT[:] = measure_fused(routed, ms, device, kv_pool)
            stats["fused_calls_chosen"] = sum(r["chosen"] == "fused" for r in FUSED_REPORT)
            stats["fused_calls_measured"] = len(FUSED_REPORT)
    log = logging.getLogger("fusegen.gemm")
    if choices:
        log.info("skinny GEMM table:\n%s", TABLE.report())
    log.info("GEMM fusion: %s", stats)
    for row in FUSED_REPORT if kv_pool is not None else []:
        log.info("fused %s M%d: %.1f us fused, %.1f us unfused -> %s", row["call"], row["M"], row["fused_us"],
                 row["unfused_us"], row["chosen"])
    return routed, choices, stats
