"""Runs a paged step graph: owns the KV pool tensor and the device-resident batch, receives
block ids (it never allocates), and turns a step's entries into one packed forward.

    engine ──(row, start, count, samples) per entry──▶ PagedRunner.forward
                                                         │ a CUDA graph for the step's shape
                                                         │ (or the graph module, eagerly)
                                                         ▼
                                    logits [N, V] of each entry's last token

``packed_inputs`` builds the same inputs on the host from explicit tokens and block ids,
for one-off forwards (``CompiledModel.__call__``) and tests; it is not on the serving path.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from torch import fx

from fusegen.fused_group import KERNELS_ENV
from fusegen.kv import KVGeometry, byte_view
from fusegen.codegen import launch, skinny_gemm
from fusegen.codegen.skinny_gemm import route_linears
from fusegen.runtime.batch import BatchState, staged
from fusegen.runtime.cpu_graph import column_major_weights, cpu_step_graph, linear_weights, row_major_weights
from fusegen.runtime.cpu_rewrites import onednn_linear_pays


# per step graph, whether its CPU graphs take oneDNN's linears (its weights then row-major)
_ONEDNN_LINEARS: "weakref.WeakKeyDictionary[fx.GraphModule, bool]" = weakref.WeakKeyDictionary()


class PagedRunner:
    def __init__(self, gm: fx.GraphModule, geometry: KVGeometry, num_blocks: int, device, dtype=None):
        if geometry.block_size < 1:
            raise ValueError(f"PagedRunner needs a paged KV geometry, got block_size {geometry.block_size}")
        self.gm = gm
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.kv_pool = torch.zeros(geometry.pool_shape(num_blocks), dtype=dtype or geometry.dtype,
                                   device=self.device)
        self.batch: BatchState | None = None
        self.graphs = None  # StepGraphs once capture_graphs ran
        self.graph_gm = gm   # what the CUDA graphs capture: gm with its linears routed (gemm_routing)
        self.gemm_choices: list = []   # skinny_gemm.Choice per (M, N, K) measured at capture
        self.gemm_fusion: dict = {}   # counters of codegen/fused_gemm.fuse_gemms, and "calls":
        # fused vs unfused per call kind and M, as measured at capture
        self.pdl = False   # whether the captured graphs use programmatic dependent launch
        self._cpu_graph: fx.GraphModule | None = None  # see cpu_graph.py; made at the first CPU step

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def vocab_size(self) -> int | None:
        """The logits' last dimension as the graph records it (None when it is not static)."""
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        logits = output.args[0]
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        meta = getattr(logits, "meta", {})
        if "val" in meta:
            last = meta["val"].shape[-1]
        else:
            last = (meta.get("fusegen_shape") or {}).get("shape", [None])[-1]
        return last if isinstance(last, int) else None

    def allocate_batch(self, max_rows: int, max_model_len: int) -> BatchState:
        self.batch = BatchState(max_rows, max_model_len, self.block_size, self.device)
        return self.batch

    def capture_graphs(self, decode_buckets, token_buckets, skinny_gemms: bool = True, pdl: bool = False,
                       epilogues: bool = True, lazy: bool = False) -> None:
        """Capture a CUDA graph per step shape (see cuda_graphs.py); once, after the batch
        (``lazy``: each at the first step of its shape).
        With ``skinny_gemms`` the linears of the decode buckets (M <= 64 tokens) run the
        skinny-GEMM template where the table measured here finds it faster than cuBLAS (and,
        with ``epilogues``, the pointwise groups they feed run as their epilogues); with
        ``pdl`` fusegen's kernels in the graphs use programmatic dependent launch
        (codegen/launch.py) where the device supports it."""
        from fusegen.runtime.cuda_graphs import StepGraphs

        if self.batch is None:
            raise ValueError("capture_graphs needs the batch state: call allocate_batch first")
        self.pdl = pdl and launch.supported(self.device)   # the captures launch with it (StepGraphs)
        if skinny_gemms:   # measured as the graphs will launch them, with or without PDL
            with launch.dependent_launches(self.pdl):
                self.graph_gm, self.gemm_choices, self.gemm_fusion = route_linears(
                    self.gm, [b for b in decode_buckets if b <= skinny_gemm.MAX_M], self.device, epilogues,
                    kv_pool=self.kv_pool)
            self.gemm_fusion["calls"] = list(skinny_gemm.FUSED_REPORT)
        self.graphs = StepGraphs(self, decode_buckets, token_buckets, lazy)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """``kv_pool[:, :, dst] = kv_pool[:, :, src]`` for each (src, dst) pair, every layer,
        K and V (copy-on-write of shared blocks). All sources are read before any write."""
        if not copies:
            return
        index = staged([s for s, _ in copies] + [d for _, d in copies], torch.long, self.device).view(2, -1)
        pool = byte_view(self.kv_pool)   # an fp8 pool's bytes: float8 has no index_copy_
        pool.index_copy_(2, index[1], pool.index_select(2, index[0]))

    @torch.no_grad()
    def forward(self, entries: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One step over ``entries`` = [rows, starts, counts, samples] (host ints, N each):
        (logits [N', V] with N' >= N rows, the entries on the device padded to N', whether a
        CUDA graph ran). Rows past N are padding."""
        n, num_tokens = len(entries[0]), sum(entries[2])
        graph = self.graphs.pick(num_tokens, n) if self.graphs is not None else None
        if graph is not None:
            return graph.run(entries), graph.entries, True
        device_entries = staged([v for col in entries for v in col], torch.int32, self.device).view(4, n)
        inputs = self.batch.step_inputs(device_entries, num_tokens, self.kv_pool)
        return self.step_graph()(**inputs)[0], device_entries, False

    def step_graph(self) -> fx.GraphModule:
        """The graph a step runs: on the CPU its flat reference copy (cpu_graph.py), unless
        $FUSEGEN_KERNELS=1 asks for the fused groups' kernels there; otherwise the graph."""
        if self.device.type != "cpu" or os.environ.get(KERNELS_ENV) == "1":
            return self.gm
        if self._cpu_graph is None:
            relaid = row_major = 0
            if self.gm not in _ONEDNN_LINEARS:   # decided once per graph: later runners share its weights
                relaid = column_major_weights(self.gm)
                # oneDNN's linears where they beat aten.linear on this CPU (cpu_rewrites.onednn_linear),
                # over row-major weights, which oneDNN reads faster (cpu_graph.py)
                _ONEDNN_LINEARS[self.gm] = onednn_linear_pays(linear_weights(self.gm))
                row_major = row_major_weights(self.gm) if _ONEDNN_LINEARS[self.gm] else 0
            onednn = _ONEDNN_LINEARS[self.gm]
            self._cpu_graph, self.cpu_graph_stats = cpu_step_graph(
                self.gm, leave_out=() if onednn else ("onednn_linear",))
            self.cpu_graph_stats["weights_column_major"] = relaid
            self.cpu_graph_stats["weights_row_major"] = row_major
            self.cpu_graph_stats["onednn_linear_left_out"] = int(not onednn)
        return self._cpu_graph


@dataclass
class Chunk:
    """``tokens`` at ``positions`` computed on top of ``start`` cached tokens, stored in
    ``blocks`` (covering start + len(tokens))."""
    tokens: list[int]
    positions: list[int]
    start: int
    blocks: list[int]


def packed_inputs(runner: PagedRunner, chunks: list[Chunk], last_only: bool = False) -> dict:
    """Graph inputs for a one-off packed forward built on the host; logits of every packed
    token, or with ``last_only`` of each chunk's last one."""
    bs, dev, i32 = runner.block_size, runner.device, torch.int32
    ids, pos, slots, lens, starts = [], [], [], [], [0]
    for c in chunks:
        end = c.start + len(c.tokens)
        if runner.geometry.block_size * len(c.blocks) < end:
            raise ValueError(f"chunk of {end} tokens needs {-(-end // bs)} blocks, got {len(c.blocks)}")
        ids.extend(c.tokens)
        pos.extend(c.positions)
        slots.extend(c.blocks[i // bs] * bs + i % bs for i in range(c.start, end))
        lens.append(end)
        starts.append(starts[-1] + len(c.tokens))
    width = max(len(c.blocks) for c in chunks)
    tables = [c.blocks + [0] * (width - len(c.blocks)) for c in chunks]
    rows = [e - 1 for e in starts[1:]] if last_only else list(range(starts[-1]))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long, device=dev),
        "position_ids": torch.tensor([pos], dtype=torch.long, device=dev),
        "kv_pool": runner.kv_pool,
        "slot_mapping": torch.tensor(slots, dtype=i32, device=dev),
        "block_tables": torch.tensor(tables, dtype=i32, device=dev),
        "seq_lens": torch.tensor(lens, dtype=i32, device=dev),
        "query_start_loc": torch.tensor(starts, dtype=i32, device=dev),
        "logits_indices": torch.tensor(rows, dtype=i32, device=dev),
    }
