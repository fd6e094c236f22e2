"""The step-inputs kernel (codegen/step_inputs.py) against ``BatchState.reference_step_inputs``:
identical tensors for decode, prefill, chunked and mixed steps, padding entries and padded
token counts, at odd sizes. On CUDA where there is one; on a CPU machine under
TRITON_INTERPRET=1 (tests/conftest.py sets it)."""

import os
import random

import pytest
import torch

from fusegen.codegen.step_inputs import step_inputs
from fusegen.kv import PAGED_INPUTS
from fusegen.runtime.batch import BatchState

DEVICE = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"

MAX_ROWS, MAX_LEN, BLOCK = 7, 70, 16


def _batch(seed: int) -> BatchState:
    g = torch.Generator().manual_seed(seed)
    batch = BatchState(MAX_ROWS, MAX_LEN, BLOCK, DEVICE)
    batch.tokens.copy_(torch.randint(3, 1000, batch.tokens.shape, generator=g))
    batch.block_table.copy_(torch.randint(0, 50, batch.block_table.shape, generator=g, dtype=torch.int32))
    return batch


def _entries(rows, starts, counts, padding: int, batch: BatchState) -> torch.Tensor:
    """(row, start, count, samples) columns, with ``padding`` padding entries at the end."""
    rows = list(rows) + [batch.padding_row] * padding
    starts, counts = list(starts) + [0] * padding, list(counts) + [0] * padding
    return torch.tensor([rows, starts, counts, [int(c > 0) for c in counts]], dtype=torch.int32, device=DEVICE)


CASES = {
    "decode_one": ([3], [41], [1], 0, 1),
    "decode_batch_with_padding": ([0, 5, 2], [9, 63, 16], [1, 1, 1], 5, 8),
    "prefill_one_padded_tokens": ([4], [0], [37], 0, 48),
    "chunked_prefill_from_a_cached_prefix": ([1], [32], [21], 0, 21),
    "mixed_prefill_and_decode": ([6, 0, 3, 2], [0, 50, 17, 5], [19, 1, 7, 1], 3, 40),
    "entries_with_no_tokens": ([1, 2], [10, 0], [0, 5], 1, 5),
    "more_entries_than_tokens": ([0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9], [1] * 7, 0, 7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_gives_the_reference_inputs(case):
    rows, starts, counts, padding, num_tokens = CASES[case]
    batch = _batch(seed=len(case))
    entries = _entries(rows, starts, counts, padding, batch)
    pool = torch.zeros(1)
    want = batch.reference_step_inputs(entries, num_tokens, pool)
    got = step_inputs(entries, num_tokens, batch.tokens, batch.block_table, BLOCK, batch.padding_row)
    for name in PAGED_INPUTS:
        if name == "kv_pool":
            continue
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), f"{name}: got {got[name]}, want {want[name]}"


def test_random_steps_match_the_reference():
    rng = random.Random(0)
    for trial in range(12):
        batch = _batch(seed=100 + trial)
        n = rng.randint(1, MAX_ROWS)
        rows = rng.sample(range(MAX_ROWS), n)
        counts = [rng.choice([0, 1, 1, rng.randint(1, 30)]) for _ in rows]
        starts = [rng.randint(0, MAX_LEN - c) for c in counts]
        padding = rng.randint(0, 4)
        num_tokens = sum(counts) + rng.randint(0, 9)
        entries = _entries(rows, starts, counts, padding, batch)
        want = batch.reference_step_inputs(entries, num_tokens, None)
        got = step_inputs(entries, num_tokens, batch.tokens, batch.block_table, BLOCK, batch.padding_row)
        for name in PAGED_INPUTS:
            if name != "kv_pool":
                assert torch.equal(got[name], want[name]), (trial, name)


def test_step_inputs_uses_the_kernel_where_kernels_run(monkeypatch):
    batch = _batch(seed=7)
    entries = _entries([2, 5], [3, 0], [1, 9], 2, batch)
    monkeypatch.setenv("FUSEGEN_KERNELS", "1")
    calls = []
    import fusegen.codegen.step_inputs as module

    real = module.step_inputs
    monkeypatch.setattr(module, "step_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = batch.step_inputs(entries, 12, "pool")
    assert calls == [1] and got["kv_pool"] == "pool" and list(got) == list(PAGED_INPUTS)
    want = batch.reference_step_inputs(entries, 12, "pool")
    assert all(torch.equal(got[k], want[k]) for k in PAGED_INPUTS if k != "kv_pool")


def test_entries_of_the_wrong_type_are_refused():
    batch = _batch(seed=1)
    with pytest.raises(ValueError, match="int32"):
        step_inputs(torch.zeros(4, 2, dtype=torch.long, device=DEVICE), 2, batch.tokens, batch.block_table, BLOCK, 7)
