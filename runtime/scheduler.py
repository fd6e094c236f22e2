"""Continuous batching: which requests run in the next step, and how many tokens each.

A pure state machine over a ``KVCacheManager``; it never runs a model. The engine drives it:

    plan = scheduler.schedule()          # requests, token counts, new block ids, copies
    ... copy blocks, run the model on the plan's entries, sample ...
    events = scheduler.update(plan, sampled)   # append tokens, finish, free blocks

Plans may run ahead of their results by one step (overlapped scheduling): ``schedule``
advances each entry's ``num_computed`` at once and counts a token it samples as *pending*
until ``update`` brings it. A decode whose input is a pending token reads it on the device,
where the previous step left it. A request whose pending tokens reach ``max_new_tokens`` is
not scheduled again; one that sampled eos may compute one more token, which ``update``
drops (it is never returned).

Each step fits ``max_num_batched_tokens`` and ``max_num_seqs``:

    budget 8    | A decode | B decode | C prefill chunk (5 of 12) |
                     1          1               5           = 7 tokens, 1 left unused
                 decodes first, then running prefills, then waiting requests (FCFS)

A request's K/V live in its blocks; ``num_computed`` counts the tokens scheduled there:

    tokens   [ p p p p | p p g g ] + 1 pending      p prompt, g generated (block_size 4)
    blocks   [    3    |    8    | 1 ]
    num_computed 8, one token pending (sampled by the step in flight): the next step
    computes token 8, the pending one, whose id only the device holds so far

When the pool cannot give a running request its next block, the newest running request
is preempted: its blocks are freed and it waits at the head of the queue, to be
recomputed as one prefill of prompt + generated tokens. The oldest request always makes
progress, and a request that could never fit alone is rejected by ``add``.

With a proposer (speculative decoding, see speculative.py), a decode entry carries the
tokens it proposes after its input token and computes them all in one step:

    tokens   [ ... t ] d1 d2 d3       entry: start c (t's position), count 1 + 3
    update   t -> x0 = d1, x1 = d2, x2 != d3: d1 d2 accepted, x2 the correction
             3 new tokens; num_computed c + 4 -> c + 3 (d3's slot rolled back, blocks
             past c + 3 tokens freed)

Proposals never cost another request its blocks (no preemption for them) and never take a
request past ``max_new_tokens``; ``update`` appends accepted tokens one by one, so eos or the
length limit inside an accepted run ends the request there.

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

from fusegen.runtime.kv_manager import KVCacheManager


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
    tokens: list[int] = field(default_factory=list)     # prompt + output known on the host
    output: list[int] = field(default_factory=list)
    num_computed: int = 0                   # tokens scheduled into the cache
    num_pending: int = 0                    # sampled by steps whose results have not come
    status: Status = Status.WAITING
    finish_reason: str | None = None        # "eos", "length" or "abort"
    num_preemptions: int = 0
    logprobs: int = 0                       # > 0: report the chosen token's log-prob and this many top ones
    spec: Any = None                        # the proposer's own state for this request, never read here

    @property
    def remaining(self) -> int:
        """Tokens known or pending but not yet scheduled into the cache."""
        return len(self.tokens) + self.num_pending - self.num_computed

    @property
    def out_of_budget(self) -> bool:
        """Every token it may generate is out or pending: nothing more to schedule."""
        return len(self.output) + self.num_pending >= self.max_new_tokens


class TableUpdate(NamedTuple):
    """Block ids to write into the request's block-table row from column ``first`` on."""
    request_id: int
    first: int
    blocks: list[int]


@dataclass
class StepPlan:
    """What one step computes: ``counts[i]`` tokens of ``requests[i]`` starting at position
    ``starts[i]``; ``sampling[i]``: the entry's last token gives a new token. ``admitted``
    entered RUNNING in this plan (their block-table rows start empty), ``tables`` are the
    block ids the runner has not seen, ``copies`` (src, dst) block copies come first.
    ``proposals[i]``: tokens the entry computes after its input token to verify them (the
    last ``len(proposals[i])`` of its ``counts[i]``; empty without speculation)."""
    requests: list[Request] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    proposals: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    sampling: list[bool] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    tables: list[TableUpdate] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    @property
    def num_proposed(self) -> int:
        return sum(len(p) for p in self.proposals)

    def _add(self, req: Request, count: int, proposal: list[int] | None = None) -> None:
        self.requests.append(req)
        self.counts.append(count)
        self.proposals.append(proposal or [])

    def _drop(self, req: Request) -> None:
        for i, r in enumerate(self.requests):
            if r is req:
                del self.requests[i], self.counts[i], self.proposals[i]
                return


class TokenLogprob(NamedTuple):
    """The model's log-probability of the chosen token, and the most likely tokens as
    (token id, log-prob) pairs, best first."""
    logprob: float
    top: tuple[tuple[int, float], ...]


class TokenEvent(NamedTuple):
    request_id: int
    token: int
    finished: bool
    logprob: TokenLogprob | None = None   # for requests that asked for log-probs


class Scheduler:
    """``proposer`` (optional): an object with ``k`` (most tokens it proposes per request and
    step) and ``propose(requests, caps) -> list[list[int]]`` giving each decode request at
    most ``caps[i]`` tokens to verify after its input token (see speculative.py)."""

    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 proposer: Any = None):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError(f"Scheduler needs max_num_batched_tokens >= 1 and max_num_seqs >= 1, "
                             f"got {max_num_batched_tokens} and {max_num_seqs}")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        # Always sorted by arrival: admission is FCFS and preempted requests wait at the
        # head, so every running request is older than every waiting one.
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}      # unfinished requests by id
        self.stats: Counter = kv.stats
        self.proposer = proposer
        self._next_id = 0

    # --- requests -----------------------------------------------------------------------

    def add(self, prompt: list[int], max_new_tokens: int, eos_token_ids=(), sampling: Any = None) -> Request:
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # The last generated token is never written to the cache.
        need = self.kv.blocks_for(len(prompt) + max_new_tokens - 1)
        if need > self.kv.num_blocks:
            raise ValueError(f"request of {len(prompt)} prompt + {max_new_tokens} new tokens needs "
                             f"{need} blocks of {self.kv.block_size} tokens; the pool has "
                             f"{self.kv.num_blocks}")
        req = Request(self._next_id, list(prompt), max_new_tokens, frozenset(eos_token_ids), sampling,
                      tokens=list(prompt))
        self._next_id += 1
        self.requests[req.request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: int) -> None:
        """Drop an unfinished request and free its blocks. Allowed while plans are in
        flight: their entries for it are ignored by ``update``."""
        req = self.requests.pop(request_id, None)
        if req is None:
            raise ValueError(f"no unfinished request {request_id} ({len(self.requests)} unfinished)")
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.kv.free(request_id)
        else:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, "abort"
        self.stats["aborted"] += 1

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- one step -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        active = [r for r in self.running if not r.out_of_budget]
        decodes = [r for r in active if r.remaining == 1]
        prefills = [r for r in active if r.remaining > 1]
        proposals = self._propose(decodes)
        for req in decodes + prefills:
            budget = self.max_num_batched_tokens - plan.num_tokens
            if budget == 0:
                break
            if req.status is Status.RUNNING:
                proposal = proposals.get(req.request_id, [])[:budget - 1]
                if not (proposal and self._schedule_proposal(req, proposal, plan)):
                    self._schedule_running(req, min(req.remaining, budget), plan)
        if not plan.preempted:   # just ran out of blocks: admitting now would only thrash
            self._admit_waiting(plan)
        self._finalize(plan)
        self.stats["steps"] += bool(plan.requests)
        self.stats["scheduled_tokens"] += plan.num_tokens
        return plan

    def _propose(self, decodes: list[Request]) -> dict[int, list[int]]:
        """The proposer's tokens for each decode, within the token budget (every decode keeps
        its one token; proposals take what is left, oldest request first) and within the
        request's ``max_new_tokens`` (the step yields at most 1 + len(proposal) tokens)."""
        if self.proposer is None or not decodes:
            return {}
        spare = self.max_num_batched_tokens - len(decodes)
        caps = []
        for req in decodes:
            cap = max(0, min(self.proposer.k, spare,
                             req.max_new_tokens - len(req.output) - req.num_pending - 1))
            caps.append(cap)
            spare -= cap
        if not any(caps):
            return {}
        chosen = [(r, c) for r, c in zip(decodes, caps) if c]
        proposed = self.proposer.propose([r for r, _ in chosen], [c for _, c in chosen])
        out = {}
        for (req, cap), tokens in zip(chosen, proposed):
            if len(tokens) > cap:
                raise ValueError(f"request {req.request_id}: the proposer gave {len(tokens)} tokens, "
                                 f"at most {cap} were asked for")
            if tokens:
                out[req.request_id] = list(tokens)
        return out

    def _schedule_proposal(self, req: Request, proposal: list[int], plan: StepPlan) -> bool:
        """Schedule a decode with its proposal if the pool has the blocks now (False: it
        does not, and nothing was taken; speculation never preempts)."""
        if self.kv.grow(req.request_id, req.num_computed + 1 + len(proposal)) is None:
            self.stats["spec_no_blocks"] += 1
            return False
        plan._add(req, 1 + len(proposal), proposal)
        return True

    def _schedule_running(self, req: Request, count: int, plan: StepPlan) -> None:
        while self.kv.grow(req.request_id, req.num_computed + count) is None:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                return
        plan._add(req, count)

    def _admit_waiting(self, plan: StepPlan) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            budget = self.max_num_batched_tokens - plan.num_tokens
            req = self.waiting[0]
            if budget == 0 or req.num_pending:   # FCFS: nobody overtakes the head
                return
            admission = self.kv.admit(req.request_id, req.tokens, budget)
            if admission is None:
                return
            self.waiting.popleft()
            req.status, req.num_computed = Status.RUNNING, admission.start
            self.running.append(req)
            plan.copies.extend(admission.copies)
            plan.admitted.append(req)
            plan._add(req, admission.count)

    def _finalize(self, plan: StepPlan) -> None:
        """Advance every entry's request past the tokens it computes (the plan's results
        come later) and collect the block ids the runner has not seen."""
        for req, count, proposal in zip(plan.requests, plan.counts, plan.proposals):
            samples = req.num_computed + count - len(proposal) == len(req.tokens) + req.num_pending
            plan.starts.append(req.num_computed)
            plan.sampling.append(samples)
            self.stats["prefill_chunks_cut"] += not samples
            req.num_computed += count
            req.num_pending += samples
            first, new = self.kv.take_new(req.request_id)
            if new:
                plan.tables.append(TableUpdate(req.request_id, first, new))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        plan._drop(req)
        self.kv.free(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req.request_id)
        self.stats["preemptions"] += 1

    # --- after the step -----------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: list) -> list[TokenEvent]:
        """Record a step's results, in plan order: ``sampled[i]`` is the token of entry ``i``
        if it samples, else None; for an entry with a proposal, the list of its new tokens
        (the accepted proposed tokens, then the target's own). Returns one event per new
        token."""
        if len(sampled) != len(plan.requests):
            raise ValueError(f"update got {len(sampled)} sampled tokens for a plan of "
                             f"{len(plan.requests)} requests")
        events = []
        for i, req in enumerate(plan.requests):
            if plan.sampling[i] != (sampled[i] is not None):
                raise ValueError(f"request {req.request_id}: entry {i} computes tokens "
                                 f"{plan.starts[i]}..{plan.starts[i] + plan.counts[i]}, so it "
                                 f"{'needs a' if plan.sampling[i] else 'takes no'} sampled token, "
                                 f"got {sampled[i]}")
            if plan.proposals[i]:
                events += self._update_speculative(plan, i, list(sampled[i]))
                continue
            if req.status is Status.FINISHED:
                continue   # aborted, or finished while this step was in flight: dropped
            if req.status is Status.RUNNING:
                self.kv.commit(req.request_id, req.tokens, plan.starts[i] + plan.counts[i])
            if plan.sampling[i]:
                req.num_pending -= 1
                events.append(self._append(req, int(sampled[i])))
        return events

    def _update_speculative(self, plan: StepPlan, i: int, new: list[int]) -> list[TokenEvent]:
        """A verified entry: roll back the slots of its rejected tokens, then append the new
        tokens up to eos or the length limit."""
        req, proposal = plan.requests[i], plan.proposals[i]
        accepted = len(new) - 1
        if not 0 <= accepted <= len(proposal) or new[:accepted] != proposal[:accepted]:
            raise ValueError(f"request {req.request_id}: entry {i} proposed {proposal}, so its new "
                             f"tokens must be an accepted prefix of it and one token more, got {new}")
        if req.status is Status.FINISHED:
            return []
        end = plan.starts[i] + plan.counts[i]
        if req.status is Status.RUNNING and req.num_computed == end:
            req.num_computed = end - (len(proposal) - accepted)
            self.kv.shrink(req.request_id, req.num_computed)
        req.num_pending -= 1
        events = []
        for token in new:
            events.append(self._append(req, int(token)))
            if req.status is Status.FINISHED:
                return events
        if req.status is Status.RUNNING:
            self.kv.commit(req.request_id, req.tokens, req.num_computed)
        return events

    def _append(self, req: Request, token: int) -> TokenEvent:
        req.tokens.append(token)
        req.output.append(token)
        if token in req.eos_token_ids:
            req.finish_reason = "eos"
        elif len(req.output) >= req.max_new_tokens:
            req.finish_reason = "length"
        if req.finish_reason:
            if req.status is Status.RUNNING:
                self.running.remove(req)
                self.kv.free(req.request_id)
            else:   # preempted while its token was in flight
                self.waiting.remove(req)
            req.status = Status.FINISHED
            del self.requests[req.request_id]
        return TokenEvent(req.request_id, token, req.finish_reason is not None)
