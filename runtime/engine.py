"""The serving loop: a Scheduler deciding, a PagedRunner computing, ``sample`` choosing, with
the host one step ahead of the GPU.

    engine = Engine(runner, eos_token_ids=[2], max_num_batched_tokens=256, max_num_seqs=32)
    rid = engine.add_request([1, 5, 9], max_new_tokens=16, temperature=0.7, seed=0)
    while engine.has_unfinished():
        for request_id, token, finished in engine.step():
            ...

One ``step`` (overlapped, the default):

    host   schedule N+1 | launch N+1 | wait for N's tokens | update with N | return N's events
    GPU    ...... step N ...........|........ step N+1 ............................

Launching a step: assign batch rows to admitted requests and write their tokens and
sampling parameters, append new block ids to the device block table, copy-on-write
copies, one packed forward (a CUDA graph where one fits), sampling on the device, the
sampled tokens scattered into the device token rows (the next step's decodes read them
there) and copied to pinned host memory behind an event. The host reads them one step
later. With ``overlap=False`` each step waits for its own tokens.

With a proposer (speculative decoding, speculative.py), a decode may carry proposed tokens;
its step verifies them and yields 1 + accepted tokens. Such a step is not left in flight:
the next plan needs its acceptance (the sequence's length), so a speculating step waits for
its own tokens, like ``overlap=False``. Steps without proposals stay overlapped, and the
prompt-lookup proposer proposes while a step is in flight (``NgramProposer.overlaps``); a
proposer that needs every token on the host (the draft model) has the engine take the step
in flight before it schedules.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from fusegen.errors import RequestAbortedError, RequestFailedError
from fusegen.runtime.batch import staged
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.outputs import RequestOutput
from fusegen.runtime.paged import PagedRunner
from fusegen.runtime.requests import count, token_ids, token_list
from fusegen.runtime.sampling import SamplingParams, SamplingRows, probabilities, sample, uniform
from fusegen.runtime.scheduler import Scheduler, StepPlan, TokenEvent, TokenLogprob
from fusegen.runtime.speculative import ACCEPT_SALT, accepted_prefix, rejection_sample, split_entries

log = logging.getLogger("fusegen.engine")

MAX_LOGPROBS = 20   # most likely tokens a request may ask to see per position


@dataclass
class StepRecord:
    """One launched step: its shape, the host time it cost and the GPU time it took."""
    kind: str                   # "decode", "prefill" or "mixed"
    num_tokens: int
    num_seqs: int
    graph: bool
    host_ms: float = 0.0        # time in step() for this step, waiting for the GPU excluded
    gpu_ms: float | None = None  # between events around its GPU work, once finished
    proposed: int = 0           # speculative tokens it verified
    speculating: int = 0        # ... for this many sequences
    accepted: int = 0           # ... and accepted (known once finished)


@dataclass
class _InFlight:
    plan: StepPlan
    tokens: torch.Tensor        # sampled ids, pinned host memory (valid after ``done``)
    done: object                # CUDA event, or None on CPU
    start: object
    record: StepRecord
    logprobs: torch.Tensor | None = None   # [entries, 1 + 2k]: chosen, then k (id, log-prob) pairs
    offsets: list[int] | None = None       # each plan entry's first runner entry (speculating ones split)


class Engine:
    def __init__(self, runner: PagedRunner, eos_token_ids=(), max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, overlap: bool = True, vocab_size: int | None = None,
                 proposer=None):
        self.runner = runner
        self.vocab_size = vocab_size if vocab_size is not None else runner.vocab_size
        self.max_model_len = max_model_len
        self.overlap = overlap
        self.eos_token_ids = frozenset(token_ids(eos_token_ids, vocab_size, "eos_token_ids"))
        self.kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_batched_tokens, max_num_seqs, proposer)
        longest = max_model_len or runner.num_blocks * runner.block_size
        self.batch = runner.allocate_batch(max_num_seqs, longest)
        self._free_rows = list(range(self.batch.max_rows))[::-1]
        self._rows: dict[int, int] = {}
        self._inflight: _InFlight | None = None
        self._timed = runner.device.type == "cuda"
        self.step_log: list[StepRecord] = []
        self._lock = threading.RLock()
        self._outputs: dict[int, RequestOutput] = {}
        self._unclaimed: list[TokenEvent] = []
        self.failures: deque[tuple[int, BaseException]] = deque(maxlen=1000)   # unsubscribed ones

    @property
    def stats(self):
        """Counters: steps, tokens, preemptions, prefix hits, and with speculation
        ``spec_steps``, ``spec_proposed``, ``spec_accepted`` (``step_log`` has them per step)."""
        return self.scheduler.stats

    @property
    def proposer(self):
        """The speculative proposer (None: plain decoding); may be swapped between steps."""
        return self.scheduler.proposer

    @proposer.setter
    def proposer(self, proposer) -> None:
        with self._lock:
            self.scheduler.proposer = proposer

    @property
    def setup(self) -> dict:
        """CUDA-graph capture: seconds, memory, buckets (and those captured so far: all of
        them unless capture is lazy), and the skinny-GEMM choice per linear shape and batch
        (empty without graphs)."""
        g = self.runner.graphs
        if g is None:
            return {"capture_s": 0.0, "graph_memory_bytes": 0, "graphs": 0, "buckets": [], "captured": [],
                    "lazy": False, "gemm": [], "gemm_fusion": {}, "pdl": False}
        gemm = [{"M": c.M, "N": c.N, "K": c.K, "weights": c.fmt, "kernel": c.kernel, "us": c.us,
                 "cublas_us": c.cublas_us, "template_us": c.template_us} for c in self.runner.gemm_choices]
        return {"capture_s": g.capture_s, "graph_memory_bytes": g.memory_bytes,
                "graphs": len(g.graphs), "buckets": g.buckets, "captured": g.captured, "lazy": g.lazy,
                "gemm": gemm, "gemm_fusion": self.runner.gemm_fusion,
                "pdl": self.runner.pdl}

    def add_request(self, prompt: list[int], max_new_tokens: int = 16, *, eos_token_ids=None,
                    logprobs: int = 0, **sampling) -> int:
        """Queue a request; ``sampling`` are ``SamplingParams`` fields (temperature, top_k,
        top_p, repetition_penalty, seed). ``logprobs=k`` (1..20) puts the model's log-prob of
        each chosen token and its k most likely tokens into the request's events. Returns
        its request id. Bad input raises ``ValueError`` naming the argument, and nothing is
        queued."""
        return self.add_requests([prompt], max_new_tokens, eos_token_ids=eos_token_ids, logprobs=logprobs,
                                 **sampling)[0]

    def add_requests(self, prompts: list, max_new_tokens: int = 16, *, eos_token_ids=None,
                     logprobs: int = 0, **sampling) -> list[int]:
        """Queue several requests with the same settings, all or none: every prompt is
        checked before the first is queued."""
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of token lists, got {type(prompts).__name__}"
                             + (" (empty)" if isinstance(prompts, (list, tuple)) else ""))
        checked = [self._check(p, max_new_tokens, f"prompts[{i}]") for i, p in enumerate(prompts)]
        new = count(max_new_tokens, "max_new_tokens")
        eos = self.eos_token_ids if eos_token_ids is None else \
            frozenset(token_ids(eos_token_ids, self.vocab_size, "eos_token_ids"))
        params = SamplingParams(**sampling)
        if logprobs:
            count(logprobs, "logprobs")
            if logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be <= {MAX_LOGPROBS}, got {logprobs}")
        with self._lock:
            ids = []
            for tokens in checked:
                seeded = params if params.seed is not None else SamplingParams(   # reproducible under
                    **dict(sampling, seed=int(torch.randint(1 << 62, ()).item())))  # torch.manual_seed
                req = self.scheduler.add(tokens, new, eos, seeded)
                req.logprobs = logprobs
                ids.append(req.request_id)
            return ids

    @property
    def max_request_len(self) -> int:
        """The longest prompt + max_new_tokens a request may have (the model's and the batch
        rows' limit; the KV pool may hold less, see ``_check``)."""
        return min(n for n in (self.max_model_len, self.batch.max_model_len) if n)

    def _check(self, prompt, max_new_tokens, name: str) -> list[int]:
        tokens = token_list(prompt, self.vocab_size, name)
        new = count(max_new_tokens, "max_new_tokens")
        limit = self.max_request_len
        if len(tokens) + new > limit:
            raise ValueError(f"prompt + max_new_tokens = {len(tokens)} + {new} exceeds "
                             f"max_model_len={limit}")
        need = self.kv.blocks_for(len(tokens) + new - 1)
        if need > self.kv.num_blocks:
            raise ValueError(f"request of {len(tokens)} prompt + {new} new tokens needs {need} blocks "
                             f"of {self.kv.block_size} tokens; the pool has {self.kv.num_blocks}")
        return tokens

    def abort(self, request_id: int) -> None:
        """Drop a request now, also while a step computing it is in flight (its result is
        dropped when it comes)."""
        with self._lock:
            self.scheduler.abort(request_id)
            self._release_row(request_id)
            out = self._outputs.get(request_id)
            if out is not None and not out.finished:
                out.fail(RequestAbortedError(request_id))

    def has_unfinished(self) -> bool:
        """Requests to run, a step in flight, or tokens a ``step()`` caller has not had yet."""
        return self.scheduler.has_unfinished() or self._inflight is not None or bool(self._unclaimed)

    # --- one step -----------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Launch the next step and return the tokens of the one before it (overlapped), or
        of this one (``overlap=False``), as (request id, token, finished) events; also the
        tokens of ``add_request`` requests that steps driven by ``stream``/``generate_batch``
        consumers produced since the last call. Requests of a step that raises are aborted
        and reported (see ``failures``), not returned."""
        with self._lock:
            events, self._unclaimed = self._unclaimed + self._step(), []
            return events

    @torch.no_grad()
    def _step(self) -> list[TokenEvent]:
        with self._lock:
            begin = time.perf_counter()
            events = []
            proposer = self.scheduler.proposer
            if self._inflight is not None and proposer is not None and not proposer.overlaps:
                flight, self._inflight = self._inflight, None
                events = self._deliver(flight)   # the proposer reads every token on the host
            plan = self.scheduler.schedule()
            for rid in plan.preempted:
                self._release_row(rid)
            launched, failure = None, None
            if plan.requests:
                try:
                    with self._on_device():
                        launched = self._launch(plan, begin)
                except BaseException as exc:  # noqa: BLE001 - isolated to this step's requests
                    failure = exc
            elif self._inflight is None and self.scheduler.has_unfinished():
                raise RuntimeError(f"scheduler planned nothing for {len(self.scheduler.requests)} "
                                   f"unfinished requests ({self.kv.pool.num_free} blocks free)")
            if self.overlap and not any(plan.proposals):
                flights, self._inflight = [self._inflight], launched
            else:   # a speculating step's acceptance decides the next plan: wait for it
                flights, self._inflight = [self._inflight, launched], None
            for flight in flights:
                if flight is not None:
                    events += self._deliver(flight)
            if failure is not None:   # after the previous step's tokens are handed over
                self._fail(plan, failure)
                if not isinstance(failure, Exception):
                    raise failure     # KeyboardInterrupt and the like: the engine stays consistent
            return events

    def _on_device(self):
        """The runner's CUDA device current while a step is launched or read back, so events,
        streams and copies land on the model's device whatever the caller's current one is."""
        device = self.runner.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def _deliver(self, flight: _InFlight) -> list[TokenEvent]:
        try:
            with self._on_device():
                events = self._finish(flight)
        except BaseException as exc:  # noqa: BLE001
            self._fail(flight.plan, exc)
            if not isinstance(exc, Exception):
                raise
            return []
        for event in events:
            out = self._outputs.get(event.request_id)
            if out is not None:
                out.push(event.token, event.finished)
        return events

    def _fail(self, plan: StepPlan, exc: BaseException) -> None:
        """Abort every unfinished request of a step that raised, and tell its consumer."""
        log.warning("engine step of %d requests failed: %s: %s", len(plan.requests), type(exc).__name__, exc)
        self.stats["failed_steps"] += 1
        for req in plan.requests:
            if req.request_id not in self.scheduler.requests:
                continue
            self.abort(req.request_id)
            error = RequestFailedError(req.request_id, exc)
            self.stats["failed_requests"] += 1
            out = self._outputs.get(req.request_id)
            if out is not None:
                out.fail(error)
            else:
                self.failures.append((req.request_id, error))

    def _launch(self, plan: StepPlan, begin: float) -> _InFlight:
        batch = self.batch
        for req in plan.admitted:
            self._rows[req.request_id] = self._free_rows.pop()
        rows = [self._rows[r.request_id] for r in plan.requests]
        start = self._event() if self._timed else None
        batch.write_tokens([(self._rows[r.request_id], 0, r.tokens) for r in plan.admitted])
        batch.write_sampling([self._rows[r.request_id] for r in plan.admitted],
                             [r.sampling for r in plan.admitted])
        batch.write_blocks([(self._rows[u.request_id], u.first, u.blocks) for u in plan.tables])
        self.runner.copy_blocks(plan.copies)
        entries = [rows, plan.starts, plan.counts, [int(s) for s in plan.sampling]]
        offsets = None
        if any(plan.proposals):
            # the proposed tokens go where the step's input gather reads them
            batch.write_tokens([(row, start + 1, p) for row, start, p in zip(rows, plan.starts, plan.proposals) if p])
            entries, offsets = split_entries(entries, plan.proposals)
        logits, device_entries, graphed = self.runner.forward(entries)
        sampled = self._choose(plan, logits, device_entries, offsets)
        n = len(entries[0])
        top = max(r.logprobs for r in plan.requests)
        logprobs = _logprobs(logits[:n], sampled[:n], top) if top else None
        tokens, done = self._to_host(sampled, logprobs)
        record = StepRecord(_kind(plan), plan.num_tokens, len(plan.requests), graphed,
                            host_ms=(time.perf_counter() - begin) * 1e3, proposed=plan.num_proposed,
                            speculating=sum(1 for p in plan.proposals if p))
        self.step_log.append(record)
        return _InFlight(plan, tokens[0], done, start, record, tokens[1], offsets)

    def _choose(self, plan: StepPlan, logits: torch.Tensor, entries: torch.Tensor,
                offsets: list[int] | None) -> torch.Tensor:
        """Each entry's token, also put where the next step's input gather reads it
        (``BatchState.record_sampled``). An all-greedy step is one argmax, fused with that
        scatter where kernels run (``record_greedy``); a speculating one too, since
        ``_against_draft`` changes only the tokens of requests that draw."""
        params = [r.sampling for r in plan.requests]
        any_random = any(not p.greedy for p in params)
        any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        if not (any_random or any_penalty):
            return self.batch.record_greedy(entries, logits)
        sampled = self._sample(logits, entries, any_random, any_penalty)
        if offsets is not None:
            sampled = self._against_draft(plan, offsets, logits, entries, sampled)
        self.batch.record_sampled(entries, sampled)
        return sampled

    def _sample(self, logits: torch.Tensor, entries: torch.Tensor, any_random: bool,
                any_penalty: bool) -> torch.Tensor:
        batch = self.batch
        rows = entries[0].long()
        lengths = (entries[1] + entries[2]).long()
        sampling = SamplingRows(batch.temperature[rows], batch.top_k[rows], batch.top_p[rows],
                                batch.repetition_penalty[rows], batch.seed[rows], lengths,
                                any_random=any_random, any_penalty=any_penalty)
        history = batch.history(rows) if any_penalty else None
        return sample(logits, sampling, history, lengths)

    def _against_draft(self, plan: StepPlan, offsets: list[int], logits: torch.Tensor, entries: torch.Tensor,
                       sampled: torch.Tensor) -> torch.Tensor:
        """Sampling requests whose proposal a draft drew from its distributions q: each
        verified position's token by the rejection rule against the target's p (see
        speculative.rejection_sample) instead of a plain draw from p. Prompt lookup's point
        masses need nothing here (speculative.py), nor do greedy requests."""
        get = getattr(self.scheduler.proposer, "distributions", None)
        if get is None:
            return sampled
        picks, qs = [], []
        for i, (req, proposal) in enumerate(zip(plan.requests, plan.proposals)):
            q = get(req.request_id) if proposal and not req.sampling.greedy else None
            if q is not None:
                picks.extend(range(offsets[i], offsets[i] + len(proposal)))
                qs.append(q[:len(proposal)])
        if not picks:
            return sampled
        batch = self.batch
        index = staged(picks, torch.long, logits.device)
        rows = entries[0].long()[index]
        lengths = (entries[1] + entries[2]).long()[index]     # the positions being chosen
        params = [r.sampling for r in plan.requests]
        any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        target = SamplingRows(batch.temperature[rows], batch.top_k[rows], batch.top_p[rows],
                              batch.repetition_penalty[rows], batch.seed[rows], lengths, any_random=True,
                              any_penalty=any_penalty)
        p = probabilities(logits[index], target, batch.history(rows) if any_penalty else None, lengths)
        proposed = batch.tokens[rows, lengths]                 # written there before the step
        chosen = rejection_sample(p, torch.cat(qs), proposed, uniform(target.seed ^ ACCEPT_SALT, lengths),
                                  uniform(target.seed, lengths))
        return sampled.index_copy(0, index, chosen)

    def _to_host(self, *tensors: torch.Tensor | None):
        """Pinned host copies of ``tensors`` behind one event (the tensors themselves on CPU)."""
        if tensors[0].device.type != "cuda":
            return tensors, None
        hosts = []
        for t in tensors:
            host = None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            if host is not None:
                host.copy_(t, non_blocking=True)
            hosts.append(host)
        return hosts, self._event()

    @staticmethod
    def _event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _finish(self, flight: _InFlight) -> list[TokenEvent]:
        if flight.done is not None:
            flight.done.synchronize()
            flight.record.gpu_ms = flight.start.elapsed_time(flight.done)
        waited = time.perf_counter()
        values = flight.tokens.tolist()
        plan = flight.plan
        offsets = flight.offsets or range(len(plan.requests))
        sampled = [values[i] if s else None for i, s in zip(offsets, plan.sampling)]
        if flight.offsets is not None:
            sampled = self._accept(plan, offsets, values, sampled, flight.record)
        events = self.scheduler.update(plan, sampled)
        if flight.logprobs is not None:
            events = _with_logprobs(events, plan, flight.logprobs, offsets)
        for event in events:
            if event.finished:
                self._release_row(event.request_id)
        flight.record.host_ms += (time.perf_counter() - waited) * 1e3
        return events

    def _accept(self, plan: StepPlan, offsets, values: list[int], sampled: list, record: StepRecord) -> list:
        """Each speculating entry's new tokens: its accepted proposed tokens, then the
        target's token after them (see speculative.py)."""
        for i, proposal in enumerate(plan.proposals):
            if proposal:
                chosen = values[offsets[i]:offsets[i] + len(proposal) + 1]
                accepted = accepted_prefix(proposal, chosen)
                sampled[i] = proposal[:accepted] + [chosen[accepted]]
                record.accepted += accepted
        self.stats["spec_steps"] += 1
        self.stats["spec_proposed"] += record.proposed
        self.stats["spec_accepted"] += record.accepted
        return sampled

    def _release_row(self, request_id: int) -> None:
        release = getattr(self.scheduler.proposer, "release", None)
        if release is not None:
            release(request_id)
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)

    # --- conveniences -------------------------------------------------------------------

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 16,
                       **sampling) -> list[list[int]]:
        """New tokens of each prompt (eos included when it stopped there). Other requests
        already in the engine keep running alongside. The prompts are accepted all or none;
        a request that fails raises ``RequestFailedError`` (the others are aborted)."""
        with self._lock:
            ids = self.add_requests(prompts, max_new_tokens, **sampling)
            outs = [self._subscribe(rid) for rid in ids]
        try:
            results = []
            for out in outs:
                tokens = []
                while True:
                    new, done = self._take(out)
                    tokens += new
                    if done:
                        break
                results.append(tokens)
            return results
        finally:
            self._unsubscribe(ids)

    def stream(self, prompt: list[int], max_new_tokens: int = 16, **sampling) -> "TokenStream":
        """Yield the new tokens of one request as they are produced. The request is checked
        and queued now; closing the iterator early aborts it."""
        with self._lock:
            rid = self.add_request(prompt, max_new_tokens, **sampling)
            out = self._subscribe(rid)
        return TokenStream(self, rid, out)

    def _take(self, out: RequestOutput) -> tuple[list[int], bool]:
        """Wait for ``out``, then (its new tokens, whether it is done), read under the lock;
        its error is raised once its tokens are taken."""
        self._wait(out)
        with self._lock:
            tokens, done, error = out.take(), out.finished, out.error
        if error is not None and not tokens:
            raise error
        return tokens, done and error is None

    def _subscribe(self, request_id: int) -> RequestOutput:
        out = self._outputs[request_id] = RequestOutput(request_id)
        return out

    def _unsubscribe(self, ids: list[int]) -> None:
        with self._lock:
            for rid in ids:
                self._outputs.pop(rid, None)
                if rid in self.scheduler.requests:
                    self.abort(rid)

    def _wait(self, out: RequestOutput) -> None:
        """Drive steps until ``out`` has something to hand over. Steps run one at a time
        under the lock; a thread waiting for it blocks (no busy waiting), and finds the
        tokens the other thread's steps put in its queue."""
        with self._lock:
            while not out.ready:
                if not (self.scheduler.has_unfinished() or self._inflight is not None):
                    raise RuntimeError(f"request {out.request_id} is unfinished but the engine has no work")
                # Tokens of requests nobody subscribed to wait for the next step() caller.
                self._unclaimed += [e for e in self._step() if e.request_id not in self._outputs]


class TokenStream:
    """The new tokens of one request as an iterator. ``close()`` (also before the first
    ``next()``) aborts the request and drops its queue."""

    def __init__(self, engine: Engine, request_id: int, out: RequestOutput):
        self.engine, self.request_id, self._out = engine, request_id, out
        self._buffer: deque[int] = deque()
        self._done = False

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> int:
        while not self._buffer:
            if self._done:
                raise StopIteration
            try:
                tokens, self._done = self.engine._take(self._out)
            except BaseException:
                self.close()
                raise
            self._buffer.extend(tokens)
            if self._done:
                self.engine._unsubscribe([self.request_id])
        return self._buffer.popleft()

    def close(self) -> None:
        self._done = True
        self._buffer.clear()
        self.engine._unsubscribe([self.request_id])


def _logprobs(logits: torch.Tensor, sampled: torch.Tensor, top: int) -> torch.Tensor:
    """[entries, 1 + 2*top] float32: the chosen token's log-prob under the model's own
    distribution (before temperature and filters), then ``top`` (id, log-prob) pairs.
    Ids up to 2**24 are exact in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, sampled.long().view(-1, 1))
    values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    pairs = torch.stack([ids.float(), values], dim=-1).flatten(1)
    return torch.cat([chosen, pairs], dim=-1)


def _with_logprobs(events: list[TokenEvent], plan: StepPlan, table: torch.Tensor, offsets) -> list[TokenEvent]:
    """Each event's log-probs: the j-th event of a request in this step comes from its
    entry's j-th runner entry (a speculating entry yields several tokens)."""
    rows = table.tolist()
    entry = {r.request_id: i for i, r in enumerate(plan.requests)}
    seen: dict[int, int] = {}
    out = []
    for event in events:
        i = entry[event.request_id]
        req = plan.requests[i]
        nth = seen[event.request_id] = seen.get(event.request_id, -1) + 1
        if req.logprobs:
            row = rows[offsets[i] + nth]
            top = tuple((int(row[1 + 2 * j]), row[2 + 2 * j]) for j in range(req.logprobs))
            event = event._replace(logprob=TokenLogprob(row[0], top))
        out.append(event)
    return out


def _kind(plan: StepPlan) -> str:
    """A decode entry computes one generated token (and its proposed ones); everything else
    is prefill."""
    decodes = sum(1 for r, s, c, p in zip(plan.requests, plan.starts, plan.counts, plan.proposals)
                  if c == 1 + len(p) and s >= len(r.prompt))
    if decodes == len(plan.counts):
        return "decode"
    return "prefill" if decodes == 0 else "mixed"
