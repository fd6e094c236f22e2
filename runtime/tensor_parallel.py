"""The engine across tensor-parallel ranks: rank 0 runs the Engine (scheduler, batch state,
sampling) over a ``LeadRunner``; every other rank runs ``follow``, which replays rank 0's
steps on its own slice of the paged pool (its KV heads).

    rank 0 (LeadRunner)                          rank r > 0 (follow)
    engine: schedule, write the batch            ...
    broadcast header [op, sizes] ──────────────▶ header
    broadcast the step's inputs ──────────────▶  inputs (ids, positions, slots, tables, ...)
    graph(inputs, its pool)  ◀── all-reduce / all-gather in the graphs ──▶ graph(inputs, its pool)
    sample from the gathered logits              (logits dropped)

Sampling happens once, on rank 0: the gathered logits are the same on every rank, but only
rank 0 holds the requests and their sampling state, and the token it picks reaches the
other ranks as the next step's ``input_ids``, so nothing else has to be broadcast. Every
collective raises ``TensorParallelError`` naming this rank and the silent ones when a peer
is gone or the group's timeout passes (fusegen/distributed.py); none waits forever.

Ops of the header: SETUP (a new pool of ``num_blocks``: an engine was made), STEP (copies of
shared blocks, then one forward), IDLE (nothing to run: an idle server's rank 0 sends one
every quarter of the timeout, so that the followers' wait for the next header never times
out while the ranks are alive), STOP (``follow`` returns).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import fx

from fusegen.distributed import TPGroup, collective, timeout_seconds
from fusegen.kv import PAGED_INPUTS, KVGeometry
from fusegen.runtime.batch import staged
from fusegen.runtime.paged import PagedRunner

log = logging.getLogger(__name__)

STOP, SETUP, STEP, IDLE = 0, 1, 2, 3
HEADER = 8   # op, num_blocks | copies, T, N, M, R, payload length, step number
# The int64 payload of a step, in order: copy sources, copy destinations, then these inputs.
_PACKED = ("input_ids", "position_ids", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
           "logits_indices")
_DTYPES = {"input_ids": torch.long, "position_ids": torch.long}   # the others are int32


def _broadcast(group: TPGroup, tensor: torch.Tensor, what: str) -> torch.Tensor:
    import torch.distributed as dist

    collective(group, what, dist.broadcast, tensor, 0)
    return tensor


def _forward(group: TPGroup, graph: fx.GraphModule, inputs: dict, step: int) -> torch.Tensor:
    return collective(group, f"step {step}'s forward (its all-reduces)", lambda: graph(**inputs)[0])


class LeadRunner(PagedRunner):
    """Rank 0's runner: a PagedRunner whose every step is first broadcast to the other ranks.
    It runs eagerly (no CUDA graphs yet: the followers would need the same batch state)."""

    def __init__(self, gm: fx.GraphModule, geometry: KVGeometry, num_blocks: int, device, group: TPGroup,
                 dtype=None):
        super().__init__(gm, geometry, num_blocks, device, dtype)
        self.group = group
        self.steps = 0
        self._copies: list[tuple[int, int]] = []
        self._idle_every = timeout_seconds() / 4
        self._send([SETUP, num_blocks])

    def _send(self, values: list[int]) -> None:
        header = torch.zeros(HEADER, dtype=torch.long, device=self.device)
        header[:len(values)] = torch.tensor(values, dtype=torch.long)
        _broadcast(self.group, header, f"the header of step {self.steps}")
        self._sent = time.monotonic()

    def idle(self) -> None:
        """Call while there is nothing to step (as often as liked): an IDLE header once a
        quarter of the timeout has passed since the last header. It raises
        TensorParallelError, like a step, once a follower is gone."""
        if time.monotonic() - self._sent >= self._idle_every:
            self._send([IDLE])

    def capture_graphs(self, *args, **kwargs) -> None:
        raise ValueError("tensor-parallel engines run their steps eagerly (CUDA graphs need every rank's "
                         "batch state; not done yet)")

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        super().copy_blocks(copies)
        self._copies += copies

    @torch.no_grad()
    def forward(self, entries: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        n, num_tokens = len(entries[0]), sum(entries[2])
        device_entries = staged([v for col in entries for v in col], torch.int32, self.device).view(4, n)
        inputs = self.batch.step_inputs(device_entries, num_tokens, self.kv_pool)
        copies = torch.tensor(self._copies, dtype=torch.long, device=self.device).view(-1, 2).t().reshape(-1)
        parts = [copies] + [inputs[name].reshape(-1).long() for name in _PACKED]
        payload = torch.cat(parts)
        tables = inputs["block_tables"]
        self._send([STEP, len(self._copies), num_tokens, tables.shape[0], tables.shape[1],
                    inputs["logits_indices"].numel(), payload.numel(), self.steps])
        _broadcast(self.group, payload, f"the inputs of step {self.steps}")
        self._copies = []
        logits = _forward(self.group, self.step_graph(), inputs, self.steps)
        self.steps += 1
        return logits, device_entries, False

    def stop(self) -> None:
        """Let the followers' ``follow`` return."""
        self._send([STOP])


def stop_followers(group: TPGroup, device) -> None:
    """Rank 0: end the other ranks' ``follow`` loops (no engine needed)."""
    header = torch.zeros(HEADER, dtype=torch.long, device=device)
    _broadcast(group, header, "the stop header")


def _unpack(header: list[int], payload: torch.Tensor, pool: torch.Tensor) -> tuple[list, dict]:
    _, n_copies, T, N, M, R = header[:6]
    sizes = [2 * n_copies, T, T, T, N * M, N, N + 1, R]
    pieces = payload.split(sizes)
    copies = list(zip(pieces[0][:n_copies].tolist(), pieces[0][n_copies:].tolist()))
    shapes = {"input_ids": (1, T), "position_ids": (1, T), "block_tables": (N, M)}
    inputs = {name: piece.view(shapes.get(name, (-1,))).to(_DTYPES.get(name, torch.int32))
              for name, piece in zip(_PACKED, pieces[1:])}
    inputs["kv_pool"] = pool
    return copies, {name: inputs[name] for name in PAGED_INPUTS}


@torch.no_grad()
def follow(gm: fx.GraphModule, geometry: KVGeometry, device, group: TPGroup) -> int:
    """Ranks > 0: run rank 0's steps on this rank's graph and pool until it stops them;
    returns the number of steps run."""
    device = torch.device(device)
    runner, steps = None, 0
    while True:
        header = _broadcast(group, torch.zeros(HEADER, dtype=torch.long, device=device),
                            f"the header of step {steps}").tolist()
        if header[0] == STOP:
            return steps
        if header[0] == IDLE:
            continue
        if header[0] == SETUP:
            runner = PagedRunner(gm, geometry, header[1], device)
            continue
        if runner is None:
            raise RuntimeError(f"rank {group.rank}: a step arrived before its engine was set up")
        payload = _broadcast(group, torch.empty(header[6], dtype=torch.long, device=device),
                             f"the inputs of step {header[7]}")
        copies, inputs = _unpack(header, payload, runner.kv_pool)
        runner.copy_blocks(copies)
        _forward(group, runner.step_graph(), inputs, header[7])
        steps += 1
