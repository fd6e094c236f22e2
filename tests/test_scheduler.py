"""Scheduler, KV-cache manager, prefix cache and block pool together, CPU only, no model:
scripted scenarios with exact block ids, and a soak of random requests against a fake model
that reads its context back through the block tables, with and without overlapped
scheduling (results one step late, pending tokens read from the fake device)."""

import random

import pytest

from fusegen.runtime.block_pool import BlockPool
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.prefix_cache import block_hash, extend_hashes, match_prefix
from fusegen.runtime.scheduler import Scheduler, Status

EOS = 0


def next_token(context: tuple[int, ...], vocab: int) -> int:
    """The fake model: the next token depends on the whole history."""
    return hash(context) % vocab


def reference(prompt: list[int], max_new_tokens: int, vocab: int, eos=(EOS,)) -> list[int]:
    """What a request produces when it runs alone."""
    tokens, out = list(prompt), []
    while True:
        t = next_token(tuple(tokens), vocab)
        out.append(t)
        if t in eos or len(out) == max_new_tokens:
            return out
        tokens.append(t)


class FakeModel:
    """Stores each computed token in its pool slot and predicts from the slots it reads back
    through the block table, so a wrong table, a missed copy or a clobbered shared block
    changes the output. Its input tokens come from its own per-request store (the device's
    token rows): admitted requests' known tokens, then each token it samples, so a decode of
    a token the host has not seen yet still computes. Checks that no step writes into a
    shared or cached block."""

    def __init__(self, sched: Scheduler, vocab: int):
        self.sched, self.kv, self.pool, self.vocab = sched, sched.kv, sched.kv.pool, vocab
        self.slots = [None] * (self.pool.num_blocks * self.pool.block_size)
        self.device_tokens: dict[int, list[int]] = {}

    def copy(self, copies):
        bs = self.pool.block_size
        rows = [self.slots[s * bs:(s + 1) * bs] for s, _ in copies]
        for (_, d), row in zip(copies, rows):
            self.slots[d * bs:(d + 1) * bs] = row

    def slot(self, blocks, i):
        bs = self.pool.block_size
        return blocks[i // bs] * bs + i % bs

    def step(self, plan):
        bs = self.pool.block_size
        for req in plan.admitted:
            self.device_tokens[req.request_id] = list(req.tokens)
        sampled = []
        for req, start, n, samples in zip(plan.requests, plan.starts, plan.counts, plan.sampling):
            blocks, known = self.kv.blocks(req.request_id), self.device_tokens[req.request_id]
            assert len(blocks) >= self.pool.blocks_for(start + n)
            for i in range(start, start + n):
                block = blocks[i // bs]
                assert self.pool.ref_count(block) == 1 and not self.pool.is_cached(block), \
                    f"request {req.request_id} writes token {i} into shared/cached block {block}"
                self.slots[self.slot(blocks, i)] = known[i]
            if samples:
                context = tuple(self.slots[self.slot(blocks, j)] for j in range(start + n))
                token = next_token(context, self.vocab)
                del known[start + n:]
                known.append(token)
                sampled.append(token)
            else:
                sampled.append(None)
        return sampled


class Driver:
    """Runs steps like the engine: with ``overlap``, a plan's results reach the scheduler
    one step later, after the next plan was made and computed."""

    def __init__(self, sched: Scheduler, model: FakeModel, overlap: bool = False):
        self.sched, self.model, self.overlap = sched, model, overlap
        self.inflight = None

    def step(self):
        plan = self.sched.schedule()
        self.model.copy(plan.copies)
        launched = (plan, self.model.step(plan)) if plan.requests else None
        previous = launched
        if self.overlap:
            previous, self.inflight = self.inflight, launched
        return plan, self.sched.update(*previous) if previous else []

    def busy(self):
        return self.sched.has_unfinished() or self.inflight is not None


def setup(num_blocks, block_size, vocab=32, caching=True, overlap=False, **kwargs):
    sched = Scheduler(KVCacheManager(num_blocks, block_size, caching), **kwargs)
    model = FakeModel(sched, vocab)
    return sched, model, Driver(sched, model, overlap), sched.kv.pool


def step(sched, model):
    plan = sched.schedule()
    model.copy(plan.copies)
    return plan, sched.update(plan, model.step(plan))


def refs(pool):
    return [pool.ref_count(b) for b in range(pool.num_blocks)]


def blocks(sched, req):
    return sched.kv.blocks(req.request_id)


# --- scripted scenarios, exact block ids (block_size 4) ------------------------------------

def test_blocks_are_allocated_in_order_as_sequences_grow():
    sched, model, _, pool = setup(8, 4, max_num_batched_tokens=16)
    r0 = sched.add([5, 6, 7, 8, 9, 10], max_new_tokens=8)
    r1 = sched.add([11, 12, 13], max_new_tokens=8)
    plan, events = step(sched, model)
    assert [r.request_id for r in plan.requests] == [0, 1] and plan.counts == [6, 3]
    assert blocks(sched, r0) == [0, 1] and blocks(sched, r1) == [2]
    assert [e.request_id for e in events] == [0, 1]
    plan, _ = step(sched, model)              # decodes: tokens 6 and 3 fit their blocks
    assert plan.counts == [1, 1] and blocks(sched, r0) == [0, 1] and blocks(sched, r1) == [2]
    plan, _ = step(sched, model)              # r1's token 4 opens a block
    assert blocks(sched, r0) == [0, 1] and blocks(sched, r1) == [2, 3]
    assert refs(pool) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_full_prompt_blocks_are_shared_and_cached_once_written():
    sched, model, _, pool = setup(8, 4, max_num_batched_tokens=32)
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    r0 = sched.add(prefix + [9, 10], max_new_tokens=4)
    step(sched, model)
    assert blocks(sched, r0) == [0, 1, 2] and pool.num_cached == 2      # the partial block is not
    r1 = sched.add(prefix + [99], max_new_tokens=4)
    plan, _ = step(sched, model)
    assert plan.requests == [r0, r1] and plan.counts == [1, 1]   # r1 computes only token 8
    assert blocks(sched, r1) == [0, 1, 3] and plan.copies == []
    assert refs(pool)[:4] == [2, 2, 1, 1]
    assert sched.stats["prefix_hit_blocks"] == 2 and sched.stats["prefix_hit_tokens"] == 8


def test_a_fully_cached_prompt_copies_its_last_block_before_writing():
    sched, model, _, pool = setup(8, 4, max_num_batched_tokens=32)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    r0 = sched.add(prompt + [9], max_new_tokens=4)
    step(sched, model)
    assert blocks(sched, r0) == [0, 1, 2]
    r1 = sched.add(prompt, max_new_tokens=4)
    plan, _ = step(sched, model)
    #   r0 [ 0 | 1 | 2 ]        block 1 cached: r1 may not write its token 7 there
    #   r1 [ 0 | 3 ]            3 = copy of 1
    assert blocks(sched, r1) == [0, 3] and plan.copies == [(1, 3)] and plan.counts == [1, 1]
    assert plan.starts == [9, 7] and r1.num_computed == 8 and refs(pool)[:5] == [2, 1, 1, 1, 0]
    assert sched.stats["cow_copies"] == 1
    assert r1.output == reference(prompt, 4, 32)[:1]


def test_freed_cached_blocks_stay_reusable_until_evicted_least_recently_freed_first():
    sched, model, _, pool = setup(6, 4, max_num_batched_tokens=32)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    r0 = sched.add(prompt, max_new_tokens=1)
    step(sched, model)
    assert r0.status is Status.FINISHED and pool.num_free == 6
    assert pool.num_cached == 2 and pool.num_evictable == 2
    # Freed tail first: free list [3, 4, 5, 2, 1, 0]; 0 and 1 still cached.
    r1 = sched.add(prompt[:8] + [42], max_new_tokens=2)
    step(sched, model)
    assert blocks(sched, r1) == [0, 1, 3] and sched.stats["prefix_hit_blocks"] == 2
    step(sched, model)
    assert r1.status is Status.FINISHED
    # Free list now [4, 5, 2, 3, 1, 0]: a 5-block prefill takes the first five, evicting 1.
    r2 = sched.add(list(range(10, 30)), max_new_tokens=4)
    step(sched, model)
    assert blocks(sched, r2) == [4, 5, 2, 3, 1] and pool.num_evicted == 1
    hashes = []
    extend_hashes(hashes, r1.tokens, 4, 8)
    assert pool.cached_block(hashes[0]) == 0 and pool.cached_block(hashes[1]) is None


def test_the_newest_running_request_is_preempted_and_recomputed_later():
    sched, model, _, pool = setup(4, 4, 64, caching=False, max_num_batched_tokens=16)
    r0 = sched.add(list(range(1, 8)), max_new_tokens=4)
    r1 = sched.add(list(range(11, 18)), max_new_tokens=4)
    step(sched, model)
    assert (blocks(sched, r0), blocks(sched, r1)) == ([0, 1], [2, 3])
    step(sched, model)                    # token 7 fits in each second block
    plan, _ = step(sched, model)          # both need a third block for token 8: none free
    assert plan.preempted == [1] and plan.requests == [r0]
    assert blocks(sched, r0) == [0, 1, 3] and blocks(sched, r1) == [] and r1.num_computed == 0
    assert r1.status is Status.WAITING and len(r1.tokens) == 9 and sched.waiting[0] is r1
    while r0.status is not Status.FINISHED:
        step(sched, model)
    assert r0.output == reference(list(range(1, 8)), 4, 64, eos=())[:len(r0.output)]
    plan, _ = step(sched, model)          # r1 back: prompt + its 2 tokens in one prefill
    assert plan.requests == [r1] and plan.counts == [9] and blocks(sched, r1) == [2, 3, 1]
    while r1.status is not Status.FINISHED:
        step(sched, model)
    assert r1.output == reference(list(range(11, 18)), 4, 64)[:len(r1.output)]
    assert sched.stats["preemptions"] == 1 and pool.num_free == 4


def test_preempting_a_request_already_planned_this_step_drops_it_from_the_plan():
    sched, model, _, pool = setup(4, 4, 64, caching=False, max_num_batched_tokens=5)
    r0 = sched.add(list(range(1, 13)), max_new_tokens=3)
    r1 = sched.add([40, 41], max_new_tokens=3)
    plans = [step(sched, model)[0] for _ in range(3)]
    assert [p.counts for p in plans] == [[5], [5], [2, 2]]    # chunked prefill of r0
    assert blocks(sched, r0) == [0, 1, 2] and blocks(sched, r1) == [3]
    plan, _ = step(sched, model)   # r1's decode is planned first, then r0 needs block 3
    assert plan.requests == [r0] and plan.counts == [1] and plan.preempted == [1]
    assert blocks(sched, r0) == [0, 1, 2, 3] and blocks(sched, r1) == []


def test_a_request_that_can_never_fit_is_rejected_with_the_numbers():
    sched = Scheduler(KVCacheManager(num_blocks=4, block_size=4))
    with pytest.raises(ValueError, match=r"^request of 10 prompt \+ 8 new tokens needs 5 blocks "
                                         r"of 4 tokens; the pool has 4$"):
        sched.add(list(range(10)), max_new_tokens=8)
    sched.add(list(range(10)), max_new_tokens=7)      # K/V of 16 tokens: exactly 4 blocks
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        sched.add([1], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one prompt token"):
        sched.add([], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_num_batched_tokens >= 1 and max_num_seqs >= 1, got 0 and 4"):
        Scheduler(KVCacheManager(4, 4), max_num_batched_tokens=0, max_num_seqs=4)


def test_update_and_abort_misuse_raise_with_the_numbers():
    sched = Scheduler(KVCacheManager(num_blocks=4, block_size=4))
    pool = sched.kv.pool
    r0 = sched.add([1, 2, 3], max_new_tokens=2)
    plan = sched.schedule()
    with pytest.raises(ValueError, match="update got 0 sampled tokens for a plan of 1 requests"):
        sched.update(plan, [])
    with pytest.raises(ValueError, match=r"computes tokens 0\.\.3, so it needs a sampled token"):
        sched.update(plan, [None])
    sched.abort(r0.request_id)
    assert pool.num_free == 4 and r0.finish_reason == "abort"
    with pytest.raises(ValueError, match="no unfinished request 0 \\(0 unfinished\\)"):
        sched.abort(0)


def test_block_pool_cache_misuse_and_chained_hashes():
    pool = BlockPool(num_blocks=2, block_size=2)
    with pytest.raises(ValueError, match=r"^cannot cache block 0: not held \(pool of 2\)$"):
        pool.cache(0, 123)
    a, b = pool.allocate(2)
    assert pool.cache(a, 123) and not pool.cache(b, 123) and not pool.cache(a, 7)
    pool.free([a, b])
    pool.share([a])                      # a cached block nobody holds is taken back
    with pytest.raises(ValueError, match=r"^cannot share block 1: not held"):
        pool.share([b])
    hashes = []
    extend_hashes(hashes, [1, 2, 3, 4, 5], 2, 5)
    assert hashes == [block_hash(None, (1, 2)), block_hash(hashes[0], (3, 4))]
    other = []
    extend_hashes(other, [9, 9, 3, 4], 2, 4)
    assert other[1] != hashes[1]          # same block, different prefix
    assert match_prefix(pool, [123, 5]) == [a]


# --- soak ----------------------------------------------------------------------------------

VOCAB = 48
PREFIXES = [[random.Random(p).randrange(1, VOCAB) for _ in range(n)] for p, n in enumerate((8, 13, 20))]


def random_requests(count, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            suffix = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 6))]
            prompt = list(rng.choice(PREFIXES)) + suffix
        else:
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 40))]
        out.append((prompt, rng.randrange(1, 30), rng.randrange(0, 4)))   # arrivals this step
    return out


def soak(requests, caching, overlap=False, num_blocks=40, block_size=4):
    sched, _, driver, pool = setup(num_blocks, block_size, VOCAB, caching, overlap,
                                   max_num_batched_tokens=32, max_num_seqs=16)
    queue, added, outputs = list(requests), {}, {}
    while queue or driver.busy():
        arrivals = queue[0][2] if queue else 0
        for _ in range(max(arrivals, 0 if driver.busy() else 1)):
            if queue:
                prompt, new, _ = queue.pop(0)
                req = sched.add(prompt, new, eos_token_ids=[EOS])
                added[req.request_id] = (prompt, new)
        _, events = driver.step()
        for e in events:
            outputs.setdefault(e.request_id, []).append(e.token)
    assert len(added) == len(requests) and sched.running == [] and not sched.waiting
    assert pool.num_free == num_blocks and refs(pool) == [0] * num_blocks
    assert pool.num_evictable == pool.num_cached
    for rid, (prompt, new) in added.items():
        assert outputs[rid] == reference(prompt, new, VOCAB), f"request {rid}"
    return outputs, sched.stats


def run_alone(prompt, max_new_tokens):
    sched, model, _, _ = setup(32, 4, VOCAB)
    req = sched.add(prompt, max_new_tokens, eos_token_ids=[EOS])
    while sched.has_unfinished():
        step(sched, model)
    return req.output


def test_soak_random_requests_match_running_alone_and_leak_no_blocks():
    requests = random_requests(2000, seed=0)
    cached, with_cache = soak(requests, caching=True)
    for rid, (prompt, new, _) in enumerate(requests[:100]):
        assert cached[rid] == run_alone(prompt, new)
    plain, without = soak(requests, caching=False)
    assert cached == plain
    for stats in (with_cache, without):
        assert stats["preemptions"] > 100 and stats["prefill_chunks_cut"] > 100
    assert with_cache["prefix_hit_blocks"] > 1000 and with_cache["cow_copies"] > 0
    assert with_cache["blocks_allocated"] < 0.9 * without["blocks_allocated"]
    assert with_cache["scheduled_tokens"] < without["scheduled_tokens"]


def test_soak_with_overlapped_scheduling_matches_and_leaks_nothing():
    """Results one step late: pending decodes, preemption of requests whose token is in
    flight, eos found one step after the next step was planned."""
    requests = random_requests(2000, seed=0)
    overlapped, stats = soak(requests, caching=True, overlap=True)
    assert overlapped == soak(requests, caching=True)[0]
    assert stats["preemptions"] > 100 and stats["prefix_hit_blocks"] > 1000 and stats["cow_copies"] > 0
    plain, _ = soak(requests, caching=False, overlap=True)
    assert plain == overlapped


# --- overlapped scheduling, step by step ---------------------------------------------------

def test_pending_tokens_are_decoded_before_the_host_knows_them():
    sched, model, driver, pool = setup(8, 4, overlap=True, max_num_batched_tokens=16)
    r0 = sched.add([5, 6, 7], max_new_tokens=3)
    plan, events = driver.step()                 # prefill; its token is pending
    assert plan.starts == [0] and plan.counts == [3] and plan.sampling == [True] and events == []
    assert r0.num_pending == 1 and r0.tokens == [5, 6, 7] and r0.num_computed == 3
    plan, events = driver.step()                 # decodes the pending token, learns it
    assert plan.starts == [3] and plan.counts == [1] and [e.token for e in events] == r0.output
    assert r0.num_pending == 1 and len(r0.output) == 1
    plan, events = driver.step()                 # decodes the second, the third is pending
    assert plan.counts == [1] and len(r0.output) == 2 and r0.out_of_budget
    plan, events = driver.step()                 # nothing left to plan: only learns the third
    assert plan.requests == [] and events[-1].finished
    assert r0.output == reference([5, 6, 7], 3, 32, eos=())
    assert not driver.busy() and pool.num_free == 8


def test_eos_found_late_drops_the_extra_token_and_frees_everything():
    prompt = [5, 6, 7]
    first = reference(prompt, 1, 32)[0]
    sched, model, driver, pool = setup(8, 4, overlap=True, max_num_batched_tokens=16)
    r0 = sched.add(prompt, max_new_tokens=8, eos_token_ids=[first])
    driver.step()
    plan, events = driver.step()                 # computes one token past eos, unseen
    assert plan.counts == [1] and events == [(r0.request_id, first, True, None)]
    assert r0.finish_reason == "eos" and pool.num_free == 8
    plan, events = driver.step()                 # the extra token's result is dropped
    assert events == [] and r0.output == [first] and not driver.busy()


def test_abort_while_its_step_is_in_flight_leaks_nothing():
    sched, model, driver, pool = setup(8, 4, overlap=True, max_num_batched_tokens=16)
    r0 = sched.add([1, 2, 3, 4, 5], max_new_tokens=6)
    r1 = sched.add([9, 8, 7], max_new_tokens=6)
    driver.step()
    driver.step()                                # r0 and r1 decoding, a step in flight
    sched.abort(r0.request_id)
    assert blocks(sched, r0) == [] and r0.finish_reason == "abort"
    outputs = []
    while driver.busy():
        outputs += [e for e in driver.step()[1]]
    assert all(e.request_id == r1.request_id for e in outputs)
    assert r1.output == reference([9, 8, 7], 6, 32, eos=()) and len(r0.output) == 1
    assert pool.num_free == 8 and refs(pool) == [0] * 8


def test_kv_manager_reports_each_block_id_once_in_table_updates():
    sched, model, driver, pool = setup(8, 4, max_num_batched_tokens=16)
    r0 = sched.add([1, 2, 3, 4, 5, 6], max_new_tokens=6)
    plan, _ = driver.step()
    assert plan.admitted == [r0] and plan.tables == [(r0.request_id, 0, [0, 1])]
    plan, _ = driver.step()                      # token 6 fits block 1: nothing new
    assert plan.admitted == [] and plan.tables == []
    driver.step()
    plan, _ = driver.step()                      # token 8 opens block 2
    assert plan.tables == [(r0.request_id, 2, [2])]
    r1 = sched.add([1, 2, 3, 4, 9], max_new_tokens=2)
    plan, _ = driver.step()                      # shares cached block 0, fresh block 3
    assert plan.tables == [(r1.request_id, 0, [0, 3])] and refs(pool)[:4] == [2, 1, 1, 1]
    kv = sched.kv
    with pytest.raises(ValueError, match="request 99 holds no blocks"):
        kv.grow(99, 4)
    with pytest.raises(ValueError, match=r"request 0 already holds 3 blocks"):
        kv.admit(0, [1, 2], 4)
