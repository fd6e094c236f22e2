"""GPU checks (``python -m pytest -m gpu -q`` on a machine with an NVIDIA GPU): compiled mini
models of every family run on CUDA in fp32 and bf16 against HF on the same device."""

import pytest
import torch

import fusegen
from families import FAMILIES, left_padded, mini_model
from helpers import assert_close_report

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_and_greedy_tokens_on_cuda(family):
    model = mini_model(family).cuda()
    compiled = fusegen.compile(model)
    ids, mask = left_padded([12, 5, 9], 12, seed=7)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    real = mask.bool()
    assert_close_report(compiled(ids, mask)[real], want[real], atol=1e-3, rtol=0)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, eos_token_id=[])
    assert torch.equal(got, hf)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_logits_on_cuda(family):
    model = mini_model(family).to(device="cuda", dtype=torch.bfloat16)
    compiled = fusegen.compile(model)
    ids, mask = left_padded([10, 6], 10, seed=8)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    got = compiled(ids, mask).float()
    assert_close_report(got[real], want[real], atol=5e-2, rtol=5e-2)


def test_engine_with_kernels_and_cuda_graphs_matches_hf_greedy():
    """Triton attention + generated fused kernels + decode CUDA graphs, through the serving
    engine (continuous batching, chunked prefill), against HF greedy in fp32."""
    model = mini_model("llama").cuda()
    compiled = fusegen.compile(model)
    engine = compiled.engine(num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4)
    assert engine.runner.graphs is not None and engine.runner.graphs.buckets[-1] == 4
    prompts = [[5, 9, 33, 2, 17, 88, 41], [7, 3], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111],
               [64] * 5, [12, 13, 14]]
    got = engine.generate_batch(prompts, 12, eos_token_ids=[])
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == want[0, len(prompt):].tolist(), prompt


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_artifact_round_trip_on_cuda(family, tmp_path):
    """Export a CUDA bf16 compile, load it in place of the model: same logits, same greedy
    tokens through the engine (Triton kernels and CUDA graphs), kernels from the artifact."""
    model = mini_model(family).to("cuda", torch.bfloat16)
    compiled = fusegen.compile(model)
    loaded = fusegen.load(compiled.save(tmp_path / "artifact"))
    assert loaded.device.type == "cuda" and loaded.facts["dtype"] == torch.bfloat16
    ids, mask = left_padded([9, 4, 6], 9, seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    torch.testing.assert_close(loaded(ids, mask), compiled(ids, mask), rtol=0, atol=0)
    prompts = [[5, 9, 33, 2, 17, 88, 41], [7, 3], [64] * 5]
    assert loaded.generate_batch(prompts, 16) == compiled.generate_batch(prompts, 16)
    assert all(m.kernel is not None for n, m in loaded.graph_module.named_children() if hasattr(m, "kernel"))


def test_artifact_moves_between_cpu_and_cuda(tmp_path):
    """A CUDA artifact loaded onto the CPU, and a CPU one onto CUDA, compute what the same
    model compiled on the target device computes (device arguments rewritten)."""
    model = mini_model("llama")
    on_cpu = fusegen.compile(model)
    on_cuda = fusegen.compile(mini_model("llama").cuda())
    ids, mask = left_padded([9, 4, 6], 9, seed=5)
    moved_down = fusegen.load(on_cuda.save(tmp_path / "cuda"), device="cpu")
    moved_up = fusegen.load(on_cpu.save(tmp_path / "cpu"), device="cuda")
    assert moved_down.device.type == "cpu" and moved_up.device.type == "cuda"
    torch.testing.assert_close(moved_down(ids, mask), on_cpu(ids, mask), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moved_up(ids.cuda(), mask.cuda()), on_cuda(ids.cuda(), mask.cuda()),
                               rtol=1e-4, atol=1e-4)
    assert moved_up.generate(ids.cuda(), 8, attention_mask=mask.cuda()).tolist() == \
        on_cuda.generate(ids.cuda(), 8, attention_mask=mask.cuda()).tolist()
