"""The greedy-token kernel (codegen/greedy.py) against its reference, ``logits.argmax(-1)``
then ``BatchState.record_sampled``: the same tokens and the same token rows at odd
vocabularies, ties (the first maximum, also across chunks), NaN and -inf rows, entries that
sample nothing and logits rows past the entries; counters left at zero. Then the engine with
it, plain and speculating (prompt lookup, a draft model). On CUDA where there is one; on a CPU machine under
TRITON_INTERPRET=1 (tests/conftest.py sets it)."""

import os

import pytest
import torch

import fusegen
import fusegen.codegen.greedy as greedy
from families import VOCAB, mini_model
from fusegen.codegen.launch import ticket_counters
from fusegen.codegen.greedy import record_greedy
from fusegen.fused_group import kernels_wanted
from fusegen.runtime.batch import BatchState
from fusegen.runtime.draft import DraftProposer
from fusegen.runtime.engine import Engine
from fusegen.runtime.paged import PagedRunner
from fusegen.runtime.speculative import NgramProposer

DEVICE = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"

MAX_ROWS, MAX_LEN = 5, 30
NAN, INF = float("nan"), float("inf")


def _entries(*columns) -> torch.Tensor:
    """(row, start, count, samples) entries, one tuple each."""
    return torch.tensor(list(zip(*columns)), dtype=torch.int32, device=DEVICE).view(4, -1)


# Two sampling entries, one that samples nothing (scratch column), one padding entry.
ENTRIES = [(3, 7, 1, 1), (0, 20, 9, 1), (1, 4, 2, 0), (MAX_ROWS, 0, 0, 0)]


def _batch() -> BatchState:
    batch = BatchState(MAX_ROWS, MAX_LEN, 4, DEVICE)
    batch.tokens.copy_(torch.randint(3, 1000, batch.tokens.shape, generator=torch.Generator().manual_seed(0)))
    return batch


def _check_against_reference(logits: torch.Tensor, entries: torch.Tensor, block_v=None) -> torch.Tensor:
    """The kernel's tokens and token rows equal the reference's; its tokens, returned."""
    got_batch, want_batch = _batch(), _batch()
    got = record_greedy(logits, entries, got_batch.tokens, got_batch.scratch, block_v)
    want = logits.argmax(-1)
    want_batch.record_sampled(entries, want)
    assert got.dtype == torch.long
    assert torch.equal(got, want), f"got {got.tolist()}, want {want.tolist()}"
    diff = (got_batch.tokens != want_batch.tokens).nonzero().tolist()
    assert not diff, f"token rows differ at (row, col) {diff[:8]}"
    assert not ticket_counters(logits.device, 4096).any(), "a ticket counter was left non-zero"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 1000, 4099, 40000])
def test_random_rows_match_the_reference(V, dtype):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(len(ENTRIES), V, generator=g).mul(4).to(dtype).to(DEVICE)
    _check_against_reference(logits, _entries(*ENTRIES))


@pytest.mark.parametrize("V, block_v", [(1000, 16), (4099, 64), (130, 128)])
def test_many_chunks_and_a_last_chunk_of_one_column(V, block_v):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(ENTRIES), V, generator=g).to(DEVICE)
    logits[0, -1] = 9.0                        # the maximum alone in the last chunk
    _check_against_reference(logits, _entries(*ENTRIES), block_v)


def test_ties_give_the_first_maximum_within_and_across_chunks():
    V, block_v = 100, 16
    logits = torch.zeros(4, V, device=DEVICE)
    logits[0, [20, 40]] = 5.0                  # chunks 1 and 2
    logits[1, [35, 33, 47]] = 2.0              # one chunk, not in index order
    logits[2, [15, 16]] = 3.0                  # either side of a chunk boundary
    logits[3] = 1.0                            # all equal
    got = _check_against_reference(logits, _entries(*ENTRIES), block_v)
    assert got.tolist() == [20, 33, 15, 0]
    big = torch.zeros(2, 4099, device=DEVICE)
    big[:, [3000, 1500, 4098]] = 7.0           # default chunking: 1024 columns
    assert _check_against_reference(big, _entries(*ENTRIES[:2])).tolist() == [1500, 1500]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_is_above_everything_and_the_first_nan_wins(dtype):
    V, block_v = 100, 16
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(2))
    logits[0, [70, 30]] = NAN                  # two chunks: the first NaN
    logits[1, 5], logits[1, 90] = INF, NAN     # NaN beats +inf in a later chunk
    logits[2] = NAN                            # all NaN
    logits[3, 99] = NAN                        # the last column
    logits[4, [64, 65]] = NAN                  # one chunk
    got = _check_against_reference(logits.to(dtype).to(DEVICE), _entries(*ENTRIES, (2, 0, 1, 1)), block_v)
    assert got.tolist() == [30, 90, 0, 99, 64]
    # torch.argmax's rule, checked here so that the reference above is the right one
    assert torch.tensor([1.0, NAN, 3.0, NAN]).argmax() == 1 and torch.tensor([INF, NAN]).argmax() == 1


def test_minus_infinity_rows():
    V, block_v = 50, 16
    logits = torch.full((4, V), -INF, device=DEVICE)
    logits[1, 37] = -1e30                      # one finite value
    logits[2, [17, 40]] = INF
    logits[3, 49] = -3.0
    got = _check_against_reference(logits, _entries(*ENTRIES), block_v)
    assert got.tolist() == [0, 37, 17, 49]


def test_logits_rows_past_the_entries_get_tokens_and_write_nothing():
    logits = torch.randn(6, 333, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _check_against_reference(logits, _entries(*ENTRIES[:2]), 64)
    _check_against_reference(logits[:, :300], _entries(*ENTRIES[:2]), 64)    # strided rows


def test_counters_reset_so_that_launches_follow_each_other():
    batch = _batch()
    entries = _entries(*ENTRIES)
    for seed in range(3):
        logits = torch.randn(len(ENTRIES), 500, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        assert torch.equal(record_greedy(logits, entries, batch.tokens, batch.scratch, 32), logits.argmax(-1))
        assert batch.tokens[3, 8] == logits[0].argmax() and batch.tokens[1, MAX_LEN] == logits[2].argmax()


def test_bad_inputs_are_refused_with_the_shapes():
    batch, entries = _batch(), _entries(*ENTRIES)
    tokens, scratch = batch.tokens, batch.scratch
    with pytest.raises(ValueError, match="int32"):
        record_greedy(torch.randn(4, 9, device=DEVICE), entries.long(), tokens, scratch)
    with pytest.raises(ValueError, match="4 entries but logits for only 3 rows"):
        record_greedy(torch.randn(3, 9, device=DEVICE), entries, tokens, scratch)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        record_greedy(torch.zeros(4, 9, dtype=torch.long, device=DEVICE), entries, tokens, scratch)
    with pytest.raises(ValueError, match="contiguous rows"):
        record_greedy(torch.randn(9, 4, device=DEVICE).t(), entries, tokens, scratch)
    with pytest.raises(ValueError, match="scratch column 31"):
        record_greedy(torch.randn(4, 9, device=DEVICE), entries, tokens, scratch + 1)
    with pytest.raises(ValueError, match="power of two"):
        record_greedy(torch.randn(4, 9, device=DEVICE), entries, tokens, scratch, 12)
    with pytest.raises(ValueError, match="chunks of 1 columns"):
        record_greedy(torch.randn(4, greedy.MAX_CHUNKS + 1, device=DEVICE), entries, tokens, scratch, 1)


def _counting(monkeypatch) -> list:
    calls = []
    real = greedy.record_greedy
    monkeypatch.setattr(greedy, "record_greedy", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("setting, launches", [("1", 1), ("0", 0)])
def test_batch_state_uses_the_kernel_where_kernels_run(monkeypatch, setting, launches):
    monkeypatch.setenv("FUSEGEN_KERNELS", setting)
    calls = _counting(monkeypatch)
    logits = torch.randn(len(ENTRIES), 77, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    batch, want = _batch(), _batch()
    got = batch.record_greedy(_entries(*ENTRIES), logits)
    want.record_sampled(_entries(*ENTRIES), logits.argmax(-1))
    assert len(calls) == launches
    assert torch.equal(got, logits.argmax(-1)) and torch.equal(batch.tokens, want.tokens)


# --- the engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return fusegen.compile(mini_model("llama"), "block_size=4")


def _generate(compiled, prompts, proposer=None) -> tuple[list[list[int]], Engine]:
    runner = PagedRunner(compiled.graph_module, compiled.facts["kv"], 64, DEVICE)
    eng = Engine(runner, eos_token_ids=[], max_num_batched_tokens=16, proposer=proposer)
    return eng.generate_batch(prompts, 10), eng


def _own_draft(compiled) -> DraftProposer:
    """The target as its own draft model (every proposal accepted)."""
    runner = PagedRunner(compiled.graph_module, compiled.facts["kv"], 64, DEVICE)
    return DraftProposer(runner, 3, 8, 256, 16)


def test_engine_greedy_tokens_are_the_same_with_the_kernel(llama, monkeypatch):
    """Decode, chunked prefill, prompt-lookup and draft-model steps (speculating greedy steps
    take the kernel too), under $FUSEGEN_KERNELS=1 (the interpreter on a CPU machine), with
    the batch's kernels and with its references: the same step graph either way."""
    g = torch.Generator().manual_seed(0)
    segment = torch.randint(3, VOCAB, (5,), generator=g).tolist()
    prompts = [segment * 3, torch.randint(3, VOCAB, (21,), generator=g).tolist(), [7]]
    monkeypatch.setenv("FUSEGEN_KERNELS", "1")
    monkeypatch.setattr("fusegen.runtime.batch.kernels_wanted", lambda tensors: False)
    plain, _ = _generate(llama, prompts)
    speculating, _ = _generate(llama, prompts, NgramProposer(k=3, n=2))
    monkeypatch.setattr("fusegen.runtime.batch.kernels_wanted", kernels_wanted)
    calls = _counting(monkeypatch)
    got, eng = _generate(llama, prompts)
    assert got == plain and len(calls) == eng.stats["steps"]      # one launch a step
    del calls[:]
    got, eng = _generate(llama, prompts, NgramProposer(k=3, n=2))
    assert got == speculating == plain
    assert len(calls) == eng.stats["steps"] and eng.stats["spec_proposed"] > 0
    del calls[:]
    got, eng = _generate(llama, prompts, _own_draft(llama))    # the draft's steps take it too
    assert got == plain and eng.stats["spec_accepted"] == eng.stats["spec_proposed"] > 0
    assert len(calls) > eng.stats["steps"]


@pytest.mark.gpu
@pytest.mark.parametrize("V", [32000, 128256, 151936])
def test_gpu_bf16_rows_match_argmax(V):
    g = torch.Generator(device="cuda").manual_seed(V)
    entries = torch.tensor([[0, 1, 2, 3], [5, 0, 9, 0], [1, 3, 1, 0], [1, 1, 0, 0]], dtype=torch.int32, device="cuda")
    for B in (1, 4, 33):
        logits = torch.randn(B, V, device="cuda", generator=g).to(torch.bfloat16)
        logits[0, V // 3] = logits[0, 2 * V // 3] = 50.0       # a tie across chunks
        n = min(B, 4)
        got_batch, want_batch = BatchState(40, 64, 16, "cuda"), BatchState(40, 64, 16, "cuda")
        got = record_greedy(logits, entries[:, :n], got_batch.tokens, got_batch.scratch)
        want = logits.argmax(-1)
        want_batch.record_sampled(entries[:, :n], want)
        assert torch.equal(got, want) and torch.equal(got_batch.tokens, want_batch.tokens), (V, B)
    assert not ticket_counters(torch.device("cuda"), 64).any()
