"""Triton attention kernels (codegen/attention.py and the files it re-exports) against the reference ops in fusegen.ops.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (slow: shapes are
tiny and odd on purpose; fp32 and fp16 only, bf16 arithmetic is broken in the interpreter).
Head dims include ones that are not a power of two (8, 24, 40, 80, 96: padded tiles), and
paged batches padded the way the runtime pads them (empty sequences, unowned tokens).
The ``gpu`` tests (``python -m pytest -m gpu tests/test_attention_kernels.py``) run bf16/fp16
on larger shapes against a float64 reference, plus CUDA-graph capture and registration.
"""

import os

import torch

if not torch.cuda.is_available():
    # Before triton is imported. conftest.py does the same; repeated here so that this file
    # also runs on its own. Never on a GPU machine: there the same tests run compiled kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusegen import ops  # noqa: E402
from fusegen.codegen import attention as attn  # noqa: E402
from fusegen.codegen.launch import ticket_counters  # noqa: E402
from helpers import assert_close_report  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def on_cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def reference(op, *args, dtype=None):
    """The reference op on CPU (on CUDA a registered kernel would answer instead)."""
    args = [on_cpu(a) for a in args]
    if dtype is not None:
        args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]
    return op(*args)


def paged_batch(seq_lens, q_lens, Hq, Hkv, D, block_size, dtype, pad_tokens=0, layers=2,
                seed=0, device=DEVICE):
    """Random pool (stale values everywhere), shuffled block tables padded with block 0 as the
    runtime pads them, packed queries [1, Hq, T, D] made by a transpose (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(need) + 3
    pool = torch.randn(layers, 2, num_blocks, block_size, Hkv, D, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(1, max(need))
    tables = []
    for n in need:
        tables.append(order[:n] + [0] * (width - n))
        order = order[n:]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    T = starts[-1] + pad_tokens
    q = torch.randn(1, T, Hq, D, generator=g).transpose(1, 2)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(q=q.to(device=device, dtype=dtype), kv_pool=pool.to(device=device, dtype=dtype),
                block_tables=torch.tensor(tables, **i32), seq_lens=torch.tensor(seq_lens, **i32),
                query_start_loc=torch.tensor(starts, **i32))


def run_paged(b, layer, scale, causal, window, softcap, **kw):
    args = (b["q"], b["kv_pool"], layer, b["block_tables"], b["seq_lens"], b["query_start_loc"],
            scale, causal, window, softcap)
    return attn.paged_attention(*args, **kw), args


# --- paged prefill / chunked prefill / mixed batches (T != N) ------------------------------

# (Hq, Hkv, D, block_size, seq_lens, q_lens, causal, window, softcap, pad_tokens)
PREFILL_CASES = {
    "prefill-gqa4/2-d16-b4": (4, 2, 16, 4, [1, 5, 17, 33], [1, 5, 17, 33], True, 0, 0.0, 0),
    "prefill-mqa3/1-d32-b8-window": (3, 1, 32, 8, [5, 17, 33], [5, 17, 33], True, 5, 0.0, 0),
    "chunked-mha2/2-d16-b16-softcap": (2, 2, 16, 16, [5, 17, 33], [2, 17, 7], True, 0, 30.0, 0),
    "chunked-noncausal-window-pad": (4, 2, 32, 4, [17, 33], [3, 20], False, 5, 0.0, 3),
    "mixed-decode-rows-window-softcap": (3, 1, 16, 8, [33, 6, 1, 9], [1, 6, 1, 2], True, 5, 30.0, 2),
    "noncausal-softcap": (4, 2, 16, 16, [17, 5], [17, 5], False, 0, 30.0, 0),
    "block-larger-than-tile-window": (2, 1, 16, 32, [70, 9], [40, 9], True, 5, 0.0, 0),
    "odd-block-size-gathers-rows": (2, 1, 16, 6, [23, 4], [10, 4], True, 7, 0.0, 1),
    # head dims that are not a power of two: computed in a tile padded to 128 (32 for 24)
    "d80-gqa4/2-chunked-pad": (4, 2, 80, 8, [9, 40], [9, 21], True, 0, 0.0, 2),
    "d96-mqa3/1-window-softcap": (3, 1, 96, 16, [33, 6], [17, 6], True, 5, 30.0, 1),
    "d24-gqa4/2-noncausal-gathers-rows": (4, 2, 24, 6, [14, 23], [14, 5], False, 0, 0.0, 0),
}


def with_dtypes(cases, fp16_cases):
    """Every case in fp32, the few named ones in fp16 as well (the interpreter is slow)."""
    return ([pytest.param(c, torch.float32, id=f"{c}-fp32") for c in cases]
            + [pytest.param(c, torch.float16, id=f"{c}-fp16") for c in fp16_cases])


@pytest.mark.parametrize("case, dtype", with_dtypes(
    PREFILL_CASES, ["prefill-gqa4/2-d16-b4", "mixed-decode-rows-window-softcap",
                    "d80-gqa4/2-chunked-pad"]))
def test_paged_prefill_matches_reference(case, dtype, nan_outputs):
    Hq, Hkv, D, bs, seq_lens, q_lens, causal, window, softcap, pad = PREFILL_CASES[case]
    b = paged_batch(seq_lens, q_lens, Hq, Hkv, D, bs, dtype, pad_tokens=pad)
    assert b["q"].shape[2] != len(seq_lens)  # the FlashAttention-2 path
    got, args = run_paged(b, 1, 1.0, causal, window, softcap)
    want = reference(ops.paged_attention, *args)
    atol, rtol = TOL[dtype]
    assert_close_report(got, want, atol, rtol, msg=case)
    if pad:
        assert torch.count_nonzero(got[:, :, -pad]) == 0


def test_paged_prefill_rows_before_first_start_are_zero():
    b = paged_batch([9, 4], [3, 4], 2, 1, 16, 4, torch.float32)
    b["query_start_loc"] = b["query_start_loc"] + 2  # rows 0, 1 belong to nobody
    b["q"] = torch.cat([b["q"], b["q"][:, :, :2]], dim=2)  # T = 9, N = 2
    got, args = run_paged(b, 0, 0.7, True, 0, 0.0)
    assert_close_report(got, reference(ops.paged_attention, *args), 1e-4, 1e-4)
    assert torch.count_nonzero(got[:, :, :2]) == 0


@pytest.fixture
def nan_outputs(monkeypatch):
    """The wrappers' ``torch.empty_like`` outputs and ``torch.empty`` workspaces (the split-KV
    partials) start as NaN, so a row no program writes, or a partial read that no program
    stored, shows up (a fresh CPU allocation is often zeros already)."""
    empty_like, empty = torch.empty_like, torch.empty

    def nan(out):
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: nan(empty_like(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: nan(empty(*args, **kwargs)))


# (Hq, Hkv, D, block_size, seq_lens, q_lens, pad_tokens), the runtime's padding: sequences
# with no queries (query_start_loc repeats, seq_len 0) and tokens past query_start_loc[N]
PADDED_BATCHES = {
    "N-padded-to-64-T-padded": (4, 2, 80, 8, [9, 40] + [0] * 62, [3, 21] + [0] * 62, 24),
    "zero-query-sequence-between": (3, 1, 96, 4, [7, 0, 12, 0], [4, 0, 12, 0], 5),
    "grid-bound-tight": (2, 1, 16, 4, [5, 9, 3], [1, 1, 1], 13),  # 3 + 1 tiles of 16 = 1 + 3
}


@pytest.mark.parametrize("case", PADDED_BATCHES)
def test_paged_prefill_padded_batch_matches_reference_and_zeroes_unowned_rows(case, nan_outputs):
    Hq, Hkv, D, bs, seq_lens, q_lens, pad = PADDED_BATCHES[case]
    b = paged_batch(seq_lens, q_lens, Hq, Hkv, D, bs, torch.float32, pad_tokens=pad)
    assert b["q"].shape[2] != len(seq_lens)  # the packed-tile prefill path
    got, args = run_paged(b, 1, 0.8, True, 0, 0.0)
    assert not got.isnan().any(), "a row no program wrote"
    assert_close_report(got, reference(ops.paged_attention, *args), 1e-4, 1e-4, msg=case)
    assert torch.count_nonzero(got[:, :, sum(q_lens):]) == 0


def test_packed_prefill_grid_covers_every_owned_and_unowned_tile():
    """sum_n cdiv(q_len_n, BLOCK_M) + cdiv(unowned rows, BLOCK_M) <= the grid's tiles."""
    g = torch.Generator().manual_seed(4)
    for _ in range(2000):
        block_m = (16, 32, 64)[int(torch.randint(3, (1,), generator=g))]
        n = int(torch.randint(1, 9, (1,), generator=g))
        q_lens = torch.randint(0, 3 * block_m, (n,), generator=g).tolist()
        before, after = torch.randint(0, 2 * block_m, (2,), generator=g).tolist()
        T = before + sum(q_lens) + after
        need = sum(-(-q // block_m) for q in q_lens) + -(-(before + after) // block_m)
        assert need <= attn.paged_prefill_grid(T, n, block_m, 1)[0], (block_m, q_lens, before, after)
    assert attn.paged_prefill_grid(2048, 64, 64, 32) == (96, 32)  # was 32 * 65 tiles per head


# --- decode (T == N): split-KV kernel and its reduction -----------------------------------

# (Hq, Hkv, D, block_size, seq_lens, q_lens, causal, window, softcap, num_splits)
DECODE_CASES = {
    "gqa4/2-d16-b4-auto-splits": (4, 2, 16, 4, [1, 5, 17, 33], [1, 1, 1, 1], True, 0, 0.0, None),
    "mqa3/1-d32-b8-window-4splits": (3, 1, 32, 8, [1, 5, 17, 33], [1, 1, 1, 1], True, 5, 0.0, 4),
    "mha2/2-d16-b16-softcap-2splits": (2, 2, 16, 16, [33, 2], [1, 1], True, 0, 30.0, 2),
    "noncausal-window-empty-splits": (4, 2, 16, 8, [9, 40, 3], [1, 1, 1], False, 5, 0.0, 8),
    "one-split-writes-out-directly": (4, 2, 32, 4, [17, 6], [1, 1], True, 0, 30.0, 1),
    "uneven-queries-per-sequence": (4, 2, 16, 4, [6, 3, 5], [2, 0, 1], True, 0, 0.0, 2),
    "padded-sequence-and-row": (3, 1, 16, 4, [5, 0, 7], [1, 0, 1], True, 0, 0.0, 1),
    "block-larger-than-tile-window": (2, 1, 16, 32, [70, 40], [1, 1], True, 21, 0.0, 2),
    "odd-block-size-window": (2, 1, 16, 6, [23, 35], [1, 1], False, 19, 0.0, 2),
    "d80-gqa4/2-4splits-window": (4, 2, 80, 8, [1, 21, 40], [1, 1, 1], True, 9, 0.0, 4),
    "d80-gqa4/2-one-split": (4, 2, 80, 4, [17, 6], [1, 1], True, 0, 30.0, 1),
    "d96-mqa3/1-auto-splits-padded-row": (3, 1, 96, 16, [33, 0, 7], [1, 0, 1], True, 0, 0.0, None),
    "d40-gqa4/2-2splits-uneven": (4, 2, 40, 4, [6, 3, 5], [2, 0, 1], True, 0, 0.0, 2),
}


@pytest.mark.parametrize("fused_reduce", [True, False], ids=["fused-reduce", "reduce-kernel"])
@pytest.mark.parametrize("case, dtype", with_dtypes(
    DECODE_CASES, ["gqa4/2-d16-b4-auto-splits", "mqa3/1-d32-b8-window-4splits",
                   "d80-gqa4/2-4splits-window"]))
def test_paged_decode_matches_reference(case, dtype, fused_reduce, nan_outputs):
    Hq, Hkv, D, bs, seq_lens, q_lens, causal, window, softcap, splits = DECODE_CASES[case]
    pad = len(seq_lens) - sum(q_lens)
    b = paged_batch(seq_lens, q_lens, Hq, Hkv, D, bs, dtype, pad_tokens=pad)
    assert b["q"].shape[2] == len(seq_lens)  # the split-KV path
    got, args = run_paged(b, 1, 1.0, causal, window, softcap, num_splits=splits,
                          fused_reduce=fused_reduce)
    want = reference(ops.paged_attention, *args)
    atol, rtol = TOL[dtype]
    assert_close_report(got, want, atol, rtol, msg=case)
    assert not got.isnan().any()
    if pad:
        assert torch.count_nonzero(got[:, :, -pad:]) == 0
    tickets = ticket_counters(b["q"].device, len(seq_lens) * Hkv)
    assert torch.count_nonzero(tickets) == 0, "a ticket counter left for the next launch"


def test_fused_decode_reduction_combines_many_splits_and_skips_unused_ones(nan_outputs):
    """64 splits (4 chunks of the combine) with contexts that use 0, 1, 2, 5, 33 and all 64 of
    them; a group of 9 query heads per KV head takes the combine's rolled head loop."""
    seq_lens = [0, 3, 20, 77, 520, 1024]  # the first a padded sequence: its row has no owner
    b = paged_batch(seq_lens, [0, 1, 1, 1, 1, 1], 9, 1, 8, 16, torch.float32, pad_tokens=1, layers=1)
    got, args = run_paged(b, 0, 0.5, True, 0, 0.0, num_splits=64)
    assert_close_report(got, reference(ops.paged_attention, *args), 1e-4, 1e-4)
    assert torch.count_nonzero(got[:, :, -1]) == 0
    assert torch.count_nonzero(ticket_counters(b["q"].device, 6)) == 0


def test_decode_split_heuristic_uses_shapes_only():
    sms = 132  # H100 / H200 multiprocessors; GQA 32/8 -> 8 KV heads
    assert attn.decode_num_splits(1, 8, 32768, sms) == 64     # capped at DECODE_MAX_SPLITS
    assert attn.decode_num_splits(1, 8, 1024, sms) == 16      # one 64-key tile per split
    assert attn.decode_num_splits(8, 8, 1024, sms) == 8       # 64 programs: under one wave
    assert attn.decode_num_splits(32, 8, 4096, sms) == 2      # 256 programs: a wave already
    assert attn.decode_num_splits(64, 8, 512, sms) == 1
    assert attn.decode_num_splits(1, 8, 16, sms) == 1  # never a split shorter than the minimum
    for T in (1, 3, 64, 4096):
        s = attn.decode_num_splits(T, 8, 1 << 20, sms)
        assert s & (s - 1) == 0 and 1 <= s <= attn.DECODE_MAX_SPLITS


# --- dense flash attention -----------------------------------------------------------------

# (B, Hq, Hkv, S, L, D, causal, window, softcap)
FLASH_CASES = {
    "gqa4/2-s37-causal": (2, 4, 2, 37, 37, 32, True, 0, 0.0),
    "mqa3/1-s21-window-softcap": (1, 3, 1, 21, 21, 16, True, 5, 30.0),
    "noncausal-window": (1, 2, 2, 19, 19, 16, False, 5, 0.0),
    "fewer-queries-than-keys": (2, 2, 1, 7, 30, 16, True, 0, 0.0),
    "d80-gqa4/2-s19-causal": (2, 4, 2, 19, 19, 80, True, 0, 0.0),
    "d96-mqa2/1-fewer-queries-window-softcap": (1, 2, 1, 9, 26, 96, True, 7, 30.0),
    "d8-noncausal": (1, 2, 2, 11, 11, 8, False, 0, 0.0),
}


@pytest.mark.parametrize("case, dtype", with_dtypes(FLASH_CASES, ["gqa4/2-s37-causal",
                                                                  "d80-gqa4/2-s19-causal"]))
def test_flash_attention_matches_reference(case, dtype):
    B, Hq, Hkv, S, L, D, causal, window, softcap = FLASH_CASES[case]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, S, Hq, D, generator=g).transpose(1, 2).to(DEVICE, dtype)  # HF layout
    k = torch.randn(B, Hkv, L, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2).to(DEVICE, dtype)
    got = attn.flash_attention(q, k, v, 0.9, causal, window, softcap)
    want = reference(ops.attention, q, k, v, None, 0.9, causal, window, softcap)
    atol, rtol = TOL[dtype]
    assert_close_report(got, want, atol, rtol, msg=case)


def test_prefill_configs_have_tile_keys():
    tiles = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    for name, cfg in attn.PREFILL_CONFIGS.items():
        assert tiles <= set(cfg) <= tiles | {"kernel", "tma", "persistent", "warp_specialize"}, name
        assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16, name


# --- paged KV write ------------------------------------------------------------------------

@pytest.mark.parametrize("Hkv, D, bs, pool_dtype, kv_dtype", [
    (2, 16, 4, torch.float32, torch.float32),
    (3, 24, 8, torch.float16, torch.float32),  # odd heads, head dim not a power of two, cast
])
def test_paged_kv_write_matches_reference(Hkv, D, bs, pool_dtype, kv_dtype):
    g = torch.Generator().manual_seed(2)
    T, num_blocks = 7, 5
    pool = torch.randn(2, 2, num_blocks, bs, Hkv, D, generator=g).to(DEVICE, pool_dtype)
    k = torch.randn(1, T, Hkv, D, generator=g).transpose(1, 2).to(DEVICE, kv_dtype)
    v = torch.randn(1, T, Hkv, D, generator=g).transpose(1, 2).to(DEVICE, kv_dtype)
    slots = torch.tensor([3, -1, 0, bs * 4 + 1, -1, bs + 2, bs * 2], dtype=torch.int32, device=DEVICE)
    before = pool.clone()
    want = before.cpu()
    reference(ops.paged_kv_write, want, 1, k, v, slots)
    attn.paged_kv_write(pool, 1, k, v, slots)
    assert torch.equal(pool.cpu(), want)
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots[slots >= 0].long().cpu()] = True
    untouched = ~written.view(num_blocks, bs)
    assert torch.equal(pool[1, :, untouched].cpu(), before[1, :, untouched].cpu())
    assert torch.equal(pool[0].cpu(), before[0].cpu())  # other layers untouched


# --- errors ----------------------------------------------------------------------------------

def test_paged_attention_rejects_bad_inputs_with_shapes():
    b = paged_batch([5, 3], [5, 3], 4, 2, 16, 4, torch.float32)
    base = [b["q"], b["kv_pool"], 0, b["block_tables"], b["seq_lens"], b["query_start_loc"],
            1.0, True, 0, 0.0]

    def call(**changes):
        args = list(base)
        names = ["q", "kv_pool", "layer", "block_tables", "seq_lens", "query_start_loc"]
        for name, value in changes.items():
            args[names.index(name)] = value
        return attn.paged_attention(*args)

    with pytest.raises(ValueError, match=r"packed as \[1, Hq, T, D\], got \(2, 4, 8, 16\)"):
        call(q=torch.zeros(2, 4, 8, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"q \(1, 3, 8, 16\) does not fit the pool's 2 KV heads"):
        call(q=torch.zeros(1, 3, 8, 16, device=DEVICE))
    with pytest.raises(ValueError, match="head dim 20 is not supported .* multiples of 8 from 8 to 256"):
        call(q=torch.zeros(1, 4, 8, 20, device=DEVICE),
             kv_pool=torch.zeros(2, 2, 4, 4, 2, 20, device=DEVICE))
    with pytest.raises(ValueError, match="float64"):
        call(q=b["q"].double())
    with pytest.raises(ValueError, match=r"N\+1 = 3 entries, got shape \(2,\)"):
        call(query_start_loc=b["query_start_loc"][:2])
    with pytest.raises(ValueError, match="seq_lens must be int32, got torch.int64"):
        call(seq_lens=b["seq_lens"].long())
    with pytest.raises(ValueError, match="layer 5 out of range for a pool of 2 layers"):
        call(layer=5)


def test_check_head_dim_names_the_head_dim_and_what_is_served():
    for d in (8, 24, 64, 80, 96, 112, 128, 200, 256):
        attn.check_head_dim(d)
    for d in (0, 4, 20, 100, 264, 320, 512):
        with pytest.raises(ValueError, match=rf"head dim {d} is not supported by the Triton "
                                             r"attention kernels, .*multiples of 8 from 8 to 256"):
            attn.check_head_dim(d)
    q = torch.zeros(1, 2, 4, 100, device=DEVICE)
    with pytest.raises(ValueError, match="flash_attention: head dim 100 is not supported"):
        attn.flash_attention(q, q, q, 1.0, True)


def test_flash_and_write_reject_bad_inputs_with_shapes():
    q = torch.zeros(1, 4, 8, 16, device=DEVICE)
    kv = torch.zeros(1, 3, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"q \(1, 4, 8, 16\) and k \(1, 3, 8, 16\)"):
        attn.flash_attention(q, kv, kv, 1.0, True)
    with pytest.raises(ValueError, match="8 queries but only 4 keys"):
        short = torch.zeros(1, 2, 4, 16, device=DEVICE)
        attn.flash_attention(q, short, short, 1.0, True)
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        attn.flash_attention(q, q, q, 1.0, True, config="huge")
    pool = torch.zeros(1, 2, 4, 4, 2, 16, device=DEVICE)
    k = torch.zeros(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"3 tokens but slot_mapping has shape \(2,\)"):
        attn.paged_kv_write(pool, 0, k, k, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"does not fit the pool's 2 KV heads of dim 16"):
        attn.paged_kv_write(pool, 0, torch.zeros(1, 1, 3, 16, device=DEVICE),
                            torch.zeros(1, 1, 3, 16, device=DEVICE),
                            torch.zeros(3, dtype=torch.int32, device=DEVICE))


def test_register_is_idempotent_and_leaves_cpu_on_the_reference():
    attn.register()
    attn.register()
    b = paged_batch([5, 3], [2, 3], 2, 1, 16, 4, torch.float32, device="cpu")
    args = (b["q"], b["kv_pool"], 0, b["block_tables"], b["seq_lens"], b["query_start_loc"],
            1.0, True, 0, 0.0)
    assert torch.equal(torch.ops.fusegen.paged_attention(*args), ops.paged_attention._init_fn(*args))


# --- GPU: larger odd shapes, bf16/fp16 against float64; CUDA graphs; registration ------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal, window, softcap", [(True, 0, 0.0), (True, 64, 30.0),
                                                     (False, 0, 0.0)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", ["prefill", "chunked", "decode"])
def test_gpu_paged_attention_against_float64(kind, D, causal, window, softcap, dtype):
    seq_lens = [333, 17, 1000, 4099, 1]
    q_lens = {"prefill": [333, 17, 100, 1, 1], "chunked": [96, 5, 333, 7, 1],
              "decode": [1, 1, 1, 1, 1]}[kind]
    b = paged_batch(seq_lens, q_lens, 8, 2, D, 16, dtype, pad_tokens=3 if kind != "decode" else 0)
    got, args = run_paged(b, 1, D ** -0.5, causal, window, softcap)
    want = reference(ops.paged_attention, *args, dtype=torch.float64)
    atol, rtol = TOL[dtype]
    assert_close_report(got, want, atol, rtol, msg=f"{kind} D{D}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, Hq, Hkv, S, L, D, causal, window, softcap", [
    (2, 8, 2, 333, 333, 128, True, 0, 0.0),
    (1, 4, 4, 517, 517, 64, True, 100, 30.0),
    (2, 6, 1, 129, 400, 128, False, 0, 0.0),
])
def test_gpu_flash_attention_against_float64(B, Hq, Hkv, S, L, D, causal, window, softcap, dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, S, Hq, D, generator=g).transpose(1, 2).to("cuda", dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to("cuda", dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to("cuda", dtype)
    got = attn.flash_attention(q, k, v, D ** -0.5, causal, window, softcap)
    want = reference(ops.attention, q, k, v, None, D ** -0.5, causal, window, softcap,
                     dtype=torch.float64)
    atol, rtol = TOL[dtype]
    assert_close_report(got, want, atol, rtol)


@pytest.mark.gpu
@needs_gpu
def test_gpu_decode_step_replays_in_a_cuda_graph():
    dtype, bs = torch.bfloat16, 16
    b = paged_batch([48, 320, 16], [1, 1, 1], 8, 2, 128, bs, dtype)  # blocks for the lens below
    k_new = torch.randn(1, 3, 2, 128, device="cuda", dtype=dtype).transpose(1, 2)
    slots = torch.zeros(3, dtype=torch.int32, device="cuda")

    def step():
        attn.paged_kv_write(b["kv_pool"], 1, k_new, k_new, slots)
        return run_paged(b, 1, 0.1, True, 0, 0.0)[0]

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lens in ([41, 301, 8], [45, 310, 9]):
        b["seq_lens"].copy_(torch.tensor(lens))
        slots.copy_(torch.tensor([b["block_tables"][n, (L - 1) // bs].item() * bs + (L - 1) % bs
                                  for n, L in enumerate(lens)]))
        b["q"].normal_()
        k_new.normal_()
        graph.replay()
        want_pool = b["kv_pool"].cpu()  # already written by the replay; checked below
        want = reference(ops.paged_attention, b["q"], want_pool, 1, b["block_tables"],
                         b["seq_lens"], b["query_start_loc"], 0.1, True, 0, 0.0, dtype=torch.float64)
        assert_close_report(out, want, *TOL[dtype])
        written = want_pool[1, 0].view(-1, 2, 128)[slots.long().cpu()]
        assert torch.equal(written, k_new[0].transpose(0, 1).cpu())


@pytest.mark.gpu
@needs_gpu
def test_gpu_registered_ops_dispatch_to_the_kernels():
    attn.register()
    b = paged_batch([50, 9], [50, 9], 4, 2, 64, 16, torch.bfloat16)
    args = (b["q"], b["kv_pool"], 0, b["block_tables"], b["seq_lens"], b["query_start_loc"],
            0.125, True, 0, 0.0)
    assert torch.equal(torch.ops.fusegen.paged_attention(*args), attn.paged_attention(*args))
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 33, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(torch.ops.fusegen.attention(q, k, k, None, 0.125, True, 0, 0.0),
                       attn.flash_attention(q, k, k, 0.125, True))
    mask = torch.ones(2, 33, dtype=torch.bool, device="cuda")
    mask[0, :4] = False  # key mask: the reference answers
    got = torch.ops.fusegen.attention(q, k, k, mask, 0.125, True, 0, 0.0)
    want = reference(ops.attention, q, k, k, mask, 0.125, True, 0, 0.0)
    assert_close_report(got, want, *TOL[torch.bfloat16])
