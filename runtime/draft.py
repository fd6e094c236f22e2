"""The draft-model proposer: a smaller compiled model with the target's vocabulary runs ahead
of it, with its own paged pool, batch rows and KV manager, k tokens per request and step.

    target tokens   [ p p p p g g t ]           t: the decode's input (the target's last token)
    draft K/V       [ p p p p g g ]             what the draft has not computed is its catch-up
    draft forwards  [t] -> d1,  d1 -> d2,  d2 -> d3          (k = 3, batched over the requests)
    verify step     d1 accepted, d2 rejected, x the target's correction
    target tokens   [ p p p p g g t d1 x ]
    draft K/V       [ p p p p g g t d1 d2 ]     at its next proposal the draft cuts its K/V back
                                                to the common prefix [.. t d1]; x is its catch-up

A request's draft state lives from its first proposal until the engine releases it
(finished, aborted, preempted: ``release``). When the draft's pool has no room, that
request's draft state is dropped and it decodes without proposals until there is.

Sampling: the draft draws d_j from its own distribution q_j (the request's temperature,
top-k, top-p and penalty applied to the draft's logits) with the counter-based uniform of
(seed ^ DRAFT_SALT, position), and keeps q_j for the verification (``distributions``),
which accepts d_j with probability min(1, p(d_j) / q_j(d_j)) and otherwise draws from the
normalised residual max(0, p - q_j) (speculative.rejection_sample). A greedy request's q is
one-hot, and acceptance is the longest prefix of argmax matches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from fusegen.runtime.batch import staged
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.paged import PagedRunner
from fusegen.runtime.sampling import SamplingRows, draw, probabilities, sample, uniform

DRAFT_SALT = 0x5DEECE66D     # the draft's draws use seed ^ DRAFT_SALT, not the target's uniforms


@dataclass
class _Draft:
    row: int
    tokens: list[int] = field(default_factory=list)   # tokens whose K/V the draft holds, in order
    synced: int = 0                                   # tokens[:synced] are the request's own
    q: list[torch.Tensor] = field(default_factory=list)   # q_j rows of its last proposal (sampling only)


class DraftProposer:
    overlaps = False   # proposes from every token of a request: the engine takes steps in flight first

    def __init__(self, runner: PagedRunner, k: int, max_num_seqs: int, max_model_len: int,
                 max_num_batched_tokens: int):
        if k < 1:
            raise ValueError(f"DraftProposer needs k >= 1, got {k}")
        self.runner, self.k, self.max_tokens = runner, k, max_num_batched_tokens
        self.kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
        self.batch = runner.allocate_batch(max_num_seqs, max_model_len)
        self._free_rows = list(range(max_num_seqs))[::-1]
        self._drafts: dict[int, _Draft] = {}
        self.stats: Counter = Counter()

    def release(self, request_id: int) -> None:
        """Forget a request's draft state and give back its row and blocks."""
        draft = self._drafts.pop(request_id, None)
        if draft is None:
            return
        if self.kv.holds(request_id):
            self.kv.free(request_id)
        self._free_rows.append(draft.row)

    def distributions(self, request_id: int) -> torch.Tensor | None:
        """[k', V]: the q_j its last proposal for a sampling request was drawn from."""
        draft = self._drafts.get(request_id)
        return torch.stack(draft.q) if draft is not None and draft.q else None

    @torch.no_grad()
    def propose(self, requests: list, caps: list[int]) -> list[list[int]]:
        """Up to ``caps[i]`` draft tokens for each request: one forward that catches every
        request up and draws d1, then one forward per further token."""
        out: list[list[int]] = [[] for _ in requests]
        work, first = self._catch_up(requests, caps)   # (index, request, draft, cap) drawing d1
        if not work:
            return out
        picks, lives = [first], [list(range(len(work)))]
        for j in range(2, max(cap for *_, cap in work) + 1):
            live = [w for w in lives[-1] if work[w][3] >= j]
            entries = [[work[w][2].row for w in live], [len(work[w][1].tokens) + j - 2 for w in live],
                       [1] * len(live), [1] * len(live)]
            picks.append(self._forward(entries, [work[w][1] for w in live], [work[w][2] for w in live]))
            lives.append(live)
        flat = torch.cat(picks).tolist()                  # the proposal's one host sync
        proposals, at = [[] for _ in work], 0
        for live in lives:
            for w in live:
                proposals[w].append(flat[at])
                at += 1
        for (i, req, draft, _), proposal in zip(work, proposals):
            out[i] = proposal
            draft.tokens = list(req.tokens) + proposal[:-1]    # the K/V the draft now holds
        self.stats["forwards"] += len(picks)
        self.stats["proposed"] += len(flat)
        return out

    def _catch_up(self, requests: list, caps: list[int]):
        """The first draft forward: every request's tokens the draft has not computed (within
        the token budget), sampling d1 for those it completes. Returns those as (index in
        ``requests``, request, draft state, cap) and their d1 tokens on the device."""
        entries: list[list[int]] = [[], [], [], []]
        reqs, drafts, work = [], [], []
        budget = self.max_tokens
        for i, (req, cap) in enumerate(zip(requests, caps)):
            L = len(req.tokens)
            cap = min(cap, self.batch.max_model_len - L)
            if budget == 0 or cap < 1 or req.num_pending:
                continue
            draft = self._draft(req)
            if draft is None:
                continue
            common = self._sync(req.request_id, draft, req.tokens)
            take = min(L - common, budget)
            done = common + take == L
            if not self._room(req, draft, L + cap - 1 if done else common + take):
                continue
            budget -= take
            self.batch.write_tokens([(draft.row, common, req.tokens[common:common + take])])
            draft.tokens, draft.synced, draft.q = list(req.tokens[:common + take]), common + take, []
            for col, value in zip(entries, (draft.row, common, take, int(done))):
                col.append(value)
            reqs.append(req)
            drafts.append(draft)
            if done:
                work.append((i, req, draft, cap))
        if not reqs:
            return [], None
        tokens = self._forward(entries, reqs, drafts)
        sampled = [e for e, s in enumerate(entries[3]) if s]
        first = tokens[staged(sampled, torch.long, tokens.device)] if sampled else tokens[:0]
        return work, first

    def _draft(self, req) -> _Draft | None:
        draft = self._drafts.get(req.request_id)
        if draft is None and self._free_rows:
            draft = self._drafts[req.request_id] = _Draft(self._free_rows.pop())
            self.batch.write_sampling([draft.row], [req.sampling])
        return draft

    def _sync(self, request_id: int, draft: _Draft, tokens: list[int]) -> int:
        """Cut the draft's K/V back to its longest common prefix with ``tokens`` (leaving at
        least the last token to compute, whose logits give d1); the prefix's length."""
        limit = min(len(draft.tokens), len(tokens) - 1)
        n = min(draft.synced, limit)
        while n < limit and draft.tokens[n] == tokens[n]:
            n += 1
        if n < len(draft.tokens):
            draft.tokens = draft.tokens[:n]
            if self.kv.holds(request_id):
                self.kv.shrink(request_id, n)
        draft.synced = n
        return n

    def _room(self, req, draft: _Draft, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` of the request's draft K/V, their ids in the draft's
        block table; False (and the draft state dropped) when the pool has too few."""
        rid = req.request_id
        if not self.kv.holds(rid) and self.kv.admit(rid, req.tokens, 1) is None \
                or self.kv.grow(rid, num_tokens) is None:
            self.release(rid)
            self.stats["no_blocks"] += 1
            return False
        first, new = self.kv.take_new(rid)
        if new:
            self.batch.write_blocks([(draft.row, first, new)])
        return True

    def _forward(self, entries: list[list[int]], reqs: list, drafts: list[_Draft]) -> torch.Tensor:
        """One draft step over ``entries``: each sampling entry's token (device, [N]), put in
        the draft's token rows where the next forward reads it; for sampling requests the
        distribution it was drawn from is kept."""
        n = len(entries[0])
        logits, device_entries, _ = self.runner.forward(entries)
        logits, device_entries = logits[:n], device_entries[:, :n]
        params = [r.sampling for r in reqs]
        any_random = any(not p.greedy for p in params)
        any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        if not (any_random or any_penalty):
            return self.batch.record_greedy(device_entries, logits)
        b = self.batch
        rows = device_entries[0].long()
        lengths = (device_entries[1] + device_entries[2]).long()
        rows_params = SamplingRows(b.temperature[rows], b.top_k[rows], b.top_p[rows], b.repetition_penalty[rows],
                                   b.seed[rows] ^ DRAFT_SALT, lengths, any_random=any_random,
                                   any_penalty=any_penalty)
        history = b.history(rows) if any_penalty else None
        if any_random:
            q = probabilities(logits, rows_params, history, lengths)
            tokens = draw(q, uniform(rows_params.seed, lengths))
            for e, (p, draft) in enumerate(zip(params, drafts)):
                if entries[3][e] and not p.greedy:
                    draft.q.append(q[e])
        else:
            tokens = sample(logits, rows_params, history, lengths)
        self.batch.record_sampled(device_entries, tokens)
        return tokens
