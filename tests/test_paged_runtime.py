"""The paged step graph driven by hand, and the block pool (CPU, fp32): packed prefill,
chunked prefill, decode, mixed steps, the device-side step inputs against the host packing,
exact block ids."""

import pytest
import torch

import fusegen
from fusegen.runtime.batch import BatchState
from fusegen.runtime.block_pool import BlockPool
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs
from helpers import assert_close_report

LAYERS = 2
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
VOCAB = 256


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB,                 # 32000
                         hidden_size=HEADS * HEAD_DIM,     # 4096
                         intermediate_size=128,            # 11008
                         num_hidden_layers=LAYERS,         # 32
                         num_attention_heads=HEADS,        # 32
                         num_key_value_heads=KV_HEADS,     # 8 (Llama-3-8B)
                         max_position_embeddings=128)      # 8192
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def paged(llama):
    return fusegen.compile(llama, "default")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- the paged graph, step by step -----------------------------------------------------------

def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(model, tokens: list[int]) -> torch.Tensor:
    return _logits(model, torch.tensor([tokens]))[0]


class Packed:
    """Drives the paged graph by hand: a KV-cache manager hands out blocks, chunks are
    packed on the host (what the engine does on the device)."""

    def __init__(self, paged, num_blocks):
        self.kv = KVCacheManager(num_blocks, paged.facts["kv"].block_size, enable_prefix_caching=False)
        self.runner = PagedRunner(paged.graph_module, paged.facts["kv"], num_blocks, device="cpu")
        self.gm = paged.graph_module
        self.cached: dict[int, int] = {}

    def inputs(self, seqs: dict[int, list[int]], counts: list[int], last_only=False) -> dict:
        chunks = []
        for (rid, tokens), n in zip(seqs.items(), counts):
            start = self.cached.get(rid, 0)
            if not self.kv.holds(rid):
                self.kv.admit(rid, tokens, n)
            assert self.kv.grow(rid, start + n) is not None
            chunks.append(Chunk(tokens[start:start + n], list(range(start, start + n)), start,
                                self.kv.blocks(rid)))
            self.cached[rid] = start + n
        return packed_inputs(self.runner, chunks, last_only)

    def step(self, seqs, counts, last_only=False) -> torch.Tensor:
        with torch.no_grad():
            return self.gm(**self.inputs(seqs, counts, last_only))[0]


def test_paged_prefill_two_prompts_then_decode(llama, paged):
    packed = Packed(paged, num_blocks=8)
    seqs = {0: _prompt(14, seed=1), 1: _prompt(19, seed=2)}

    logits = packed.step(seqs, [14, 19])  # one packed prefill, T = 33
    assert logits.shape == (33, VOCAB)
    assert_close_report(logits[:14], _hf_logits(llama, seqs[0]), atol=1e-4, rtol=1e-4)
    assert_close_report(logits[14:], _hf_logits(llama, seqs[1]), atol=1e-4, rtol=1e-4)
    assert [packed.kv.blocks(r) for r in seqs] == [[0], [1, 2]]
    last = logits[[13, 32]]

    for step in range(4):  # sequence 0 crosses the block boundary at 16 tokens
        for tokens, row in zip(seqs.values(), last):
            tokens.append(int(row.argmax()))
        last = packed.step(seqs, [1, 1])
        assert last.shape == (2, VOCAB)
        for tokens, row in zip(seqs.values(), last):
            assert_close_report(row, _hf_logits(llama, tokens)[-1], atol=1e-4, rtol=1e-4,
                                msg=f"decode step {step}, {len(tokens)} tokens")
    assert packed.cached == {0: 18, 1: 23}
    assert [packed.kv.blocks(r) for r in seqs] == [[0, 3], [1, 2]]
    for rid in seqs:
        packed.kv.free(rid)
    assert packed.kv.pool.num_free == 8


def test_paged_graph_computes_logits_of_the_rows_logits_indices_picks(llama, paged):
    packed = Packed(paged, num_blocks=4)
    seqs = {0: _prompt(7, seed=6), 1: _prompt(12, seed=7)}
    inputs = packed.inputs(seqs, [7, 12], last_only=True)
    assert inputs["logits_indices"].tolist() == [6, 18]  # the last packed token of each sequence
    want = torch.cat([_hf_logits(llama, s) for s in seqs.values()])  # [19, V], packed order
    inputs["logits_indices"] = torch.tensor([18, 0, 6, 9, 6], dtype=torch.int32)
    with torch.no_grad():
        got = paged.graph_module(**inputs)
    assert got.shape == (1, 5, VOCAB)
    assert_close_report(got[0], want[[18, 0, 6, 9, 6]], atol=1e-4, rtol=1e-4)


def test_paged_step_last_only(llama, paged):
    packed = Packed(paged, num_blocks=4)
    seqs = {0: _prompt(7, seed=6), 1: _prompt(12, seed=7)}
    last = packed.step(seqs, [7, 12], last_only=True)
    assert last.shape == (2, VOCAB)
    for tokens, row in zip(seqs.values(), last):
        assert_close_report(row, _hf_logits(llama, tokens)[-1], atol=1e-4, rtol=1e-4)


def test_paged_chunked_prefill(llama, paged):
    packed = Packed(paged, num_blocks=4)
    prompt = _prompt(21, seed=3)
    want = _hf_logits(llama, prompt)
    first = packed.step({0: prompt}, [5])
    assert_close_report(first, _hf_logits(llama, prompt[:5]), atol=1e-4, rtol=1e-4)
    rest = packed.step({0: prompt}, [len(prompt) - 5])
    assert rest.shape == (16, VOCAB)
    assert_close_report(rest, want[5:], atol=1e-4, rtol=1e-4)
    assert packed.cached == {0: 21} and packed.kv.blocks(0) == [0, 1]


def test_paged_step_mixes_a_prefill_chunk_and_a_decode(llama, paged):
    packed = Packed(paged, num_blocks=4)
    seqs = {0: _prompt(6, seed=4), 1: _prompt(9, seed=5)}
    packed.step(seqs, [6, 4])  # a whole, b's first chunk
    seqs[0].append(7)
    logits = packed.step(seqs, [1, 5])  # a decodes while b finishes its prefill
    assert_close_report(logits[0], _hf_logits(llama, seqs[0])[-1], atol=1e-4, rtol=1e-4)
    assert_close_report(logits[1:], _hf_logits(llama, seqs[1])[4:], atol=1e-4, rtol=1e-4)


def test_device_side_step_inputs_match_the_host_packing(llama, paged):
    """BatchState.step_inputs (the engine's, on the device, padded) computes what the host
    packing computes for the same chunks; padding tokens write nothing."""
    packed = Packed(paged, num_blocks=8)
    seqs = {0: _prompt(6, seed=4), 1: _prompt(9, seed=5), 2: _prompt(3, seed=8)}
    packed.step({0: seqs[0], 1: seqs[1]}, [6, 4])
    seqs[0].append(7)
    want = packed.inputs(seqs, [1, 5, 3], last_only=True)
    batch = BatchState(max_rows=4, max_model_len=32, block_size=paged.facts["kv"].block_size, device="cpu")
    rows = {0: 2, 1: 0, 2: 3}
    batch.write_tokens([(rows[r], 0, t) for r, t in seqs.items()])
    batch.write_blocks([(rows[r], 0, packed.kv.blocks(r)) for r in seqs])
    entries = torch.tensor([[2, 0, 3, batch.padding_row], [6, 4, 0, 0], [1, 5, 3, 0], [1, 1, 1, 0]],
                           dtype=torch.int32)
    got = batch.step_inputs(entries, 12, packed.runner.kv_pool)        # 9 real tokens, 3 padding
    assert list(got) == list(want)
    for name in ("input_ids", "position_ids", "slot_mapping"):
        assert got[name][..., :9].tolist() == want[name].tolist(), name
    assert got["slot_mapping"][9:].tolist() == [-1, -1, -1]
    assert got["seq_lens"].tolist() == want["seq_lens"].tolist() + [0]
    assert got["query_start_loc"].tolist() == want["query_start_loc"].tolist() + [9]
    assert got["logits_indices"][:3].tolist() == want["logits_indices"].tolist()
    width = want["block_tables"].shape[1]
    assert got["block_tables"][:3, :width].tolist() == want["block_tables"].tolist()
    with torch.no_grad():
        logits = paged.graph_module(**got)[0]
    for i, tokens in enumerate(seqs.values()):
        assert_close_report(logits[i], _hf_logits(llama, tokens)[-1], atol=1e-4, rtol=1e-4)


# --- the block pool --------------------------------------------------------------------------

def test_block_pool_hands_out_blocks_in_order_and_reuses_freed_ones_last():
    pool = BlockPool(num_blocks=8, block_size=16)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free == 3
    pool.free([1, 0])
    assert pool.num_free == 5
    assert pool.allocate(4) == [5, 6, 7, 1]
    assert pool.allocate(0) == []


def test_block_pool_exhaustion_returns_none_and_takes_nothing():
    pool = BlockPool(num_blocks=4, block_size=16)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    assert pool.allocate(1) == [3]
    assert pool.allocate(1) is None


def test_block_pool_blocks_for():
    pool = BlockPool(num_blocks=4, block_size=16)
    assert [pool.blocks_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_block_pool_shared_blocks_return_when_the_last_holder_frees():
    pool = BlockPool(num_blocks=4, block_size=16)
    blocks = pool.allocate(2)
    assert blocks == [0, 1]
    pool.share([0])
    pool.share([0])
    assert [pool.ref_count(b) for b in range(4)] == [3, 1, 0, 0]
    pool.free([0, 1])
    assert [pool.ref_count(b) for b in range(4)] == [2, 0, 0, 0]
    assert pool.num_free == 3
    pool.free([0])
    pool.free([0])
    assert pool.ref_count(0) == 0 and pool.num_free == 4
    assert pool.allocate(4) == [2, 3, 1, 0]


def test_block_pool_misuse_raises_value_error_with_the_numbers():
    pool = BlockPool(num_blocks=4, block_size=16)
    pool.allocate(2)
    pool.free([1])
    with pytest.raises(ValueError, match=r"^cannot free block 1: not held \(pool of 4\)$"):
        pool.free([1])
    with pytest.raises(ValueError, match=r"^cannot free block 3: not held \(pool of 4\)$"):
        pool.free([3])
    with pytest.raises(ValueError, match=r"^cannot free block 4: not held \(pool of 4\)$"):
        pool.free([4])
    with pytest.raises(ValueError, match=r"^cannot share block 2: not held \(pool of 4\)$"):
        pool.share([2])
    with pytest.raises(ValueError, match=r"^cannot allocate -1 blocks$"):
        pool.allocate(-1)
    with pytest.raises(ValueError, match=r"num_blocks >= 1 and block_size >= 1, got 0 and 16"):
        BlockPool(0, 16)


def test_block_pool_rejects_block_ids_outside_the_pool_when_sharing():
    pool = BlockPool(num_blocks=4, block_size=16)
    pool.allocate(4)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=f"block {bad}"):
            pool.share([bad])
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 1, 1]
