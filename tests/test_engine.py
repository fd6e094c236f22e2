"""The engine on a real compiled mini Llama (fp32, CPU): continuous batching, chunked prefill,
preemption, prefix sharing and overlapped scheduling must not change a single greedy token
versus HF generate."""

import pytest
import torch

import fusegen
from families import VOCAB, mini_model
from fusegen.runtime.engine import Engine
from fusegen.runtime.paged import PagedRunner

NEW = 12
BLOCK = 4
LENGTHS = (12, 3, 7, 16, 9, 1)


@pytest.fixture(scope="module")
def llama():
    model = mini_model("llama")
    return model, fusegen.compile(model, f"block_size={BLOCK}")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, VOCAB, (8,), generator=g).tolist()
    out = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    # Two prompts extending a common 8-token prefix, and the prefix alone (fully cached).
    return out + [shared + [5, 6, 7], shared + [9], shared]


@pytest.fixture(scope="module")
def hf_outputs(llama, prompts):
    model, _ = llama
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def engine(compiled, num_blocks, **kwargs):
    runner = PagedRunner(compiled.graph_module, compiled.facts["kv"], num_blocks, "cpu")
    return Engine(runner, eos_token_ids=[], **kwargs)


@pytest.mark.parametrize("overlap", [True, False])
def test_greedy_batch_matches_hf(llama, prompts, hf_outputs, overlap):
    eng = engine(llama[1], num_blocks=64, overlap=overlap)
    assert eng.generate_batch(prompts, max_new_tokens=NEW) == hf_outputs
    assert eng.stats["preemptions"] == 0
    # Admitted in one step, before any block is written: nothing to share yet.
    assert eng.stats["prefix_hit_blocks"] == 0 and eng.stats["steps"] == NEW
    assert [r.kind for r in eng.step_log] == ["prefill"] + ["decode"] * (NEW - 1)


@pytest.mark.parametrize("overlap", [True, False])
def test_tiny_budget_and_small_pool_force_chunks_and_preemption(llama, prompts, hf_outputs, overlap):
    # The longest request needs ceil((16 + 12 - 1) / 4) = 7 blocks; 10 cannot hold two of them.
    eng = engine(llama[1], num_blocks=10, max_num_batched_tokens=5, max_num_seqs=4, overlap=overlap)
    assert eng.generate_batch(prompts, max_new_tokens=NEW) == hf_outputs
    assert eng.stats["preemptions"] > 0 and eng.stats["prefill_chunks_cut"] > 0
    assert {r.kind for r in eng.step_log} == {"prefill", "decode", "mixed"}
    pool = eng.kv.pool
    assert pool.num_free == 10 and all(pool.ref_count(b) == 0 for b in range(10))


def test_cached_prefix_then_fully_cached_prompt_copies_on_write(llama, prompts, hf_outputs):
    eng = engine(llama[1], num_blocks=32)
    shared = prompts[-1]
    assert eng.generate_batch([shared + [9]], max_new_tokens=NEW) == [hf_outputs[-2]]
    assert eng.generate_batch([shared], max_new_tokens=NEW) == [hf_outputs[-1]]
    assert eng.stats["prefix_hit_blocks"] == 2 and eng.stats["cow_copies"] == 1
    eng = engine(llama[1], num_blocks=32, enable_prefix_caching=False)
    assert eng.generate_batch([shared], max_new_tokens=NEW) == [hf_outputs[-1]]


def test_requests_added_between_steps_and_stream(llama, prompts, hf_outputs):
    eng = engine(llama[1], num_blocks=40, max_num_batched_tokens=8)
    first = eng.add_request(prompts[0], NEW)
    got = {first: []}
    for i in range(1, 4):
        for rid, token, *_ in eng.step():
            got[rid].append(token)
        got[eng.add_request(prompts[i], NEW)] = []
    while eng.has_unfinished():
        for rid, token, *_ in eng.step():
            got[rid].append(token)
    assert list(got.values()) == hf_outputs[:4]
    assert list(eng.stream(prompts[4], NEW)) == hf_outputs[4]
    stream = eng.stream(prompts[5], NEW)
    assert [next(stream), next(stream)] == hf_outputs[5][:2]
    stream.close()                             # abandons the request, frees its blocks
    while eng.has_unfinished():                # the step in flight finishes, its token dropped
        assert eng.step() == []
    assert eng.kv.pool.num_free == 40 and eng._rows == {}


def test_eos_stops_a_request(llama, prompts, hf_outputs):
    eng = engine(llama[1], num_blocks=32)
    eos = hf_outputs[0][3]
    stop = hf_outputs[0].index(eos)
    out = eng.generate_batch(prompts[:2], max_new_tokens=NEW, eos_token_ids=[eos])
    assert out[0] == hf_outputs[0][:stop + 1]


def test_seeded_sampling_is_reproducible_alone_or_batched(llama, prompts):
    compiled = llama[1]
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    alone = engine(compiled, 32).generate_batch([prompts[0]], NEW, **sampling)
    again = engine(compiled, 32, overlap=False).generate_batch([prompts[0]], NEW, **sampling)
    assert alone == again
    eng = engine(compiled, 32)
    eng.add_request(prompts[1], NEW, temperature=1.0, seed=5)
    eng.add_request(prompts[2], NEW)
    assert eng.generate_batch([prompts[0]], NEW, **sampling) == alone
    other_seed = engine(compiled, 32).generate_batch([prompts[0]], NEW, **dict(sampling, seed=12))
    assert other_seed != alone


def test_seeded_request_alone_equals_it_inside_a_batch_of_16_different_requests(llama):
    """Seeds are counter-based, keyed by (seed, position): neither batch-mates (greedy,
    sampled, penalised, other seeds), chunked prefill nor overlap changes the draw."""
    compiled = llama[1]
    g = torch.Generator().manual_seed(3)
    mine = torch.randint(3, VOCAB, (9,), generator=g).tolist()
    sampling = dict(temperature=1.1, top_p=0.9, seed=2024)
    alone = engine(compiled, 16).generate_batch([mine], NEW, **sampling)
    eng = engine(compiled, 160, max_num_batched_tokens=24, max_num_seqs=16)
    for i in range(15):
        other = torch.randint(3, VOCAB, (int(torch.randint(1, 20, (), generator=g)),), generator=g).tolist()
        eng.add_request(other, NEW, **[dict(), dict(temperature=0.7, seed=i), dict(temperature=1.0, top_k=5),
                                       dict(temperature=0.8, repetition_penalty=1.3, seed=i)][i % 4])
    assert eng.generate_batch([mine], NEW, **sampling) == alone
    assert engine(compiled, 16, overlap=False).generate_batch([mine], NEW, **sampling) == alone


def test_engine_rejects_what_the_model_or_pool_cannot_hold(llama):
    eng = engine(llama[1], num_blocks=4, max_model_len=20)
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens = 10 \+ 11 exceeds max_model_len=20"):
        eng.add_request(list(range(10)), 11)
    with pytest.raises(ValueError, match="needs 5 blocks of 4 tokens; the pool has 4"):
        eng.add_request(list(range(10)), 10)
    with pytest.raises(ValueError, match="top_p must be in"):
        eng.add_request([1], 2, top_p=2.0)
    assert not eng.has_unfinished()


def test_abort_during_an_overlapped_step_leaks_nothing(llama, prompts, hf_outputs):
    eng = engine(llama[1], num_blocks=24)
    first = eng.add_request(prompts[0], NEW)
    second = eng.add_request(prompts[1], NEW)
    eng.step()
    eng.step()                                 # a decode step of both is in flight
    eng.abort(first)
    got = []
    while eng.has_unfinished():
        events = eng.step()
        assert all(rid == second for rid, *_ in events)
        got += [token for _, token, *_ in events]
    assert got == hf_outputs[1][1:] and eng.kv.pool.num_free == 24 and eng._rows == {}
    assert eng.generate_batch([prompts[0]], NEW) == [hf_outputs[0]]   # the engine is intact


def test_copy_blocks_copies_every_layer_and_reads_before_writing():
    runner = PagedRunner.__new__(PagedRunner)  # only the pool matters here
    runner.device = torch.device("cpu")
    runner.kv_pool = torch.arange(2 * 2 * 4 * 2, dtype=torch.float32).reshape(2, 2, 4, 2, 1, 1)
    pool = runner.kv_pool.clone()
    want = pool.clone()
    want[:, :, 3], want[:, :, 0] = pool[:, :, 0], pool[:, :, 2]
    runner.copy_blocks([(0, 3), (2, 0)])
    assert torch.equal(runner.kv_pool, want)


def test_host_to_device_traffic_per_step_does_not_grow_with_context(llama, monkeypatch):
    """No per-token Python on the step path: after admission, a decode step stages a few
    numbers per request (entries, a new block id), whatever the context length."""
    import fusegen.runtime.batch as batch_module
    import fusegen.runtime.paged as paged_module

    staged_sizes = []
    real = batch_module.staged

    def counting(values, dtype, device):
        staged_sizes.append(len(values))
        return real(values, dtype, device)

    monkeypatch.setattr(batch_module, "staged", counting)
    monkeypatch.setattr(paged_module, "staged", counting)
    per_step = {}
    for length in (8, 120):
        eng = engine(llama[1], num_blocks=80, max_num_batched_tokens=256, max_num_seqs=2)
        prompts = [[(7 * i + j) % 120 + 3 for j in range(length)] for i in range(2)]
        for p in prompts:
            eng.add_request(p, 20)
        eng.step()                                 # admission: the prompts' tokens go over once
        sizes = []
        for _ in range(12):
            staged_sizes.clear()
            eng.step()
            sizes.append(sum(staged_sizes))
        per_step[length] = max(sizes)
        staged_sizes.clear()
    assert per_step[8] == per_step[120] <= 4 * 2 + 3 * 2   # entries, plus a block id per request


def test_a_head_dim_the_kernels_cannot_serve_is_refused_at_compile_time():
    from fusegen.compiler import _check_kernels_serve
    from fusegen.errors import UnsupportedModelError
    from fusegen.kv import KVGeometry

    model = mini_model("llama")
    facts = {"kv": KVGeometry(layers=2, kv_heads=2, head_dim=100, dtype=torch.float32, query_heads=4,
                              block_size=16)}
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM is not supported: .*head dim 100 .*"
                                                    r"multiples of 8 from 8 to 256"):
        _check_kernels_serve(model, facts)
