"""Decode steps replayed from CUDA graphs, one per batch-size bucket.

A decode step has one token per sequence, so its shapes depend only on the number of
sequences. Each bucket b gets static input buffers and one captured graph; a step with N
sequences runs the smallest bucket >= N, padded:

    input_ids / position_ids [1, b]   padding: token 0, position 0
    slot_mapping [b]                  padding: -1 (nothing written)
    block_tables [b, W]               W = blocks of the longest sequence served; padding: 0
    seq_lens [b]                      padding: 1 (a one-token context; its output is dropped)
    query_start_loc [b + 1]           0, 1, ..., b
    logits_indices [b]                0, 1, ..., b - 1

Capture happens once per runner (all buckets share one memory pool); prefill never uses
graphs. Everything the graph reads must be device-side and sync-free, which the Triton
attention and fused kernels are.
"""

from __future__ import annotations

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    def __init__(self, runner, max_blocks_per_seq: int, buckets=DEFAULT_BUCKETS):
        if runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the runner is on {runner.device}")
        self.runner = runner
        self.width = max_blocks_per_seq
        self.buckets = tuple(sorted(buckets))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _static_inputs(self, b: int) -> dict[str, torch.Tensor]:
        dev, i32 = self.runner.device, torch.int32
        return {
            "input_ids": torch.zeros(1, b, dtype=torch.long, device=dev),
            "position_ids": torch.zeros(1, b, dtype=torch.long, device=dev),
            "kv_pool": self.runner.kv_pool,
            "slot_mapping": torch.full((b,), -1, dtype=i32, device=dev),
            "block_tables": torch.zeros(b, self.width, dtype=i32, device=dev),
            "seq_lens": torch.ones(b, dtype=i32, device=dev),
            "query_start_loc": torch.arange(b + 1, dtype=i32, device=dev),
            "logits_indices": torch.arange(b, dtype=i32, device=dev),
        }

    @torch.no_grad()
    def _capture(self) -> None:
        gm = self.runner.gm
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            inputs = self._static_inputs(b)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: Triton compiles, allocator settles
                    gm(**inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = gm(**inputs)
            self.graphs[b], self.inputs[b], self.outputs[b] = graph, inputs, out

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_blocks <= self.width

    def run(self, host: dict[str, list]) -> torch.Tensor:
        """Replay the bucket for ``host`` (python lists from the runner); logits [N, V]."""
        n = len(host["seq_lens"])
        b = next(b for b in self.buckets if b >= n)
        static = self.inputs[b]
        pad = b - n
        rows = [t + [0] * (self.width - len(t)) for t in host["block_tables"]] + [[0] * self.width] * pad
        fills = {
            "input_ids": [host["input_ids"] + [0] * pad],
            "position_ids": [host["position_ids"] + [0] * pad],
            "slot_mapping": host["slot_mapping"] + [-1] * pad,
            "block_tables": rows,
            "seq_lens": host["seq_lens"] + [1] * pad,
        }
        for name, values in fills.items():
            buf = static[name]
            buf.copy_(torch.tensor(values, dtype=buf.dtype), non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b][0, :n]
