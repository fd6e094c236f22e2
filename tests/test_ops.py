"""Reference implementations of the fusegen:: ops (fusegen/ops.py) against independent oracles.

The ops are the test oracle for every kernel, so they are checked here against
``F.scaled_dot_product_attention`` with masks built element by element from the masking rule
in the ops module docstring (query i sits at key position L - S + i), against hand-written
softcap attention, and the cache/pool variants against plain ``attention`` on dense k/v.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fusegen  # noqa: F401  (registers torch.ops.fusegen)
from helpers import assert_close_report

ops = torch.ops.fusegen

# (B, Hq, Hkv, S, D): single token MQA, odd GQA, plain MHA.
SHAPES = [(1, 4, 1, 1, 8), (3, 6, 2, 13, 24), (2, 8, 8, 37, 16)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-5}  # the ops compute in float32, see below


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def keep_mask(S: int, L: int, causal: bool, window: int, key_mask=None, B: int = 1) -> torch.Tensor:
    """[B, 1, S, L] bool, one element at a time, straight from the rule in fusegen/ops.py."""
    keep = torch.zeros(B, 1, S, L, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            p = L - S + i
            for j in range(L):
                ok = (not causal or j <= p) and (window == 0 or p - j < window)
                if key_mask is not None:
                    ok = ok and bool(key_mask[b, j])
                keep[b, 0, i, j] = ok
    return keep


def padding_mask(B: int, L: int) -> torch.Tensor:
    """[B, L] int64 like an HF attention_mask: row b has left padding and, if long enough, holes."""
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        pad = min(3 * b + 1, L - 1)
        mask[b, :pad] = 0
        if L - pad > 6:
            mask[b, pad + 2] = 0
            mask[b, L - 3 - b] = 0
    return mask


def sdpa_reference(q, k, v, keep, scale):
    """SDPA in float64 with k/v expanded to the query heads; rows without keys are NaN/garbage."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=keep, scale=scale)


def check_against_sdpa(got, q, k, v, keep, scale, atol):
    """Rows with at least one key must match SDPA; rows with none must be exactly zero."""
    has_key = keep.any(-1, keepdim=True)  # [B, 1, S, 1]
    want = torch.where(has_key, sdpa_reference(q, k, v, keep, scale), 0.0)
    assert_close_report(got, want.to(got.dtype), atol=atol, rtol=atol)
    no_key = ~has_key.expand_as(got)
    assert torch.equal(got[no_key], torch.zeros_like(got[no_key]))


# --- attention -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_sdpa(shape, causal, window, padded, dtype):
    B, Hq, Hkv, S, D = shape
    gen = _gen(S)
    q, k, v = (_randn(B, h, S, D, gen=gen, dtype=dtype) for h in (Hq, Hkv, Hkv))
    key_mask = padding_mask(B, S) if padded else None
    scale = 1.0 / math.sqrt(D)
    got = ops.attention(q, k, v, key_mask, scale, causal, window, 0.0)
    assert got.shape == q.shape and got.dtype == dtype
    keep = keep_mask(S, S, causal, window, key_mask, B)
    check_against_sdpa(got, q, k, v, keep, scale, TOL[dtype])


def test_attention_fully_masked_rows_are_zero():
    gen = _gen(1)
    q, k, v = _randn(2, 4, 6, 8, gen=gen), _randn(2, 2, 6, 8, gen=gen), _randn(2, 2, 6, 8, gen=gen)
    key_mask = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    out = ops.attention(q, k, v, key_mask, 0.35, True, 0, 0.0)
    assert torch.equal(out[0], torch.zeros_like(out[0]))          # no key at all
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))  # only padding behind them
    assert out[1, :, 2:].abs().amin() > 0


def test_attention_bool_and_int_key_masks_agree():
    gen = _gen(2)
    q, k, v = _randn(3, 6, 13, 24, gen=gen), _randn(3, 2, 13, 24, gen=gen), _randn(3, 2, 13, 24, gen=gen)
    key_mask = padding_mask(3, 13)
    as_int = ops.attention(q, k, v, key_mask, 0.2, True, 5, 0.0)
    as_bool = ops.attention(q, k, v, key_mask.bool(), 0.2, True, 5, 0.0)
    assert torch.equal(as_int, as_bool)


def test_attention_keeps_float64_precision():
    gen = _gen(3)
    q, k, v = (_randn(2, h, 13, 16, gen=gen, dtype=torch.float64) for h in (4, 2, 2))
    got = ops.attention(q, k, v, None, 0.25, True, 0, 0.0)
    check_against_sdpa(got, q, k, v, keep_mask(13, 13, True, 0), 0.25, atol=1e-12)


def manual_softcap_attention(q, k, v, keep, scale, softcap):
    """Float64, GQA by indexing kv head h // group (no expansion), tanh(s / c) * c."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        scores = torch.einsum("bsd,bld->bsl", q[:, h].double(), kh) * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~keep[:, 0], float("-inf"))
        out[:, h] = torch.einsum("bsl,bld->bsd", torch.softmax(scores, dim=-1), vh)
    return out


@pytest.mark.parametrize("window", [0, 5])
def test_attention_softcap(window):
    B, Hq, Hkv, S, D = 2, 6, 2, 13, 24
    gen = _gen(4)
    q = 4 * _randn(B, Hq, S, D, gen=gen)  # large scores, so the cap matters
    k, v = _randn(B, Hkv, S, D, gen=gen), _randn(B, Hkv, S, D, gen=gen)
    key_mask = padding_mask(B, S)
    scale, softcap = 1.0 / math.sqrt(D), 5.0
    got = ops.attention(q, k, v, key_mask, scale, True, window, softcap)
    keep = keep_mask(S, S, True, window, key_mask, B)
    want = manual_softcap_attention(q, k, v, keep, scale, softcap)
    want = torch.where(keep.any(-1, keepdim=True), want, 0.0)
    assert_close_report(got, want.float(), atol=1e-5, rtol=1e-5)
    uncapped = ops.attention(q, k, v, key_mask, scale, True, window, 0.0)
    assert (got - uncapped).abs().max() > 1e-2


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("S,L", [(1, 9), (4, 9), (7, 23)])
def test_attention_bottom_right_causal(S, L, window):
    """Fewer queries than keys: the queries are the LAST S positions of the context."""
    B, Hq, Hkv, D = 2, 4, 2, 16
    gen = _gen(5)
    q_all = _randn(B, Hq, L, D, gen=gen)
    k, v = _randn(B, Hkv, L, D, gen=gen), _randn(B, Hkv, L, D, gen=gen)
    key_mask = padding_mask(B, L)
    q = q_all[:, :, L - S:]
    got = ops.attention(q, k, v, key_mask, 0.25, True, window, 0.0)
    full = ops.attention(q_all, k, v, key_mask, 0.25, True, window, 0.0)
    assert_close_report(got, full[:, :, L - S:], atol=1e-6, rtol=1e-6)
    check_against_sdpa(got, q, k, v, keep_mask(S, L, True, window, key_mask, B), 0.25, 1e-5)
    # Top-left alignment (SDPA's is_causal with S < L) would be a different answer.
    top_left = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              is_causal=True, scale=0.25)
    assert (got - top_left).abs().max() > 1e-2


# --- dense KV cache --------------------------------------------------------------------------

@pytest.mark.parametrize("window", [0, 3])
def test_dense_cache_prefill_then_decode(window):
    layers, layer, B, Hq, Hkv, Smax, D = 3, 1, 2, 4, 2, 16, 8
    prompt, steps = 5, 4
    gen = _gen(6)
    total = prompt + steps
    q_all = _randn(B, Hq, total, D, gen=gen)
    k_all, v_all = _randn(B, Hkv, total, D, gen=gen), _randn(B, Hkv, total, D, gen=gen)
    mask_all = torch.ones(B, total, dtype=torch.long)
    mask_all[1, :2] = 0  # row 1 is left-padded
    kv_cache = torch.zeros(layers, 2, B, Hkv, Smax, D)
    scale = 1.0 / math.sqrt(D)

    spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]
    for start, L in spans:
        key_mask = mask_all[:, :L]
        ops.dense_kv_write(kv_cache, layer, k_all[:, :, start:L], v_all[:, :, start:L], key_mask)
        q = q_all[:, :, start:L]
        got = ops.dense_kv_attention(q, kv_cache, layer, key_mask, scale, True, window, 0.0)
        want = ops.attention(q, k_all[:, :, :L], v_all[:, :, :L], key_mask, scale, True, window, 0.0)
        assert_close_report(got, want, atol=1e-6, rtol=1e-6, msg=f"context length {L}")
        assert torch.equal(kv_cache[layer, 0, :, :, :L], k_all[:, :, :L])
        assert torch.equal(kv_cache[layer, 1, :, :, :L], v_all[:, :, :L])
        assert not kv_cache[layer, :, :, :, L:].any()  # nothing written past the context
    others = [i for i in range(layers) if i != layer]
    assert not kv_cache[others].any()


# --- paged KV pool ---------------------------------------------------------------------------

SEQ_LENS = (1, 5, 17, 33)
PAGED_VARIANTS = {  # name: (causal, window, softcap)
    "causal": (True, 0, 0.0),
    "window5": (True, 5, 0.0),
    "full_softcap": (False, 0, 3.0),
}


def random_block_tables(seq_lens, block_size, gen, spare=3):
    """Blocks of every sequence drawn from a random permutation of the pool's block ids.
    Unused table entries are 0, as the runtime pads them."""
    needed = [-(-L // block_size) for L in seq_lens]
    num_blocks = sum(needed) + spare
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    for n, count in enumerate(needed):
        tables[n, :count] = torch.tensor(ids[:count], dtype=torch.int32)
        ids = ids[count:]
    return tables, num_blocks


def slot_of(tables, n, position, block_size) -> int:
    return int(tables[n, position // block_size]) * block_size + position % block_size


def packed(tensors, spans):
    """Concatenate tensors[n][:, a:b] for (a, b) in spans along the token dim -> [1, H, T, D]."""
    return torch.cat([t[:, a:b] for t, (a, b) in zip(tensors, spans)], dim=1)[None]


def write_tokens(pool, layer, ks, vs, tables, spans, block_size, padding=0):
    """paged_kv_write of positions a..b-1 of every sequence, plus ``padding`` junk tokens with
    slot -1 at the end (as a padded batch would carry)."""
    slots = [slot_of(tables, n, p, block_size) for n, (a, b) in enumerate(spans) for p in range(a, b)]
    k, v = packed(ks, spans), packed(vs, spans)
    if padding:
        junk = torch.full((1, k.shape[1], padding, k.shape[3]), 1e4)
        k, v = torch.cat([k, junk], dim=2), torch.cat([v, junk], dim=2)
        slots += [-1] * padding
    ops.paged_kv_write(pool, layer, k, v, torch.tensor(slots, dtype=torch.int32))


def query_lens(mode: str, seq_lens) -> list[int]:
    if mode == "prefill":
        return list(seq_lens)
    if mode == "chunked":
        return [min(L, 3) for L in seq_lens]
    return [1] * len(seq_lens)


@pytest.mark.parametrize("variant", list(PAGED_VARIANTS))
@pytest.mark.parametrize("mode", ["prefill", "chunked", "decode"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_write_and_attention(block_size, mode, variant):
    causal, window, softcap = PAGED_VARIANTS[variant]
    layers, layer, Hq, Hkv, D, padding = 2, 1, 6, 2, 8, 2
    gen = _gen(7 + block_size)
    tables, num_blocks = random_block_tables(SEQ_LENS, block_size, gen)
    ks = [_randn(Hkv, L, D, gen=gen) for L in SEQ_LENS]
    vs = [_randn(Hkv, L, D, gen=gen) for L in SEQ_LENS]
    qs = [_randn(Hq, L, D, gen=gen) for L in SEQ_LENS]
    pool = _randn(layers, 2, num_blocks, block_size, Hkv, D, gen=gen)
    expected_pool = pool.clone()

    q_lens = query_lens(mode, SEQ_LENS)
    old = [(0, L - n) for L, n in zip(SEQ_LENS, q_lens)]
    new = [(L - n, L) for L, n in zip(SEQ_LENS, q_lens)]
    if any(b > a for a, b in old):
        write_tokens(pool, layer, ks, vs, tables, old, block_size)
    write_tokens(pool, layer, ks, vs, tables, new, block_size, padding=padding)

    # The pool holds every token at (block_tables[n][p // bs], p % bs) and nothing else changed;
    # in particular the slot -1 junk went nowhere.
    for n, L in enumerate(SEQ_LENS):
        for p in range(L):
            block, offset = int(tables[n, p // block_size]), p % block_size
            assert torch.equal(pool[layer, 0, block, offset], ks[n][:, p]), (n, p)
            assert torch.equal(pool[layer, 1, block, offset], vs[n][:, p]), (n, p)
            expected_pool[layer, 0, block, offset] = ks[n][:, p]
            expected_pool[layer, 1, block, offset] = vs[n][:, p]
    assert torch.equal(pool, expected_pool)

    q = packed(qs, new)
    q = torch.cat([q, torch.zeros(1, Hq, padding, D)], dim=2)  # padded rows have no sequence
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    got = ops.paged_attention(q, pool, layer, tables, seq_lens, starts, scale, causal, window, softcap)
    assert got.shape == q.shape
    for n, (a, b) in enumerate(new):
        want = ops.attention(qs[n][None, :, a:b], ks[n][None], vs[n][None], None, scale, causal,
                             window, softcap)
        s0, s1 = int(starts[n]), int(starts[n + 1])
        assert_close_report(got[:, :, s0:s1], want, atol=1e-5, rtol=1e-5, msg=f"sequence {n}")


def test_paged_write_skips_negative_slots_and_casts():
    """-1 slots anywhere in the batch are skipped; values land in the pool's dtype."""
    block_size, Hkv, D = 4, 2, 8
    gen = _gen(8)
    pool = _randn(2, 2, 5, block_size, Hkv, D, gen=gen, dtype=torch.float16)
    before = pool.clone()
    k, v = _randn(1, Hkv, 6, D, gen=gen), _randn(1, Hkv, 6, D, gen=gen)
    slots = torch.tensor([9, -1, 0, -1, 19, 6], dtype=torch.int32)
    ops.paged_kv_write(pool, 0, k, v, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            block, offset = divmod(slot, block_size)
            assert torch.equal(pool[0, 0, block, offset], k[0, :, t].half())
            assert torch.equal(pool[0, 1, block, offset], v[0, :, t].half())
            before[0, 0, block, offset] = k[0, :, t].half()
            before[0, 1, block, offset] = v[0, :, t].half()
    assert torch.equal(pool, before)


@pytest.mark.parametrize("variant", list(PAGED_VARIANTS))
def test_paged_attention_mixed_step_with_stale_nan_slots(variant):
    """One call holding decodes, a chunk, a full prefill and a sequence with no queries
    (three query-count groups, one of them padded to its longest context): every sequence
    matches plain attention, and NaN in slots past a sequence's length never leaks in."""
    causal, window, softcap = PAGED_VARIANTS[variant]
    Hq, Hkv, D, bs = 6, 2, 8, 4
    gen = _gen(21)
    seq_lens = [9, 3, 14, 6, 11, 5]
    q_lens = [1, 1, 4, 6, 0, 1]
    tables, num_blocks = random_block_tables(seq_lens, bs, gen)
    pool = torch.full((1, 2, num_blocks, bs, Hkv, D), float("nan"))
    ks = [_randn(Hkv, L, D, gen=gen) for L in seq_lens]
    vs = [_randn(Hkv, L, D, gen=gen) for L in seq_lens]
    for n, L in enumerate(seq_lens):
        for p in range(L):
            pool[0, :, int(tables[n, p // bs]), p % bs] = torch.stack([ks[n][:, p], vs[n][:, p]])
    qs = [_randn(Hq, c, D, gen=gen) for c in q_lens]
    q = torch.cat(qs, dim=1)[None]
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    got = ops.paged_attention(q, pool, 0, tables, torch.tensor(seq_lens, dtype=torch.int32), starts,
                              0.3, causal, window, softcap)
    assert not got.isnan().any()
    for n, (L, c) in enumerate(zip(seq_lens, q_lens)):
        want = ops.attention(qs[n][None], ks[n][None], vs[n][None], None, 0.3, causal, window, softcap)
        assert_close_report(got[:, :, int(starts[n]):int(starts[n + 1])], want, atol=1e-6, rtol=1e-5,
                            msg=f"sequence {n}")


@pytest.mark.parametrize("L", [1, 7, 300])
def test_single_query_attention_matches_float64(L):
    """Decode-shaped attention (one query per row) takes the CPU's on-thread path; it stays
    within fp32 rounding of SDPA in float64."""
    gen = _gen(L)
    q, k, v = _randn(3, 6, 1, 16, gen=gen), _randn(3, 2, L, 16, gen=gen), _randn(3, 2, L, 16, gen=gen)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, : L // 2] = 0
    got = ops.attention(q, k, v, mask, 0.25, True, 0, 0.0)
    check_against_sdpa(got, q, k, v, keep_mask(1, L, True, 0, mask, B=3), 0.25, atol=1e-6)


# --- error paths -----------------------------------------------------------------------------

def test_attention_rejects_mismatched_heads():
    q, k = torch.zeros(1, 6, 3, 8), torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match=r"fusegen\.attention.*q \(1, 6, 3, 8\), k \(1, 4, 3, 8\)"):
        ops.attention(q, k, k, None, 1.0, True, 0, 0.0)


def test_attention_rejects_mismatched_head_dim():
    q, k = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match=r"q \(1, 4, 3, 8\), k \(1, 2, 3, 16\)"):
        ops.attention(q, k, k, None, 1.0, True, 0, 0.0)


def test_attention_rejects_bad_ranks_and_kv_shapes():
    q, k, v = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\(1, 4, 3, 8\).*\(1, 2, 3, 8\).*\(1, 2, 5, 8\)"):
        ops.attention(q, k, v, None, 1.0, True, 0, 0.0)
    with pytest.raises(ValueError, match=r"q \(4, 3, 8\)"):
        ops.attention(q[0], k, k, None, 1.0, True, 0, 0.0)


def test_dense_kv_errors():
    cache = torch.zeros(1, 2, 1, 2, 4, 8)
    k = torch.zeros(1, 2, 1, 8)
    with pytest.raises(ValueError, match=r"context length 5 exceeds the cache's 4"):
        ops.dense_kv_write(cache, 0, k, k, torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"q \(1, 3, 1, 8\), k \(1, 2, 4, 8\)"):
        ops.dense_kv_attention(torch.zeros(1, 3, 1, 8), cache, 0, torch.ones(1, 4), 1.0, True, 0, 0.0)


def test_paged_attention_more_queries_than_context():
    pool = torch.zeros(1, 2, 4, 4, 2, 8)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    q = torch.zeros(1, 4, 6, 8)
    seq_lens = torch.tensor([2, 3], dtype=torch.int32)
    starts = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sequence 1 has 4 queries but only 3 tokens"):
        ops.paged_attention(q, pool, 0, tables, seq_lens, starts, 1.0, True, 0, 0.0)


def test_paged_errors_on_unpacked_queries_and_slot_count():
    pool = torch.zeros(1, 2, 4, 4, 2, 8)
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"packed as \[1,Hq,T,D\], got \(2, 4, 1, 8\)"):
        ops.paged_attention(torch.zeros(2, 4, 1, 8), pool, 0, tables, torch.tensor([1, 1]),
                            torch.tensor([0, 1, 2]), 1.0, True, 0, 0.0)
    k = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"3 tokens but slot_mapping has 2 entries"):
        ops.paged_kv_write(pool, 0, k, k, torch.tensor([0, 1], dtype=torch.int32))


# --- fake implementations --------------------------------------------------------------------

def _fake_calls():
    """(name, thunk) pairs building inputs inside the active mode and calling each op."""
    i32 = torch.int32

    def attention():
        q, k = torch.empty(2, 6, 5, 8, dtype=torch.float16), torch.empty(2, 2, 5, 8, dtype=torch.float16)
        return ops.attention(q, k, k, torch.ones(2, 5, dtype=torch.long), 0.3, True, 4, 0.0), q

    def dense_kv_write():
        cache, k = torch.empty(2, 2, 2, 2, 16, 8), torch.empty(2, 2, 1, 8)
        return ops.dense_kv_write(cache, 1, k, k, torch.ones(2, 7)), None

    def dense_kv_attention():
        q, cache = torch.empty(2, 6, 1, 8, dtype=torch.bfloat16), torch.empty(2, 2, 2, 2, 16, 8)
        return ops.dense_kv_attention(q, cache, 1, torch.ones(2, 7), 0.3, True, 0, 0.0), q

    def paged_kv_write():
        pool, k = torch.empty(2, 2, 8, 4, 2, 8), torch.empty(1, 2, 5, 8)
        return ops.paged_kv_write(pool, 0, k, k, torch.zeros(5, dtype=i32)), None

    def paged_attention():
        q, pool = torch.empty(1, 6, 5, 8), torch.empty(2, 2, 8, 4, 2, 8)
        out = ops.paged_attention(q, pool, 0, torch.zeros(2, 3, dtype=i32), torch.tensor([3, 9], dtype=i32),
                                  torch.tensor([0, 2, 5], dtype=i32), 0.3, True, 0, 0.0)
        return out, q

    return [attention, dense_kv_write, dense_kv_attention, paged_kv_write, paged_attention]


@pytest.mark.parametrize("call", _fake_calls(), ids=lambda f: f.__name__)
def test_fake_implementations(call):
    with FakeTensorMode():
        out, like = call()
    if like is None:
        assert out is None
    else:
        assert isinstance(out, FakeTensor)
        assert out.shape == like.shape and out.dtype == like.dtype


def test_fake_attention_keeps_sizes_symbolic():
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 4)
    q = mode.from_tensor(torch.empty(2, 6, 5, 8), symbolic_context=dynamic)
    k = mode.from_tensor(torch.empty(2, 2, 5, 8), symbolic_context=dynamic)
    with mode:
        out = ops.attention(q, k, k, None, 0.3, True, 0, 0.0)
    assert isinstance(out.shape[2], torch.SymInt)
    assert out.shape == q.shape


@pytest.mark.parametrize("op, arg", [("dense_kv_write", "kv_cache"), ("paged_kv_write", "kv_pool")])
def test_write_ops_declare_their_mutation(op, arg):
    schema = getattr(ops, op).default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == [arg]
