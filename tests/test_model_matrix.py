"""The supported-model matrix (CPU, fp32): every family with a mini random-weight config (the
real size of its flagship in a comment), compiled with the default config, against the HF
model run eagerly with its own default attention:

- logits of a left-padded batch through ``compiled(ids, attention_mask=mask)`` within 1e-4;
- greedy generation through the paged engine token-identical to HF ``generate``;
- the rewrite counts: every layer's attention fused and paged, sliding-window layers found.

Then what is not supported: a Mamba-like model and one that specialises the sequence length
are refused with UnsupportedModelError naming their class (and the CLI says so in one line),
and architectures outside the matrix are checked at compile time: refused with the class,
the module path and the config that works, or compiled only when they match."""

import math
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from torch import nn

import fusegen
from families import left_padded
from helpers import assert_close_report

VOCAB = 128          # 32000 .. 262144 in the real models
LAYERS = 2           # 26 .. 42
NEW_TOKENS = 8


def _llama_like(**overrides) -> dict:
    """The fields Llama-descended configs share; the real sizes are in each family's comment."""
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256) | overrides


class Family(NamedTuple):
    build: Callable[[], nn.Module]
    sliding_layers: int = 0      # layers whose attention has a sliding window
    kv_heads: int = 2
    head_dim: int = 16


# Real sizes: the family's flagship, named in the comment.
MATRIX = {
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 32 heads / 8 KV heads, vocab 128256
    "llama": Family(lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**_llama_like()))),
    # Mistral-7B-v0.1: hidden 4096, intermediate 14336, 32 layers, 32/8 heads, sliding_window 4096
    "mistral": Family(lambda: hf.MistralForCausalLM(hf.MistralConfig(**_llama_like(sliding_window=5))),
                      sliding_layers=LAYERS),
    # Qwen2-7B: hidden 3584, intermediate 18944, 28 layers, 28/4 heads, q/k/v biases, vocab 152064
    "qwen2": Family(lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**_llama_like()))),
    # Qwen3-8B: hidden 4096, intermediate 12288, 36 layers, 32/8 heads, head_dim 128, q/k RMSNorm
    "qwen3": Family(lambda: hf.Qwen3ForCausalLM(hf.Qwen3Config(**_llama_like(head_dim=16)))),
    # Phi-3-mini-4k: hidden 3072, intermediate 8192, 32 layers, 32/32 heads, sliding_window 2047
    "phi3": Family(lambda: hf.Phi3ForCausalLM(hf.Phi3Config(**_llama_like(pad_token_id=0, sliding_window=5))),
                   sliding_layers=LAYERS),
    # Gemma-2-9B: hidden 3584, intermediate 14336, 42 layers, 16/8 heads, head_dim 256,
    # sliding_window 4096 on every other layer, logit softcaps 50 (attention) and 30 (final)
    "gemma2": Family(lambda: hf.Gemma2ForCausalLM(hf.Gemma2Config(**_llama_like(
        head_dim=16, sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0))),
        sliding_layers=1),
    # Gemma-3-1B: hidden 1152, intermediate 6912, 26 layers, 4/1 heads, head_dim 256, q/k RMSNorm,
    # five sliding (window 512, local rope base) layers to one global layer
    "gemma3": Family(lambda: hf.Gemma3ForCausalLM(hf.Gemma3TextConfig(**_llama_like(
        num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=5, layer_types=["sliding_attention", "full_attention"]))),
        sliding_layers=1, kv_heads=1, head_dim=256),
    # GPT-2 (124M): n_embd 768, 12 layers, 12 heads, learned positions n_positions 1024, Conv1D
    "gpt2": Family(lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4,
                                                            n_positions=256)), kv_heads=4),
    # GPT-NeoX-20B (and Pythia): hidden 6144, 44 layers, 64 heads, rotary on 25% of each head,
    # parallel attention + MLP residual
    "gpt_neox": Family(lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True)), kv_heads=4),
    # OPT-6.7B: hidden 4096, ffn 16384, 32 layers, 32 heads, positions counted from the mask
    "opt": Family(lambda: hf.OPTForCausalLM(hf.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64)), kv_heads=4),
    # OLMo-2-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads, RMSNorm on full q and k
    "olmo2": Family(lambda: hf.Olmo2ForCausalLM(hf.Olmo2Config(**_llama_like()))),
    # StableLM-2-1.6B: hidden 2048, intermediate 5632, 24 layers, 32 heads, rotary on 25%, qkv bias
    "stablelm": Family(lambda: hf.StableLmForCausalLM(hf.StableLmConfig(**_llama_like(
        partial_rotary_factor=0.25, use_qkv_bias=True)))),
    # Falcon-7B: hidden 4544, 32 layers, 71 query heads over one KV head (multi-query),
    # parallel attention + MLP, fused query_key_value projection
    "falcon": Family(lambda: hf.FalconForCausalLM(hf.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, multi_query=True,
        new_decoder_architecture=False, parallel_attn=True, max_position_embeddings=256)), kv_heads=1),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Mini models: one intra-op thread is faster than waking a second on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return MATRIX[family].build().eval()


@pytest.fixture(scope="module", params=sorted(MATRIX))
def family(request):
    model = _build(request.param)
    return request.param, model, fusegen.compile(model)


def test_every_layer_is_fused_and_paged(family):
    name, model, compiled = family
    counters = compiled.report.counters
    assert compiled.kind == "paged", name
    assert counters["fuse_attention.fused"] == LAYERS and counters["fuse_attention.unfused"] == 0, name
    assert counters["insert_paged_blocks.paged_attention"] == LAYERS, name
    expected = MATRIX[name]
    assert counters["fuse_attention.sliding_window"] == expected.sliding_layers, name
    geometry = compiled.facts["kv"]
    assert (geometry.kv_heads, geometry.head_dim) == (expected.kv_heads, expected.head_dim), name


def test_left_padded_logits_match_hf(family):
    name, model, compiled = family
    ids, mask = left_padded([9, 4, 7], 9, seed=3)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = compiled(ids, attention_mask=mask)
    real = mask.bool()
    assert_close_report(got[real], want[real], atol=1e-4, rtol=0, msg=name)


def test_greedy_generation_through_the_paged_engine_matches_hf_generate(family):
    name, model, compiled = family
    ids, mask = left_padded([6, 2, 5], 6, seed=7)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0)
    assert got.shape == (3, 6 + NEW_TOKENS), name
    assert got.tolist() == want.tolist(), name


# --- what is not supported --------------------------------------------------------------------

def _mamba():
    torch.manual_seed(0)
    # Mamba-130m: hidden 768, 24 layers, state 16; a recurrent scan, no attention
    return hf.MambaForCausalLM(hf.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4,
                                              num_hidden_layers=1)).eval()


def test_a_mamba_model_is_refused_with_its_class_in_one_cli_line(tmp_path, capsys):
    from fusegen.cli import main

    _mamba().save_pretrained(tmp_path / "mamba")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "mamba")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fusegen-cli: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert errors[0].startswith("fusegen-cli: error: MambaForCausalLM is not supported: the capture fixed the "
                                "sequence length"), err


class LognScaled(nn.Module):
    """Scales logits by log(sequence length) computed in Python (Qwen-1's remote code scales
    attention so): it runs at any length eagerly, but a capture can only fix the length."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = hf.LlamaForCausalLM(hf.LlamaConfig(**_llama_like(num_hidden_layers=1))).eval()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        scale = math.log(input_ids.shape[1] + 1)
        out = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits * scale


def test_a_model_that_specialises_the_sequence_length_is_refused():
    model = LognScaled()
    with torch.no_grad():   # the model itself takes any length
        assert model(torch.ones(1, 3, dtype=torch.long)).shape == (1, 3, VOCAB)
    with pytest.raises(fusegen.UnsupportedModelError,
                       match=r"^LognScaled is not supported: the capture fixed the sequence length of input_ids"):
        fusegen.compile(model)


def _falcon_alibi():
    torch.manual_seed(0)
    # Falcon-RW-1B: hidden 2048, 24 layers, 32 heads, ALiBi biases instead of rotary positions
    return hf.FalconForCausalLM(hf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, alibi=True, multi_query=False,
                                                new_decoder_architecture=False, parallel_attn=False,
                                                bias=True, max_position_embeddings=256)).eval()


def test_an_architecture_a_pass_cannot_rewrite_is_refused_with_the_config_that_works():
    model = _falcon_alibi()
    with pytest.raises(fusegen.UnsupportedModelError) as info:
        fusegen.compile(model)
    err = info.value
    assert isinstance(err, fusegen.GraphRefusedError) and err.pass_name == "insert_kv_cache"
    assert err.model_class == "FalconForCausalLM"
    assert err.where == "module 'transformer.h.0.self_attention' (FalconAttention)"
    assert "attention bias" in err.reason and err.works == "preset=stateless"
    assert str(err).endswith("; compile with preset=stateless instead")
    works = fusegen.compile(model, err.works)          # the config it names does work
    ids, mask = left_padded([9, 4, 7], 9, seed=3)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close_report(works(ids, mask)[real], want[real], atol=1e-4, rtol=0)


class TiedMatmulHead(nn.Module):
    """A plain decoder whose logits are a matmul with the embedding (no LM-head linear)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)

    def forward(self, input_ids):
        B, S = input_ids.shape
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).view(B, S, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(B, S, 32))
        return torch.matmul(h, self.embed.weight.t())


def test_a_paging_refusal_names_the_module_and_the_dense_config():
    with pytest.raises(fusegen.UnsupportedModelError) as info:
        fusegen.compile(TiedMatmulHead().eval())
    err = info.value
    assert err.pass_name == "insert_paged_blocks" and err.model_class == "TiedMatmulHead"
    assert "not computed from an LM-head linear" in err.reason and err.works == "preset=dense_kv"
    assert err.where == "module '<root>' (TiedMatmulHead)"
    dense = fusegen.compile(TiedMatmulHead().eval(), err.works)
    assert dense.kind == "dense"


class OwnPositions(nn.Module):
    """Computes its positions itself, 0..S-1 over whatever it is given: correct alone, wrong
    once the paged graph packs several sequences into one row. No test matrix covers it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.pos = nn.Embedding(VOCAB, 32), nn.Embedding(64, 32)
        self.qkv, self.out, self.head = nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, VOCAB)

    def forward(self, input_ids):
        B, S = input_ids.shape
        h = self.embed(input_ids) + self.pos(torch.arange(S, device=input_ids.device))
        q, k, v = self.qkv(h).view(B, S, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h + self.out(a.transpose(1, 2).reshape(B, S, 32)))


def test_an_architecture_outside_the_matrix_is_checked_at_compile_time():
    model = OwnPositions().eval()
    with pytest.raises(fusegen.UnsupportedModelError,
                       match=r"^OwnPositions is not supported: its logits differ from the model's own forward "
                             r"in the prefill .*compile with preset=capture_only"):
        fusegen.compile(model)
    stateless = fusegen.compile(model, "stateless")     # one sequence per row: what it was written for
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_report(stateless(ids), model(ids), atol=1e-4, rtol=0)


def test_the_readme_table_lists_the_matrix():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Supported models"):]
    table = section[section.index("| family |"):section.index("\n\n", section.index("| family |"))]
    classes = [row.split("|")[2].strip().strip("`") for row in table.splitlines()[2:]]
    assert sorted(classes) == sorted(type(_build(name)).__name__ for name in MATRIX)
