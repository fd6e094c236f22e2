"""The quantized-weight skinny GEMM (codegen/quant_gemm.py) against the dequantized reference.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors, in fp32 (so the only
difference from the reference is the order of the sums): M = 1, 3, 17; N not a multiple of
BLOCK_N; K not a multiple of BLOCK_K (int8, fp8); int4 over one and several groups per K
block; split-K with the fused reduction; the fma and the tl.dot variant; with bias and with
an AWQ activation scale. The ``gpu`` tests run bf16 on 1B and 7B linear shapes against a
float64 reference with every configuration the table would time, the table itself, and the
routed graph of a compiled mini model.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusegen.codegen import quant_gemm, skinny_gemm  # noqa: E402
from fusegen.codegen.quant_gemm import quant_linear  # noqa: E402
from fusegen.codegen.skinny_gemm import GemmConfig  # noqa: E402
from fusegen.quant import effective_weight, quantize  # noqa: E402
from helpers import assert_close_report  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def operands(M, N, K, fmt, bias=False, act=False, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    r = (torch.rand(K, generator=g) + 0.5) if act else None
    data, scale = quantize(w / r if act else w, fmt)
    b = torch.randn(N, generator=g) if bias else None
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (x.to(device, dtype), on(data), on(scale), None if b is None else b.to(device, dtype), on(r))


def reference(x, data, scale, b, fmt, r):
    """float64 product with the dequantized weight (what fusegen::quantized_linear means)."""
    w = effective_weight(data.cpu(), scale.cpu(), fmt, torch.float32, None if r is None else r.cpu()).double()
    y = torch.nn.functional.linear(x.cpu().double(), w, None if b is None else b.cpu().double())
    return y


CASES = [   # M, N, K, fmt, bias, act, config
    (1, 37, 100, "int8", True, False, GemmConfig(8, 32)),                  # ragged N and K
    (3, 21, 200, "fp8", False, False, GemmConfig(8, 64, split_k=2)),       # split-K, ragged K
    (17, 40, 96, "int8", True, False, GemmConfig(16, 32, split_k=2, dot=True)),
    (1, 19, 256, "int4", True, False, GemmConfig(8, 64)),                  # two K blocks per group
    (3, 13, 384, "int4", False, True, GemmConfig(8, 256, split_k=2)),      # two groups per K block, AWQ scale
    (17, 24, 256, "int4", True, True, GemmConfig(16, 64, split_k=2, dot=True)),
    (3, 9, 128, "fp8", True, True, GemmConfig(16, 32, split_k=3)),          # a split count that is not a power of two
    (1, 11, 1280, "int4", False, True, GemmConfig(8, 1024, split_k=2)),     # eight groups per block, ragged split
    (1, 29, 300, "fp8", True, False, GemmConfig(8, 128, split_k=2)),       # one row, ragged K, split-K
    (1, 21, 512, "int4", True, False, GemmConfig(16, 256)),                # one row, two groups per block
]


@pytest.mark.parametrize("M,N,K,fmt,bias,act,config", CASES)
def test_template_matches_the_dequantized_reference(M, N, K, fmt, bias, act, config):
    x, data, scale, b, r = operands(M, N, K, fmt, bias, act)
    got = quant_linear(x, data, scale, b, fmt, config, r)
    assert got.shape == (M, N) and got.dtype == x.dtype
    assert_close_report(got.cpu().double(), reference(x, data, scale, b, fmt, r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [False, True])
def test_int4_reads_one_bf16_row_as_column_pairs(act):
    """One bf16 row through the int4 fma path loads x as 32-bit column pairs; the result is the
    reference up to bf16's rounding of y. An x whose row is not 4-byte aligned (a view one
    element in) takes the per-column loads: the same values, but that with an activation scale
    the per-column path rounds x * a to bf16 first."""
    x, data, scale, b, r = operands(1, 21, 512, "int4", True, act, dtype=torch.bfloat16)
    config = GemmConfig(16, 256)
    assert quant_gemm._bf16_pairs(x, "int4", 1, config)
    want = reference(x, data, scale, b, "int4", r)
    got = quant_linear(x, data, scale, b, "int4", config, r)
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-3, rtol=8e-3)   # bf16: 8 mantissa bits
    shifted = torch.cat([x.new_zeros(1, 1), x], dim=1)[:, 1:]
    assert not quant_gemm._bf16_pairs(shifted, "int4", 1, config)
    unpaired = quant_linear(shifted, data, scale, b, "int4", config, r)
    if act:
        assert ((unpaired.cpu().double() - want).norm() / want.norm()).item() < 1e-2
    else:
        torch.testing.assert_close(unpaired, got, atol=0, rtol=0)


def test_int4_one_row_reads_packed_words_or_falls_back_to_bytes():
    """One row through the int4 fma path reads q as int32 words of eight nibbles; q whose rows
    are not 4-byte aligned (a view two bytes in) takes the byte-at-a-time unpacking. Both
    match the reference, at one K block per group and at several groups per block."""
    for K, config in ((384, GemmConfig(8, 128, split_k=3)), (1024, GemmConfig(16, 512))):
        x, data, scale, b, _ = operands(1, 13, K, "int4", bias=True)
        assert quant_gemm._int4_words(data, "int4", 1, config)
        want = reference(x, data, scale, b, "int4", None)
        got = quant_linear(x, data, scale, b, "int4", config)
        assert_close_report(got.cpu().double(), want, atol=1e-5, rtol=1e-5)
        offset = torch.cat([data.new_zeros(13, 2), data], dim=1)[:, 2:]
        assert not quant_gemm._int4_words(offset, "int4", 1, config)
        assert_close_report(quant_linear(x, offset, scale, b, "int4", config).cpu().double(), want,
                            atol=1e-5, rtol=1e-5)


def test_split_k_is_deterministic_and_leaves_tickets_at_zero():
    x, data, scale, b, _ = operands(3, 20, 512, "int4", bias=True)
    config = GemmConfig(8, 128, split_k=4)
    first = quant_linear(x, data, scale, b, "int4", config)
    assert torch.equal(first, quant_linear(x, data, scale, b, "int4", config))
    single = quant_linear(x, data, scale, b, "int4", GemmConfig(8, 128))
    torch.testing.assert_close(first, single, rtol=1e-6, atol=1e-6)
    _, counts = skinny_gemm.WORKSPACE.get(torch.device(DEVICE), 0, 0)
    assert int(counts.abs().sum()) == 0


def test_operands_that_do_not_fit_are_refused():
    x, data, scale, _, _ = operands(2, 8, 128, "int4")
    with pytest.raises(ValueError, match="K = 100 is not a multiple of 128"):
        quant_linear(torch.randn(2, 100, device=DEVICE), data, scale, None, "int4", GemmConfig(8, 64))
    with pytest.raises(ValueError, match=r"int4 weight for x \[..., 128\] must be torch.uint8 \(8, 64\)"):
        quant_linear(x, data[:, :32], scale, None, "int4", GemmConfig(8, 64))
    with pytest.raises(ValueError, match="BLOCK_K dividing 128"):
        quant_linear(x, data, scale, None, "int4", GemmConfig(8, 96))
    with pytest.raises(ValueError, match="at most 64 rows"):
        quant_linear(torch.randn(65, 128, device=DEVICE), data, scale, None, "int4", GemmConfig(8, 64))
    with pytest.raises(ValueError, match="scale must be contiguous float32"):
        quant_linear(x, data, scale.double(), None, "int4", GemmConfig(8, 64))


def test_candidates_fit_the_formats():
    for fmt in ("int8", "fp8", "int4"):
        for M in (1, 8, 64):
            for N, K in ((3072, 2048), (2048, 8192), (4096, 11008)):
                configs = quant_gemm.OPERANDS[fmt].candidates(M, N, K, sms=132)
                assert configs and len(set(configs)) == len(configs)
                assert all(c.split_k * c.block_k <= K for c in configs)
                if fmt == "int4":
                    assert all(c.block_k % 128 == 0 or 128 % c.block_k == 0 for c in configs)
                else:
                    assert all(c.dot or c.block_m(M) * c.block_n * c.block_k <= 32768 for c in configs)
    assert max(c.block_k for c in quant_gemm.OPERANDS["int4"].candidates(1, 2048, 8192, 132)) == 2048


def test_linear_falls_back_to_the_op_without_a_table_entry(monkeypatch):
    """With no measured choice the routed function is the op; with one, the template."""
    monkeypatch.setattr(skinny_gemm, "TABLE", skinny_gemm.GemmTable())
    monkeypatch.setenv("FUSEGEN_KERNELS", "1")
    x, data, scale, b, r = operands(3, 24, 256, "int4", bias=True, act=True)
    want = torch.ops.fusegen.quantized_linear(x, data, scale, b, "int4", r)
    assert torch.equal(quant_gemm.linear(x, data, scale, b, "int4", r), want)
    config = GemmConfig(8, 128, split_k=2)
    key = skinny_gemm.table_key(3, 24, 256, x.dtype, True, "int4")
    skinny_gemm.TABLE.choices[key] = skinny_gemm.Choice(3, 24, 256, config, 1.0, 2.0, "int4")
    got = quant_gemm.linear(x, data, scale, b, "int4", r)
    assert torch.equal(got, quant_linear(x, data, scale, b, "int4", config, r))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_route_linears_routes_quantized_linears_through_the_template(monkeypatch):
    """A compiled int4 model with AWQ (two of its linears apply an activation scale): the
    routed graph calls quant_gemm.linear, which is the op without a table entry and the
    template (in the interpreter) with one, the same logits either way."""
    import fusegen
    from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    calibration = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(3))
    compiled = fusegen.compile(model, "weights=int4", calibration_ids=calibration)
    gm = compiled.graph_module
    monkeypatch.setattr(skinny_gemm, "TABLE", skinny_gemm.GemmTable())
    routed, choices, _ = skinny_gemm.route_linears(gm, [], "cpu", epilogues=False)
    op = torch.ops.fusegen.quantized_linear.default
    assert choices == [] and sum(n.target is op for n in routed.graph.nodes) == 0
    calls = [n for n in routed.graph.nodes if n.target is quant_gemm.linear]
    assert len(calls) == 4 and sum(len(n.args) > 5 for n in calls) == 2
    assert sum(n.target is op for n in gm.graph.nodes) == 4          # the engine's graph is left as it was
    runner = PagedRunner(gm, compiled.facts["kv"], 8, "cpu")
    inputs = packed_inputs(runner, [Chunk([5, 6, 7], [0, 1, 2], 0, [1])])
    want = gm(**inputs)[0]
    torch.testing.assert_close(routed(**inputs)[0], want, rtol=0, atol=0)
    for n in calls:   # a table entry for every quantized shape at M = 3
        N, K = n.meta["val"].shape[-1], n.args[0].meta["val"].shape[-1]
        key = skinny_gemm.table_key(3, N, K, torch.float32, False, "int4")
        skinny_gemm.TABLE.choices[key] = skinny_gemm.Choice(3, N, K, GemmConfig(16, 128, split_k=2), 1.0, 2.0, "int4")
    launched = []
    monkeypatch.setattr(quant_gemm, "kernels_wanted", lambda tensors: True)
    real = quant_gemm.quant_linear
    monkeypatch.setattr(quant_gemm, "quant_linear", lambda *a: launched.append(a[4]) or real(*a))
    torch.testing.assert_close(routed(**inputs)[0], want, rtol=1e-4, atol=1e-4)
    assert launched == ["int4"] * 4


# --- GPU ----------------------------------------------------------------------------------------

SHAPES = [(3072, 2048), (2048, 8192), (4096, 11008)]   # 1B qkv, 1B down, 7B down


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("M", [1, 8, 64])
@pytest.mark.parametrize("N,K", SHAPES)
def test_gpu_every_candidate_bf16(M, N, K, fmt):
    """bf16 x, every candidate configuration: relative error against float64 at most 1e-2."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x, data, scale, b, r = operands(M, N, K, fmt, bias=True, act=fmt == "int4", dtype=torch.bfloat16)
    want = reference(x, data, scale, b, fmt, r)
    for config in quant_gemm.OPERANDS[fmt].candidates(M, N, K, sms):
        got = quant_linear(x, data, scale, b, fmt, config, r).cpu().double()
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, f"M{M} N{N} K{K} {fmt} {config}: rel err {err:.2e}"


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_gpu_table_picks_the_template_over_dequantize(fmt):
    table = skinny_gemm.GemmTable()
    made = table.measure([(2048, 8192, False), (640, 256, True)], [1, 8], torch.bfloat16, "cuda",
                         operand=quant_gemm.OPERANDS[fmt])
    assert len(made) == 4 and all(c.fmt == fmt and c.us > 0 and c.cublas_us > 0 for c in made)
    big = [c for c in made if c.N == 2048]
    # reading the packed weight once beats dequantizing it to bf16 and reading that
    assert all(c.config is not None and c.us < c.cublas_us for c in big), table.report(3.0)
    assert "dequant" in table.report(3.0)


@needs_gpu
@pytest.mark.gpu
def test_gpu_fp8_prefill_by_scaled_mm():
    x, data, scale, b, _ = operands(256, 2048, 4096, "fp8", bias=True, dtype=torch.bfloat16)
    if not quant_gemm.scaled_mm_fits(x, data):
        pytest.skip("no fp8 GEMM on this device")
    got = quant_gemm.fp8_prefill(x, data, scale, b).cpu().double()
    want = reference(x, data, scale, b, "fp8", None)
    # x is quantized to e4m3 per row as well (3 mantissa bits): a few percent
    assert ((got - want).norm() / want.norm()).item() < 5e-2


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_gpu_compiled_model_routes_quantized_linears(fmt, monkeypatch):
    """A mini Llama in bf16 with quantized weights (int4 with AWQ, so two linears per layer
    apply an activation scale): the step graph with its linears routed (the table measured
    at M = 1 and 4 picks the template) against the graph as compiled (dequantize +
    F.linear), on a 4-token prefill and a 1-token decode: logits within 2e-2 of the largest
    logit; then the engine with CUDA graphs generates with the routed graph."""
    import fusegen
    from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256)).to(torch.bfloat16).eval()
    calibration = torch.randint(0, 512, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    compiled = fusegen.compile(model, f"weights={fmt}", calibration_ids=calibration)
    gm = compiled.graph_module
    monkeypatch.setattr(skinny_gemm, "TABLE", skinny_gemm.GemmTable())   # measured here, for these shapes
    routed, choices, _ = skinny_gemm.route_linears(gm, [1, 4], "cuda", epilogues=False)
    assert sum(n.target is quant_gemm.linear for n in routed.graph.nodes) == 8
    assert sum(len(n.args) > 5 for n in routed.graph.nodes if n.target is quant_gemm.linear) == \
        (4 if fmt == "int4" else 0)
    picked = [c for c in choices if c.fmt == fmt]
    assert len(picked) == 8 and all(c.config is not None for c in picked), skinny_gemm.TABLE.report()
    runner = PagedRunner(gm, compiled.facts["kv"], 16, "cuda")
    prefill = packed_inputs(runner, [Chunk([5, 6, 7, 8], [0, 1, 2, 3], 0, [1])])
    want = gm(**prefill)[0]
    got = routed(**prefill)[0]
    tol = 2e-2 * max(1.0, want.float().abs().max().item())
    assert (got.float() - want.float()).abs().max().item() < tol
    decode = packed_inputs(runner, [Chunk([9], [4], 4, [1])])
    want, got = gm(**decode)[0], routed(**decode)[0]
    assert (got.float() - want.float()).abs().max().item() < tol
    engine = compiled.engine(num_blocks=32, max_num_seqs=4)
    assert sum(n.target is quant_gemm.linear for n in engine.runner.graph_gm.graph.nodes) == 8
    tokens = engine.generate_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 8, eos_token_ids=[])
    assert [len(t) for t in tokens] == [8, 8]
