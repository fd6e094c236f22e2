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
    assert engine.runner.graphs is not None and engine.setup["buckets"] == [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4)]
    prompts = [[5, 9, 33, 2, 17, 88, 41], [7, 3], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111],
               [64] * 5, [12, 13, 14]]
    got = engine.generate_batch(prompts, 12, eos_token_ids=[])
    assert all(r.graph for r in engine.step_log)                   # every step shape replayed
    assert {r.kind for r in engine.step_log} == {"prefill", "mixed", "decode"}
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == want[0, len(prompt):].tolist(), prompt


def test_mixed_step_graphs_give_the_tokens_of_eager_steps():
    """Prefill and mixed steps replayed from CUDA graphs (padded entries and tokens) against
    the same engine run eagerly (fp32), greedy and seeded sampling, with and without overlap."""
    model = mini_model("llama").cuda()
    compiled = fusegen.compile(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in (40, 3, 70, 9, 1, 25, 33, 100)]
    sampling = [dict(), dict(temperature=0.8, top_p=0.9, seed=4), dict(), dict(temperature=1.0, seed=7)]

    def run(cuda_graphs, overlap):
        engine = compiled.engine(num_blocks=96, max_num_batched_tokens=64, max_num_seqs=4,
                                 cuda_graphs=cuda_graphs, overlap=overlap)
        ids = [engine.add_request(p, 10, eos_token_ids=[], **sampling[i % 4]) for i, p in enumerate(prompts)]
        out = {rid: [] for rid in ids}
        while engine.has_unfinished():
            for rid, token, *_ in engine.step():
                out[rid].append(token)
        return [out[r] for r in ids], engine.step_log

    eager, log = run(False, False)
    assert not any(r.graph for r in log)
    graphed, log = run(True, True)
    assert all(r.graph for r in log) and {"prefill", "mixed"} <= {r.kind for r in log}
    assert any(r.num_tokens > 4 for r in log)                      # token buckets, not only decode
    assert graphed == eager
    assert run(True, False)[0] == eager


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


# --- head dims that are not a power of two (80, 96) and 256: kernels, then the engine ------

def _paged_inputs(seq_lens, q_lens, Hq, Hkv, D, block_size, pad_tokens, dtype=torch.bfloat16):
    """Random CUDA pool (stale values everywhere), shuffled block tables, packed queries
    [1, Hq, T, D] made by a transpose, T = sum(q_lens) + pad_tokens."""
    g = torch.Generator().manual_seed(D)
    need = [-(-n // block_size) for n in seq_lens]
    pool = torch.randn(2, 2, sum(need) + 3, block_size, Hkv, D, generator=g)
    order = torch.randperm(pool.shape[2], generator=g).tolist()
    tables = []
    for n in need:
        tables.append(order[:n] + [0] * (max(need) - n))
        order = order[n:]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(1, starts[-1] + pad_tokens, Hq, D, generator=g).transpose(1, 2)
    i32 = dict(dtype=torch.int32, device="cuda")
    return (q.to("cuda", dtype), pool.to("cuda", dtype), 1, torch.tensor(tables, **i32),
            torch.tensor(seq_lens, **i32), torch.tensor(starts, **i32))


def _reference_float64(op, *args):
    return op._init_fn(*[a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                         else a.cpu() if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("D", [80, 96, 256])
@pytest.mark.parametrize("kind, causal, window, softcap, num_splits", [
    ("prefill", True, 0, 0.0, None),
    ("chunked-padded", True, 64, 30.0, None),  # N padded to 16 by empty sequences, T padded
    ("decode", True, 0, 0.0, None),
    ("decode", False, 64, 30.0, 1),
])
def test_bf16_paged_attention_kernels_at_head_dim(kind, D, causal, window, softcap, num_splits):
    """The registered op runs the kernels (bit-identical to calling them) at these head dims,
    close to a float64 reference."""
    from fusegen import ops
    from fusegen.codegen import attention as attn

    attn.register()
    seq_lens = [333, 17, 1000, 1]
    q_lens, pad = {"prefill": ([333, 17, 100, 1], 0), "chunked-padded": ([96, 5, 333, 1], 7),
                   "decode": ([1, 1, 1, 1], 0)}[kind]
    if kind == "chunked-padded":
        seq_lens, q_lens = seq_lens + [0] * 12, q_lens + [0] * 12
    args = _paged_inputs(seq_lens, q_lens, 8, 2, D, 16, pad) + (D ** -0.5, causal, window, softcap)
    got = attn.paged_attention(*args, num_splits=num_splits)
    if num_splits is None:
        assert torch.equal(torch.ops.fusegen.paged_attention(*args), got)
    assert_close_report(got, _reference_float64(ops.paged_attention, *args), 2e-2, 2e-2,
                        msg=f"{kind} D{D}")
    if pad:
        assert torch.count_nonzero(got[:, :, -pad:]) == 0


@pytest.mark.parametrize("D", [80, 96, 256])
@pytest.mark.parametrize("causal, window, softcap", [(True, 0, 0.0), (True, 100, 30.0), (False, 0, 0.0)])
def test_bf16_flash_attention_kernel_at_head_dim(D, causal, window, softcap):
    from fusegen import ops
    from fusegen.codegen import attention as attn

    attn.register()
    g = torch.Generator().manual_seed(D)
    q = torch.randn(2, 333, 8, D, generator=g).transpose(1, 2).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2, 2, 400, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    got = attn.flash_attention(q, k, v, D ** -0.5, causal, window, softcap)
    assert torch.equal(torch.ops.fusegen.attention(q, k, v, None, D ** -0.5, causal, window, softcap), got)
    want = _reference_float64(ops.attention, q, k, v, None, D ** -0.5, causal, window, softcap)
    assert_close_report(got, want, 2e-2, 2e-2, msg=f"D{D}")


def _mini_llama(head_dim: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128,            # 32000
                         hidden_size=64,            # 2560 (phi-2), 3072 (Phi-3-mini), 3072 (Gemma-7B)
                         head_dim=head_dim,         # 80 (phi-2), 96 (Phi-3-mini), 256 (Gemma-7B)
                         intermediate_size=128,     # 10240 / 8192 / 24576
                         num_hidden_layers=2,       # 32 / 32 / 28
                         num_attention_heads=4,     # 32 / 32 / 16
                         num_key_value_heads=2,     # 32 / 32 / 16 (GQA here)
                         max_position_embeddings=256,  # 2048 / 4096 / 8192
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("head_dim", [80, 96, 256])
def test_engine_at_head_dim_with_cuda_graphs_matches_hf_greedy(head_dim):
    """Triton attention at a padded head dim, through the serving engine (chunked prefill,
    decode CUDA graphs, which the reference ops would break: they read lengths on the host),
    against HF greedy in fp32."""
    model = _mini_llama(head_dim).cuda()
    compiled = fusegen.compile(model)
    engine = compiled.engine(num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4)
    assert engine.runner.graphs is not None
    prompts = [[5, 9, 33, 2, 17, 88, 41], [7, 3], [100 + i for i in range(20)], [64] * 5, [12, 13, 14]]
    got = engine.generate_batch(prompts, 12, eos_token_ids=[])
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == want[0, len(prompt):].tolist(), (head_dim, prompt)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quantized_weights_through_the_engine_on_cuda(fmt):
    """Quantized linears (dequantized on the device) through the engine with CUDA graphs,
    against HF with the same dequantized weights: fp32 greedy-identical, bf16 logits close."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusegen.quant import dequantized_linears

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval().cuda()
    compiled = fusegen.compile(model, f"weights={fmt}")
    assert compiled.report.counters["quantize_weights.linears_quantized"] == 8
    engine = compiled.engine(num_blocks=32, max_num_batched_tokens=16, max_num_seqs=4)
    assert engine.runner.graphs is not None
    prompts = [[5, 9, 33, 2, 17, 88, 41], [7, 3], [10 + i for i in range(20)]]
    got = engine.generate_batch(prompts, 10, eos_token_ids=[])
    with dequantized_linears(model, fmt, False), torch.no_grad():
        for prompt, tokens in zip(prompts, got):
            ids = torch.tensor([prompt], device="cuda")
            want = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert tokens == want[0, len(prompt):].tolist(), (fmt, prompt)

    half = model.to(torch.bfloat16)
    compiled = fusegen.compile(half, f"weights={fmt}")
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4)).cuda()
    with dequantized_linears(half, fmt, False), torch.no_grad():
        want = half(ids).logits.float()
    assert_close_report(compiled(ids).float(), want, atol=5e-2, rtol=5e-2)
