"""Greedy generation through the stateful graphs, token-identical to HF generate (fp32, CPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import fusegen
from families import FAMILIES, left_padded, mini_model

NEW = 32


def hf_greedy(model, ids, mask, new=NEW):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_generate_matches_hf(family):
    model = mini_model(family)
    compiled = fusegen.compile(model)
    assert compiled.kind == "paged"
    counters = compiled.report.counters
    assert counters["insert_paged_blocks.paged_attention"] == 2
    assert counters["insert_kv_cache.layers_cached"] == 2
    ids, mask = left_padded([12, 3, 7], 12, seed=1)
    want = hf_greedy(model, ids, mask)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert torch.equal(got, want), f"{family}\nfusegen {got[:, 12:]}\nHF      {want[:, 12:]}"


def test_mistral_window_shorter_than_sequence_eager_form():
    model = mini_model("mistral", attn="eager")
    compiled = fusegen.compile(model)
    assert compiled.report.counters["fuse_attention.sliding_window"] == 2
    attn = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.fusegen.paged_attention.default]
    assert {n.args[8] for n in attn} == {5}   # window argument
    ids, mask = left_padded([9, 6], 9, seed=2)
    want = hf_greedy(model, ids, mask)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert torch.equal(got, want)


def test_dense_cache_generate_matches_hf():
    model = mini_model("llama", seed=3)
    compiled = fusegen.compile(model, "dense_kv")
    assert compiled.kind == "dense"
    ids, mask = left_padded([10, 4], 10, seed=3)
    want = hf_greedy(model, ids, mask)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert torch.equal(got, want)


def test_eos_stops_a_row_and_pads_it():
    model = mini_model("qwen2", seed=4)
    compiled = fusegen.compile(model)
    ids, mask = left_padded([6, 6], 6, seed=4)
    free = compiled.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 6 + 2])                 # row 0's third new token
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    row0 = got[0, 6:].tolist()
    stop = row0.index(eos)
    assert stop <= 2 and all(t == 0 for t in row0[stop + 1:])
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, hf)


def _plain_decoder_module():
    path = Path(__file__).resolve().parents[1] / "examples" / "plain_decoder.py"
    spec = importlib.util.spec_from_file_location("plain_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_decoder_generates_like_its_own_greedy_loop():
    torch.manual_seed(5)
    model = _plain_decoder_module().PlainDecoder().eval()
    compiled = fusegen.compile(model)
    assert compiled.report.counters["fuse_attention.fused_eager"] == 2
    ids = torch.randint(0, 256, (1, 7))
    seq = ids
    with torch.no_grad():
        for _ in range(16):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(compiled.generate(ids, max_new_tokens=16, eos_token_id=[]), seq)


def test_generate_rejects_impossible_requests():
    compiled = fusegen.compile(mini_model("llama"))
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        compiled.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        compiled.generate(ids, max_new_tokens=300)
    with pytest.raises(ValueError, match="at least one real token"):
        compiled.generate(ids, attention_mask=torch.zeros_like(ids), max_new_tokens=2)
    stateless = fusegen.compile(mini_model("llama"), "stateless")
    with pytest.raises(ValueError, match="stateful graph"):
        stateless.generate(ids, max_new_tokens=2)
