"""HF semantics kept exactly (CPU, fp32): positions as the model's own forward numbers them
on left-padded batches (Llama-like families 0..S-1 in every row, OPT over the real tokens),
generate's defaults from the generation config, and Gemma2's final-logit softcapping on the
default paged graph."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, OPTConfig, OPTForCausalLM

import fusegen
from families import left_padded, mini_model
from helpers import assert_close_report


def mini_opt():
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=128,
                                    hidden_size=64,          # 768 (OPT-125m)
                                    num_hidden_layers=2,     # 12
                                    ffn_dim=128,             # 3072
                                    num_attention_heads=4,   # 12
                                    max_position_embeddings=256,  # 2048
                                    word_embed_proj_dim=64)).eval()


@pytest.mark.parametrize("family, convention", [("opt", "mask"), ("llama", "arange"), ("gpt2", "arange")])
def test_left_padded_logits_match_the_models_own_forward(family, convention):
    model = mini_opt() if family == "opt" else mini_model(family)
    compiled = fusegen.compile(model)
    assert compiled.facts["positions"] == convention
    ids, mask = left_padded([9, 4, 7], 9, seed=3)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close_report(compiled(ids, mask)[real], want[real], atol=1e-4, rtol=1e-4)


def test_opt_generate_and_artifact_keep_the_convention(tmp_path):
    model = mini_opt()
    compiled = fusegen.compile(model)
    ids, mask = left_padded([7, 3], 7, seed=5)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=1)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), want)
    loaded = fusegen.load(compiled.save(tmp_path / "opt"))
    assert loaded.facts["positions"] == "mask"
    torch.testing.assert_close(loaded(ids, mask), compiled(ids, mask), rtol=0, atol=0)


def test_generate_takes_its_defaults_from_the_generation_config_as_hf_does(tmp_path):
    model = mini_model("llama")
    ids, mask = left_padded([6, 4], 6, seed=9)
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    stop = int(free[0, 6 + 2])                   # row 0 stops at its third new token
    model.generation_config.eos_token_id = [stop, 127]
    model.generation_config.pad_token_id = 5
    model.generation_config.max_new_tokens = 8
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask)          # everything from the config
    compiled = fusegen.compile(model)
    got = compiled.generate(ids, attention_mask=mask)
    assert torch.equal(got, want) and (got[0, 6 + 3:] == 5).all()
    loaded = fusegen.load(compiled.save(tmp_path / "art"))
    assert torch.equal(loaded.generate(ids, attention_mask=mask), want)
    # Explicit arguments win over the config, as in HF.
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[]),
                       free[:, :6 + 3])
    model.generation_config.max_new_tokens = None                 # then max_length (20) counts the prompt
    assert fusegen.compile(model).generate(ids, attention_mask=mask).shape[1] == \
        model.generate(ids, attention_mask=mask).shape[1]


def test_gemma2_softcapped_logits_run_on_the_default_paged_graph():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=128,
                                           hidden_size=64,            # 2304 (gemma-2-2b)
                                           intermediate_size=128,     # 9216
                                           num_hidden_layers=2,       # 26
                                           num_attention_heads=4,     # 8
                                           num_key_value_heads=2,     # 4
                                           head_dim=16,               # 256
                                           max_position_embeddings=256,  # 8192
                                           sliding_window=5,          # 4096
                                           final_logit_softcapping=30.0,
                                           attn_logit_softcapping=50.0)).eval()
    compiled = fusegen.compile(model)
    assert compiled.kind == "paged" and compiled.report.counters["insert_paged_blocks.paged_attention"] == 2
    ids, mask = left_padded([9, 4, 7], 9, seed=3)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    real = mask.bool()
    assert_close_report(compiled(ids, mask)[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[],
                                         pad_token_id=0), hf)


class _DecodeOffByOne(torch.nn.Module):
    """The paged graph, but decode steps (one token per sequence) get positions one too far:
    the prefill is right, only cached steps go wrong."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, **inputs):
        if inputs["input_ids"].shape[1] == inputs["seq_lens"].shape[0]:
            inputs["position_ids"] = inputs["position_ids"] + 1
        return self.gm(**inputs)


def test_the_compile_time_check_runs_decode_steps_not_only_the_prefill():
    from fusegen.fidelity import check_compiled

    model = mini_model("llama")
    compiled = fusegen.compile(model)        # passes the check as compiled
    check_compiled(compiled, model)
    compiled.graph_module = _DecodeOffByOne(compiled.graph_module)
    ids, mask = left_padded([9, 4], 9)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert_close_report(compiled(ids, mask)[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)  # prefill fine
    with pytest.raises(fusegen.UnsupportedModelError,
                       match=r"^LlamaForCausalLM is not supported: its logits differ from the model's own forward "
                             r"in the 2 decode steps after a 7-token prompt \(row 0\)"):
        check_compiled(compiled, model)
