"""The serving loop: a Scheduler deciding, a PagedRunner computing, ``sample`` choosing.

    engine = Engine(runner, eos_token_ids=[2], max_num_batched_tokens=256, max_num_seqs=32)
    rid = engine.add_request([1, 5, 9], max_new_tokens=16, temperature=0.7, seed=0)
    while engine.has_unfinished():
        for request_id, token, finished in engine.step():
            ...

One ``step``: schedule -> copy-on-write block copies -> one packed forward of every
scheduled chunk -> sample the rows whose chunk ends its request's known tokens ->
update the scheduler. Requests can be added between steps at any time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fusegen.runtime.paged import PagedRunner, Sequence
from fusegen.runtime.sampling import SamplingParams, sample
from fusegen.runtime.scheduler import Scheduler, StepPlan, TokenEvent


class Engine:
    def __init__(self, runner: PagedRunner, eos_token_ids=(), max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None):
        self.runner = runner
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(int(e) for e in eos_token_ids)
        self.scheduler = Scheduler(runner.pool, max_num_batched_tokens, max_num_seqs,
                                   enable_prefix_caching)
        self._seqs: dict[int, Sequence] = {}
        self._generators: dict[int, torch.Generator | None] = {}

    @property
    def stats(self):
        return self.scheduler.stats

    def add_request(self, prompt: list[int], max_new_tokens: int = 16, *, eos_token_ids=None,
                    **sampling) -> int:
        """Queue a request; ``sampling`` are ``SamplingParams`` fields (temperature, top_k,
        top_p, repetition_penalty, seed). Returns its request id."""
        params = SamplingParams(**sampling)
        if self.max_model_len is not None and len(prompt) + max_new_tokens > self.max_model_len:
            raise ValueError(f"prompt + max_new_tokens = {len(prompt)} + {max_new_tokens} exceeds "
                             f"max_model_len={self.max_model_len}")
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        req = self.scheduler.add([int(t) for t in prompt], max_new_tokens, eos, params)
        self._seqs[req.request_id] = Sequence(list(req.tokens))
        self._generators[req.request_id] = params.generator(self.runner.device)
        return req.request_id

    def abort(self, request_id: int) -> None:
        self.scheduler.abort(request_id)
        self._forget(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Run one scheduled step; the tokens it produced as (request id, token, finished)."""
        plan = self.scheduler.schedule()
        if not plan.requests:
            if self.scheduler.has_unfinished():
                raise RuntimeError(f"scheduler planned nothing for {len(self.scheduler.requests)} "
                                   f"unfinished requests ({self.runner.pool.num_free} blocks free)")
            return []
        self.runner.copy_blocks(plan.copies)
        seqs = [self._sync(req) for req in plan.requests]
        logits = self.runner.step(seqs, plan.counts, last_only=True)
        rows = [i for i in range(len(plan.requests)) if plan.samples(i)]
        sampled: list[int | None] = [None] * len(plan.requests)
        if rows:
            for i, token in zip(rows, self._sample(plan, rows, logits).tolist()):
                sampled[i] = token
        events = self.scheduler.update(plan, sampled)
        for event in events:
            if event.finished:
                self._forget(event.request_id)
        return events

    def _sync(self, req) -> Sequence:
        """The runner's view of ``req``: its tokens, blocks and cached count this step."""
        seq = self._seqs[req.request_id]
        for token in req.tokens[len(seq.tokens):]:
            seq.append(token)
        seq.num_cached = req.num_computed
        seq.blocks = req.blocks
        return seq

    def _sample(self, plan: StepPlan, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        last = logits[torch.tensor(rows, device=logits.device)]  # [N, V]: each sequence's last token
        reqs = [plan.requests[i] for i in rows]
        params = [r.sampling for r in reqs]
        history = [r.tokens for r in reqs] if any(p.repetition_penalty != 1 for p in params) else None
        return sample(last, params, [self._generators[r.request_id] for r in reqs], history)

    def _forget(self, request_id: int) -> None:
        self._seqs.pop(request_id, None)
        self._generators.pop(request_id, None)

    # --- conveniences -------------------------------------------------------------------

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 16,
                       **sampling) -> list[list[int]]:
        """New tokens of each prompt (eos included when it stopped there). Other requests
        already in the engine keep running alongside."""
        ids = [self.add_request(p, max_new_tokens, **sampling) for p in prompts]
        outputs = {rid: [] for rid in ids}
        pending = set(ids)
        while pending:
            for rid, token, finished in self.step():
                if rid in outputs:
                    outputs[rid].append(token)
                    if finished:
                        pending.discard(rid)
        return [outputs[rid] for rid in ids]

    def stream(self, prompt: list[int], max_new_tokens: int = 16, **sampling) -> Iterator[int]:
        """Yield the new tokens of one request as they are produced; closing the iterator
        early aborts the request."""
        rid = self.add_request(prompt, max_new_tokens, **sampling)
        finished = False
        try:
            while not finished:
                for event in self.step():
                    if event.request_id == rid:
                        finished = event.finished
                        yield event.token
        finally:
            if not finished and rid in self.scheduler.requests:
                self.abort(rid)
