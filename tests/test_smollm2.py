"""The bundled real model (SmolLM2-135M-Instruct, 30 layers): logits and greedy tokens
against HF in fp32 on CPU."""

import pytest
import torch

import fusegen
from fusegen.models import load_model, load_tokenizer
from helpers import assert_close_report

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Water boils at a temperature of",
           "Here is a short poem about the sea:\n"]


@pytest.fixture(scope="module")
def smollm2():
    model = load_model("smollm2")
    tokenizer = load_tokenizer("smollm2")
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return model, fusegen.compile(model), batch


def test_every_layer_fused_cached_and_paged(smollm2):
    _, compiled, _ = smollm2
    c = compiled.report.counters
    assert c["fuse_attention.fused_sdpa"] == 30 and c["fuse_attention.gqa"] == 30
    assert c["insert_kv_cache.layers_cached"] == 30 and c["insert_paged_blocks.paged_attention"] == 30


def test_logits_match_hf(smollm2):
    model, compiled, batch = smollm2
    with torch.no_grad():
        want = model(**batch).logits
    got = compiled(batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    assert_close_report(got[real], want[real], atol=1e-4, rtol=0)


def test_greedy_tokens_match_hf(smollm2):
    model, compiled, batch = smollm2
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=32, do_sample=False)
    got = compiled.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=32,
                            pad_token_id=model.generation_config.pad_token_id)
    assert torch.equal(got, want), (got[:, -32:], want[:, -32:])
