"""Every step replayed from a CUDA graph: one graph per (packed tokens, entries) bucket.

A step's shapes depend only on its packed token count T and entry count N, so each bucket
(Tp, Np) gets a static entries buffer [4, Np] and one captured graph of the device-side
input construction (``BatchState.step_inputs``) plus the whole forward. A step runs the
smallest bucket with Tp >= T and Np >= N; padding entries are (padding row, 0, 0, 0) and
padding tokens write nothing (slot -1):

    decode buckets   (b, b)           b = 1, 2, 4, ... max_num_seqs: decodes, and any step
                                      of at most b tokens (T == N picks the split-KV kernel,
                                      in which every token finds its own sequence)
    token buckets    (t, max_num_seqs)  t = 2 max_num_seqs ... max_num_batched_tokens:
                                      prefills and mixed steps (the FlashAttention kernel)

Eagerly (the default), every bucket is captured when the runner sets up, largest first,
all graphs sharing one memory pool. Lazily (config ``lazy_cuda_graphs=1``), a bucket is
captured the first time a step picks it, into the same pool: the first token waits for one
capture, not for all of them, and buckets no step uses cost nothing; the price is a capture
inside the first step of each new shape, and graph memory taken while serving rather than
at set-up. What a graph reads must be device-side and sync-free, which the Triton kernels
and the input construction are. Sampling runs after the replay, outside the graph.
"""

from __future__ import annotations

import time

import torch

from fusegen.codegen import launch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def decode_buckets(max_num_seqs: int) -> list[int]:
    return [b for b in DEFAULT_BUCKETS if b < max_num_seqs] + [max_num_seqs]


def token_buckets(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Powers of two above the decode buckets up to 512, then multiples of 512: a prefill is
    padded by at most 512 tokens (or 2x below 512)."""
    out, t = [], 1
    while t <= min(512, max_num_batched_tokens):
        if t > max_num_seqs:
            out.append(t)
        t *= 2
    t = 1024
    while t < max_num_batched_tokens:
        if t > max_num_seqs:
            out.append(t)
        t += 512
    if max_num_batched_tokens > max_num_seqs:
        out.append(max_num_batched_tokens)
    return sorted(set(out))


class StepGraph:
    def __init__(self, runner, num_tokens: int, num_seqs: int):
        self.runner, self.num_tokens, self.num_seqs = runner, num_tokens, num_seqs
        batch = runner.batch
        self.entries = torch.zeros(4, num_seqs, dtype=torch.int32, device=runner.device)
        self.entries[0] = batch.padding_row
        self.graph = torch.cuda.CUDAGraph()
        self.logits = None

    def _forward(self) -> torch.Tensor:
        runner = self.runner
        inputs = runner.batch.step_inputs(self.entries, self.num_tokens, runner.kv_pool)
        return runner.graph_gm(**inputs)[0]

    @property
    def captured(self) -> bool:
        return self.logits is not None

    def capture(self, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: Triton compiles, the allocator settles
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._forward()

    def run(self, entries: list[list[int]]) -> torch.Tensor:
        """Replay for host entries [rows, starts, counts, samples] (N <= num_seqs each)."""
        pad = self.num_seqs - len(entries[0])
        flat = []
        for col, fill in zip(entries, (self.runner.batch.padding_row, 0, 0, 0)):
            flat.extend(col)
            flat.extend([fill] * pad)
        host = torch.tensor(flat, dtype=torch.int32, pin_memory=True).view(4, self.num_seqs)
        self.entries.copy_(host, non_blocking=True)
        self.graph.replay()
        return self.logits


def bucket_shapes(decode_sizes, token_sizes) -> list[tuple[int, int]]:
    """(tokens, entries) of every bucket, ascending: decode buckets (b, b), then token
    buckets (t, largest decode bucket) above them."""
    max_seqs = max(decode_sizes)
    shapes = [(b, b) for b in sorted(set(decode_sizes))]
    return shapes + [(t, max_seqs) for t in sorted(set(token_sizes)) if t > max_seqs]


class StepGraphs:
    """The step graphs of one runner, captured all at once or (``lazy``) each at its first
    pick. ``capture_s`` and ``memory_bytes`` add up every capture so far."""

    def __init__(self, runner, decode_sizes, token_sizes, lazy: bool = False):
        self.runner, self.lazy = runner, lazy
        self.capture_s, self.memory_bytes = 0.0, 0
        self._pool = None
        self.graphs = [self._make(t, n) for t, n in bucket_shapes(decode_sizes, token_sizes)]
        if not lazy:
            self._capture(list(reversed(self.graphs)))   # largest first: smaller ones reuse its memory

    def _make(self, num_tokens: int, num_seqs: int) -> StepGraph:
        if self.runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the runner is on {self.runner.device}")
        with torch.cuda.device(self.runner.device):
            return StepGraph(self.runner, num_tokens, num_seqs)

    def _capture(self, graphs: list[StepGraph]) -> None:
        device = self.runner.device
        with torch.cuda.device(device), torch.no_grad(), launch.dependent_launches(self.runner.pdl):
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_reserved(device)
            start = time.perf_counter()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            for graph in graphs:
                graph.capture(self._pool)
            torch.cuda.synchronize(device)
        self.capture_s += time.perf_counter() - start
        self.memory_bytes += torch.cuda.memory_reserved(device) - before

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [(g.num_tokens, g.num_seqs) for g in self.graphs]

    @property
    def captured(self) -> list[tuple[int, int]]:
        return [(g.num_tokens, g.num_seqs) for g in self.graphs if g.captured]

    def pick(self, num_tokens: int, num_seqs: int) -> StepGraph | None:
        """The smallest bucket that holds the step (captured now if it was not yet)."""
        for graph in self.graphs:   # ascending token counts
            if graph.num_tokens >= num_tokens and graph.num_seqs >= num_seqs:
                if not graph.captured:
                    self._capture([graph])
                return graph
        return None
