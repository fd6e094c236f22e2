"""Continuous batching: which requests run in the next step, and how many tokens each.

A pure state machine over a ``BlockPool``; it never runs a model. The engine drives it:

    plan = scheduler.schedule()          # requests, token counts, block copies
    ... copy blocks, run the model on plan.requests / plan.counts, sample ...
    events = scheduler.update(plan, sampled)   # append tokens, finish, free blocks

Each step fits ``max_num_batched_tokens`` and ``max_num_seqs``:

    budget 8    | A decode | B decode | C prefill chunk (5 of 12) |
                     1          1               5           = 7 tokens, 1 left unused
                 decodes first, then running prefills, then waiting requests (FCFS)

A request's K/V live in its blocks; ``num_computed`` counts the tokens written there:

    tokens   [ p p p p | p p g g | g ]         p prompt, g generated (block_size 4)
    blocks   [    3    |    8    | 1 ]
    num_computed 8: the next step computes token 8 (a decode)

When the pool cannot give a running request its next block, the newest running request
is preempted: its blocks are freed and it waits at the head of the queue, to be
recomputed as one prefill of prompt + generated tokens. The oldest request always makes
progress, and a request that could never fit alone is rejected by ``add``.

With prefix caching, full blocks are cached under chained hashes once their K/V are
written; a request admitted later shares the leading blocks that match. At least its
last token is computed (its logits give the next token); when that token falls inside a
shared block, the block is copied to a fresh one first (copy-on-write: cached blocks
never change).
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fusegen.runtime.block_pool import BlockPool
from fusegen.runtime.prefix_cache import extend_hashes, match_prefix


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    sampling: Any = None                    # carried for the engine, never read here
    tokens: list[int] = field(default_factory=list)     # prompt + output
    output: list[int] = field(default_factory=list)
    num_computed: int = 0                   # tokens whose K/V are in ``blocks``
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)     # chained hashes of full blocks
    num_registered: int = 0                 # leading blocks offered to the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None        # "eos", "length" or "abort"
    num_preemptions: int = 0

    @property
    def remaining(self) -> int:
        """Tokens known but not yet in the cache."""
        return len(self.tokens) - self.num_computed


@dataclass
class StepPlan:
    """What one step computes: ``counts[i]`` tokens of ``requests[i]``, starting at its
    ``num_computed``. ``copies`` (src, dst) block copies must happen before the step."""
    requests: list[Request] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    def samples(self, i: int) -> bool:
        """Does entry ``i`` reach its request's last token (so its logits give a token)?"""
        req = self.requests[i]
        return req.num_computed + self.counts[i] == len(req.tokens)

    def _add(self, req: Request, count: int) -> None:
        self.requests.append(req)
        self.counts.append(count)

    def _drop(self, req: Request) -> None:
        for i, r in enumerate(self.requests):
            if r is req:
                del self.requests[i], self.counts[i]
                return


class TokenEvent(NamedTuple):
    request_id: int
    token: int
    finished: bool


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 enable_prefix_caching: bool = True):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError(f"Scheduler needs max_num_batched_tokens >= 1 and max_num_seqs >= 1, "
                             f"got {max_num_batched_tokens} and {max_num_seqs}")
        self.pool = pool
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Request] = deque()
        # Always sorted by arrival: admission is FCFS and preempted requests wait at the
        # head, so every running request is older than every waiting one.
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}      # unfinished requests by id
        self.stats: Counter = Counter()
        self._next_id = 0

    # --- requests -----------------------------------------------------------------------

    def add(self, prompt: list[int], max_new_tokens: int, eos_token_ids=(), sampling: Any = None) -> Request:
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # The last generated token is never written to the cache.
        need = self.pool.blocks_for(len(prompt) + max_new_tokens - 1)
        if need > self.pool.num_blocks:
            raise ValueError(f"request of {len(prompt)} prompt + {max_new_tokens} new tokens needs "
                             f"{need} blocks of {self.pool.block_size} tokens; the pool has "
                             f"{self.pool.num_blocks}")
        req = Request(self._next_id, list(prompt), max_new_tokens, frozenset(eos_token_ids), sampling,
                      tokens=list(prompt))
        self._next_id += 1
        self.requests[req.request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: int) -> None:
        """Drop an unfinished request and free its blocks (not between schedule and update)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            raise ValueError(f"no unfinished request {request_id} ({len(self.requests)} unfinished)")
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        else:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, "abort"

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- one step -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        decodes = [r for r in self.running if r.remaining == 1]
        prefills = [r for r in self.running if r.remaining > 1]
        for req in decodes + prefills:
            budget = self.max_num_batched_tokens - plan.num_tokens
            if budget == 0:
                break
            if req.status is Status.RUNNING:
                self._schedule_running(req, min(req.remaining, budget), plan)
        if not plan.preempted:   # just ran out of blocks: admitting now would only thrash
            self._admit_waiting(plan)
        self.stats["steps"] += 1
        self.stats["scheduled_tokens"] += plan.num_tokens
        self.stats["prefill_chunks_cut"] += sum(c < r.remaining for r, c in zip(plan.requests, plan.counts))
        return plan

    def _schedule_running(self, req: Request, count: int, plan: StepPlan) -> None:
        while not self._grow(req, req.num_computed + count):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                return
        plan._add(req, count)

    def _admit_waiting(self, plan: StepPlan) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            budget = self.max_num_batched_tokens - plan.num_tokens
            if budget == 0:
                return
            req = self.waiting[0]
            count = self._admit(req, budget, plan)
            if count is None:
                return   # FCFS: nobody overtakes the head
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            plan._add(req, count)

    def _admit(self, req: Request, budget: int, plan: StepPlan) -> int | None:
        """Give ``req`` its shared prefix and the blocks of its first chunk; the chunk's
        size, or None when the pool cannot provide them (nothing taken)."""
        bs, hit = self.pool.block_size, []
        if self.enable_prefix_caching:
            extend_hashes(req.hashes, req.tokens, bs, len(req.tokens))
            hit = match_prefix(self.pool, req.hashes)
        while True:
            start = min(len(hit) * bs, len(req.tokens) - 1)   # compute >= 1 token for logits
            cow = start < len(hit) * bs
            count = min(len(req.tokens) - start, budget)
            fresh = self.pool.blocks_for(start + count) - len(hit) + cow
            taken = sum(1 for b in hit if self.pool.ref_count(b) == 0)
            if fresh + taken <= self.pool.num_free:
                break
            if not cow:
                return None
            hit = hit[:-1]   # no room for the copy: recompute that block instead
        self.pool.share(hit)
        req.blocks = list(hit)
        if cow:
            (dst,) = self.pool.allocate(1)
            plan.copies.append((hit[-1], dst))
            self.pool.free([hit[-1]])
            req.blocks[-1] = dst
            self.stats["cow_copies"] += 1
        self.stats["prefix_hit_blocks"] += len(hit)
        self.stats["prefix_hit_tokens"] += start
        req.num_computed = start
        req.num_registered = len(hit) - cow
        self._grow(req, start + count)
        return count

    def _grow(self, req: Request, total: int) -> bool:
        need = self.pool.blocks_for(total) - len(req.blocks)
        if need <= 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        req.blocks.extend(got)
        self.stats["blocks_allocated"] += need
        return True

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        plan._drop(req)
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req.request_id)
        self.stats["preemptions"] += 1

    def _release(self, req: Request) -> None:
        # Tail first: the free list evicts least recently freed blocks first, and a
        # prefix's head is the part other requests are likeliest to share.
        self.pool.free(req.blocks[::-1])
        req.blocks, req.num_registered = [], 0

    # --- after the step -----------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: list[int | None]) -> list[TokenEvent]:
        """Record the step: ``sampled[i]`` is the token for entry ``i`` if it samples
        (``plan.samples(i)``), else None. Returns one event per new token."""
        if len(sampled) != len(plan.requests):
            raise ValueError(f"update got {len(sampled)} sampled tokens for a plan of "
                             f"{len(plan.requests)} requests")
        events = []
        for i, (req, count) in enumerate(zip(plan.requests, plan.counts)):
            if req.status is not Status.RUNNING:
                continue   # aborted during the step
            samples = plan.samples(i)
            if samples != (sampled[i] is not None):
                raise ValueError(f"request {req.request_id}: entry {i} computes tokens "
                                 f"{req.num_computed}..{req.num_computed + count} of "
                                 f"{len(req.tokens)}, so it {'needs' if samples else 'takes no'} "
                                 f"sampled token, got {sampled[i]}")
            req.num_computed += count
            self._register_full_blocks(req)
            if samples:
                events.append(self._append(req, int(sampled[i])))
        return events

    def _register_full_blocks(self, req: Request) -> None:
        if not self.enable_prefix_caching:
            return
        full = req.num_computed // self.pool.block_size
        extend_hashes(req.hashes, req.tokens, self.pool.block_size, full * self.pool.block_size)
        for i in range(req.num_registered, full):
            self.pool.cache(req.blocks[i], req.hashes[i])
        req.num_registered = max(req.num_registered, full)

    def _append(self, req: Request, token: int) -> TokenEvent:
        req.tokens.append(token)
        req.output.append(token)
        if token in req.eos_token_ids:
            req.finish_reason = "eos"
        elif len(req.output) >= req.max_new_tokens:
            req.finish_reason = "length"
        if req.finish_reason:
            self.running.remove(req)
            self._release(req)
            req.status = Status.FINISHED
            del self.requests[req.request_id]
        return TokenEvent(req.request_id, token, req.finish_reason is not None)
