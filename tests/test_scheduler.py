"""Scheduler, prefix cache and block pool together, CPU only, no model: scripted scenarios
with exact block ids, and a soak of random requests against a fake model that reads its
context back through the block tables."""

import random

import pytest

from fusegen.runtime.block_pool import BlockPool
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
    changes the output. Checks that no step writes into a shared or cached block."""

    def __init__(self, pool: BlockPool, vocab: int):
        self.pool, self.vocab = pool, vocab
        self.slots = [None] * (pool.num_blocks * pool.block_size)

    def copy(self, copies):
        bs = self.pool.block_size
        rows = [self.slots[s * bs:(s + 1) * bs] for s, _ in copies]
        for (_, d), row in zip(copies, rows):
            self.slots[d * bs:(d + 1) * bs] = row

    def slot(self, req, i):
        bs = self.pool.block_size
        return req.blocks[i // bs] * bs + i % bs

    def step(self, plan):
        bs = self.pool.block_size
        for req, n in zip(plan.requests, plan.counts):
            assert len(req.blocks) >= self.pool.blocks_for(req.num_computed + n)
            for i in range(req.num_computed, req.num_computed + n):
                block = req.blocks[i // bs]
                assert self.pool.ref_count(block) == 1 and not self.pool.is_cached(block), \
                    f"request {req.request_id} writes token {i} into shared/cached block {block}"
                self.slots[self.slot(req, i)] = req.tokens[i]
        sampled = []
        for i, req in enumerate(plan.requests):
            end = req.num_computed + plan.counts[i]
            if plan.samples(i):
                context = tuple(self.slots[self.slot(req, j)] for j in range(end))
                sampled.append(next_token(context, self.vocab))
            else:
                sampled.append(None)
        return sampled


def step(sched, model):
    plan = sched.schedule()
    model.copy(plan.copies)
    return plan, sched.update(plan, model.step(plan))


def refs(pool):
    return [pool.ref_count(b) for b in range(pool.num_blocks)]


# --- scripted scenarios, exact block ids (block_size 4) ------------------------------------

def test_blocks_are_allocated_in_order_as_sequences_grow():
    pool = BlockPool(num_blocks=8, block_size=4)
    sched, model = Scheduler(pool, max_num_batched_tokens=16), FakeModel(pool, 32)
    r0 = sched.add([5, 6, 7, 8, 9, 10], max_new_tokens=8)
    r1 = sched.add([11, 12, 13], max_new_tokens=8)
    plan, events = step(sched, model)
    assert [r.request_id for r in plan.requests] == [0, 1] and plan.counts == [6, 3]
    assert r0.blocks == [0, 1] and r1.blocks == [2]
    assert [e.request_id for e in events] == [0, 1]
    plan, _ = step(sched, model)              # decodes: tokens 6 and 3 fit their blocks
    assert plan.counts == [1, 1] and r0.blocks == [0, 1] and r1.blocks == [2]
    plan, _ = step(sched, model)              # r1's token 4 opens a block
    assert r0.blocks == [0, 1] and r1.blocks == [2, 3]
    assert refs(pool) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_full_prompt_blocks_are_shared_and_cached_once_written():
    pool = BlockPool(num_blocks=8, block_size=4)
    sched, model = Scheduler(pool, max_num_batched_tokens=32), FakeModel(pool, 32)
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    r0 = sched.add(prefix + [9, 10], max_new_tokens=4)
    step(sched, model)
    assert r0.blocks == [0, 1, 2] and pool.num_cached == 2      # the partial block is not
    r1 = sched.add(prefix + [99], max_new_tokens=4)
    plan, _ = step(sched, model)
    assert plan.requests == [r0, r1] and plan.counts == [1, 1]   # r1 computes only token 8
    assert r1.blocks == [0, 1, 3] and plan.copies == []
    assert refs(pool)[:4] == [2, 2, 1, 1]
    assert sched.stats["prefix_hit_blocks"] == 2 and sched.stats["prefix_hit_tokens"] == 8


def test_a_fully_cached_prompt_copies_its_last_block_before_writing():
    pool = BlockPool(num_blocks=8, block_size=4)
    sched, model = Scheduler(pool, max_num_batched_tokens=32), FakeModel(pool, 32)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    r0 = sched.add(prompt + [9], max_new_tokens=4)
    step(sched, model)
    assert r0.blocks == [0, 1, 2]
    r1 = sched.add(prompt, max_new_tokens=4)
    plan, _ = step(sched, model)
    #   r0 [ 0 | 1 | 2 ]        block 1 cached: r1 may not write its token 7 there
    #   r1 [ 0 | 3 ]            3 = copy of 1
    assert r1.blocks == [0, 3] and plan.copies == [(1, 3)] and plan.counts == [1, 1]
    assert r1.num_computed == 8 and refs(pool)[:5] == [2, 1, 1, 1, 0]
    assert sched.stats["cow_copies"] == 1
    assert r1.output == reference(prompt, 4, 32)[:1]


def test_freed_cached_blocks_stay_reusable_until_evicted_least_recently_freed_first():
    pool = BlockPool(num_blocks=6, block_size=4)
    sched, model = Scheduler(pool, max_num_batched_tokens=32), FakeModel(pool, 32)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    r0 = sched.add(prompt, max_new_tokens=1)
    step(sched, model)
    assert r0.status is Status.FINISHED and pool.num_free == 6
    assert pool.num_cached == 2 and pool.num_evictable == 2
    # Freed tail first: free list [3, 4, 5, 2, 1, 0]; 0 and 1 still cached.
    r1 = sched.add(prompt[:8] + [42], max_new_tokens=2)
    step(sched, model)
    assert r1.blocks == [0, 1, 3] and sched.stats["prefix_hit_blocks"] == 2
    step(sched, model)
    assert r1.status is Status.FINISHED
    # Free list now [4, 5, 2, 3, 1, 0]: a 5-block prefill takes the first five, evicting 1.
    r2 = sched.add(list(range(10, 30)), max_new_tokens=4)
    step(sched, model)
    assert r2.blocks == [4, 5, 2, 3, 1] and pool.num_evicted == 1
    assert pool.cached_block(r1.hashes[0]) == 0 and pool.cached_block(r1.hashes[1]) is None


def test_the_newest_running_request_is_preempted_and_recomputed_later():
    pool = BlockPool(num_blocks=4, block_size=4)
    sched = Scheduler(pool, max_num_batched_tokens=16, enable_prefix_caching=False)
    model = FakeModel(pool, 64)
    r0 = sched.add(list(range(1, 8)), max_new_tokens=4)
    r1 = sched.add(list(range(11, 18)), max_new_tokens=4)
    step(sched, model)
    assert (r0.blocks, r1.blocks) == ([0, 1], [2, 3])
    step(sched, model)                    # token 7 fits in each second block
    plan, _ = step(sched, model)          # both need a third block for token 8: none free
    assert plan.preempted == [1] and plan.requests == [r0]
    assert r0.blocks == [0, 1, 3] and r1.blocks == [] and r1.num_computed == 0
    assert r1.status is Status.WAITING and len(r1.tokens) == 9 and sched.waiting[0] is r1
    while r0.status is not Status.FINISHED:
        step(sched, model)
    assert r0.output == reference(list(range(1, 8)), 4, 64, eos=())[:len(r0.output)]
    plan, _ = step(sched, model)          # r1 back: prompt + its 2 tokens in one prefill
    assert plan.requests == [r1] and plan.counts == [9] and r1.blocks == [2, 3, 1]
    while r1.status is not Status.FINISHED:
        step(sched, model)
    assert r1.output == reference(list(range(11, 18)), 4, 64)[:len(r1.output)]
    assert sched.stats["preemptions"] == 1 and pool.num_free == 4


def test_preempting_a_request_already_planned_this_step_drops_it_from_the_plan():
    pool = BlockPool(num_blocks=4, block_size=4)
    sched = Scheduler(pool, max_num_batched_tokens=5, enable_prefix_caching=False)
    model = FakeModel(pool, 64)
    r0 = sched.add(list(range(1, 13)), max_new_tokens=3)
    r1 = sched.add([40, 41], max_new_tokens=3)
    plans = [step(sched, model)[0] for _ in range(3)]
    assert [p.counts for p in plans] == [[5], [5], [2, 2]]    # chunked prefill of r0
    assert r0.blocks == [0, 1, 2] and r1.blocks == [3]
    plan, _ = step(sched, model)   # r1's decode is planned first, then r0 needs block 3
    assert plan.requests == [r0] and plan.counts == [1] and plan.preempted == [1]
    assert r0.blocks == [0, 1, 2, 3] and r1.blocks == []


def test_a_request_that_can_never_fit_is_rejected_with_the_numbers():
    sched = Scheduler(BlockPool(num_blocks=4, block_size=4))
    with pytest.raises(ValueError, match=r"^request of 10 prompt \+ 8 new tokens needs 5 blocks "
                                         r"of 4 tokens; the pool has 4$"):
        sched.add(list(range(10)), max_new_tokens=8)
    sched.add(list(range(10)), max_new_tokens=7)      # K/V of 16 tokens: exactly 4 blocks
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        sched.add([1], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one prompt token"):
        sched.add([], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_num_batched_tokens >= 1 and max_num_seqs >= 1, got 0 and 4"):
        Scheduler(BlockPool(4, 4), max_num_batched_tokens=0, max_num_seqs=4)


def test_update_and_abort_misuse_raise_with_the_numbers():
    pool = BlockPool(num_blocks=4, block_size=4)
    sched = Scheduler(pool)
    r0 = sched.add([1, 2, 3], max_new_tokens=2)
    plan = sched.schedule()
    with pytest.raises(ValueError, match="update got 0 sampled tokens for a plan of 1 requests"):
        sched.update(plan, [])
    with pytest.raises(ValueError, match=r"computes tokens 0\.\.3 of 3, so it needs sampled token"):
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


def soak(requests, caching, num_blocks=40, block_size=4):
    pool = BlockPool(num_blocks, block_size)
    sched = Scheduler(pool, max_num_batched_tokens=32, max_num_seqs=16, enable_prefix_caching=caching)
    model = FakeModel(pool, VOCAB)
    queue, added, outputs = list(requests), {}, {}
    while queue or sched.has_unfinished():
        arrivals = queue[0][2] if queue else 0
        for _ in range(max(arrivals, 0 if sched.has_unfinished() else 1)):
            if queue:
                prompt, new, _ = queue.pop(0)
                req = sched.add(prompt, new, eos_token_ids=[EOS])
                added[req.request_id] = (prompt, new)
        _, events = step(sched, model)
        for e in events:
            outputs.setdefault(e.request_id, []).append(e.token)
    assert len(added) == len(requests) and sched.running == [] and not sched.waiting
    assert pool.num_free == num_blocks and refs(pool) == [0] * num_blocks
    assert pool.num_evictable == pool.num_cached
    for rid, (prompt, new) in added.items():
        assert outputs[rid] == reference(prompt, new, VOCAB), f"request {rid}"
    return outputs, sched.stats


def run_alone(prompt, max_new_tokens):
    pool = BlockPool(num_blocks=32, block_size=4)
    sched, model = Scheduler(pool), FakeModel(pool, VOCAB)
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
