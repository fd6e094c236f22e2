"""The skinny-GEMM template (codegen/skinny_gemm.py) against F.linear in float64.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors: odd M, N and K
(not multiples of any tile), with and without bias, split-K with the fused reduction, both
the fma and the tl.dot variant, fp32 and fp16. The ``gpu`` tests run bf16 on the 1B and 7B
linear shapes with every configuration the table would time, the measured table itself and
the CUDA-graph capture of a routed graph.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusegen.codegen import skinny_gemm  # noqa: E402
from fusegen.codegen.skinny_gemm import GemmConfig, skinny_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check(M, N, K, bias, config, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    got = skinny_linear(x, w, b, config)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (M, N) and got.dtype == dtype
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < TOL[dtype], f"M{M} N{N} K{K} bias={bias} {config} {dtype}: rel err {err:.2e}"
    return x, w, b, got


CASES = [   # M, N, K, bias, config
    (1, 37, 100, True, GemmConfig(8, 32)),
    (1, 24, 256, False, GemmConfig(8, 64, split_k=4)),        # split-K, K divisible
    (3, 50, 97, False, GemmConfig(16, 32, split_k=2)),        # split-K, ragged K
    (2, 9, 33, True, GemmConfig(8, 16, split_k=3)),           # a split count that is not a power of two
    (5, 33, 130, True, GemmConfig(16, 16, split_k=4, dot=True)),
    (17, 40, 64, True, GemmConfig(16, 16, split_k=2, dot=True)),
    (13, 70, 48, False, GemmConfig(32, 16, dot=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,bias,config", CASES)
def test_template_matches_linear(M, N, K, bias, config, dtype):
    check(M, N, K, bias, config, dtype)


def test_split_k_is_deterministic_and_leaves_tickets_at_zero():
    config = GemmConfig(8, 16, split_k=4)
    x, w, b, first = check(3, 20, 100, True, config, torch.float32)
    again = skinny_linear(x, w, b, config)
    assert torch.equal(first, again)
    _, counts = skinny_gemm.WORKSPACE.get(torch.device(DEVICE), 0, 0)
    assert int(counts.abs().sum()) == 0


def test_leading_dims_and_non_contiguous_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 2 * 40, generator=g)[..., ::2].to(DEVICE)   # [1, 3, 40], column stride 2
    w = torch.randn(12, 40, generator=g).to(DEVICE)
    got = skinny_linear(x, w, None, GemmConfig(8, 16, split_k=2))
    assert got.shape == (1, 3, 12)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


def test_too_many_rows_is_refused():
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_linear(torch.randn(65, 8), torch.randn(4, 8), None, GemmConfig(8, 16))


def test_candidates_fill_the_gpu_and_fit_registers():
    for M in (1, 8, 64):
        for N, K in ((2048, 2048), (2048, 8192), (128256, 2048)):
            configs = skinny_gemm.candidates(M, N, K, sms=132)
            assert configs
            for c in configs:
                assert c.split_k * c.block_k <= K
                if not c.dot:
                    assert c.block_m(M) * c.block_n * c.block_k <= 32768
    # a grid too small for the SMs gets split-K; a wide one does not
    assert max(c.split_k for c in skinny_gemm.candidates(1, 2048, 8192, 132)) > 1
    assert max(c.split_k for c in skinny_gemm.candidates(1, 128256, 2048, 132)) == 1


def test_route_linears_without_measurements_keeps_the_results():
    """Routing a compiled graph's linears through the table changes no result: with no
    measured choice every linear is F.linear."""
    import fusegen
    from families import mini_model
    from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs

    compiled = fusegen.compile(mini_model("llama"))
    gm = compiled.graph_module
    routed, choices, _ = skinny_gemm.route_linears(gm, [], "cpu", epilogues=False)
    assert choices == []
    linears = sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    assert linears == 2 * 4 + 1   # per layer fused q/k/v, o, fused gate/up, down; the LM head
    assert sum(n.target is skinny_gemm.linear for n in routed.graph.nodes) == linears
    runner = PagedRunner(gm, compiled.facts["kv"], 8, "cpu")
    inputs = packed_inputs(runner, [Chunk([5, 6, 7], [0, 1, 2], 0, [1])])
    torch.testing.assert_close(routed(**inputs)[0], gm(**inputs)[0], rtol=0, atol=0)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 8, 64])
@pytest.mark.parametrize("N,K", [(3072, 2048), (2048, 8192), (22016, 4096), (4096, 11008)])
def test_gpu_every_candidate_bf16(M, N, K):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for config in skinny_gemm.candidates(M, N, K, sms):
        check(M, N, K, False, config, torch.bfloat16, "cuda")


@needs_gpu
@pytest.mark.gpu
def test_gpu_table_and_graph_capture():
    table = skinny_gemm.GemmTable()
    made = table.measure([(2048, 8192, False), (640, 200, True)], [1, 8], torch.bfloat16, "cuda")
    assert len(made) == 4 and all(c.us > 0 and c.cublas_us > 0 for c in made)
    assert "cuBLAS" in table.report(3.0)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 8192, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16, generator=g) * 8192 ** -0.5
    config = GemmConfig(16, 256, split_k=4)
    skinny_linear(x, w, None, config)   # sizes the workspace before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_linear(x, w, None, config)
    for _ in range(3):
        x.copy_(torch.randn(8, 8192, device="cuda", dtype=torch.bfloat16, generator=g))
        graph.replay()
        want = torch.nn.functional.linear(x.double(), w.double())
        assert ((y.double() - want).norm() / want.norm()).item() < 1e-2


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,config", [
    (1, 2048, 2048, GemmConfig(16, 256, split_k=2)),
    (1, 3001, 1000, GemmConfig(8, 128)),                  # ragged N, K not a multiple of the split
    (8, 4096, 11008, GemmConfig(16, 128, split_k=4, dot=True)),
])
def test_gpu_dependent_launches_with_weight_prefetch(M, N, K, config):
    """Under PDL each GEMM prefetches its weight before waiting for the kernel before it:
    a chain x -> y1 -> y2 in one CUDA graph, where each input is the previous kernel's
    output, gives the chained product, replay after replay with new inputs."""
    from fusegen.codegen import launch

    if not launch.supported("cuda"):
        pytest.skip("PDL needs compute capability 9.0")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w1 = torch.randn(K, K, device="cuda", dtype=torch.bfloat16, generator=g) * K ** -0.5
    w2 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K ** -0.5
    with launch.dependent_launches(True):
        assert skinny_gemm._prefetch(w2, config)["PREFETCH"] > 0
        skinny_linear(skinny_linear(x, w1, None, config), w2, None, config)   # compiles, sizes the workspace
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = skinny_linear(skinny_linear(x, w1, None, config), w2, None, config)
    for _ in range(3):
        x.copy_(torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g))
        graph.replay()
        h = torch.nn.functional.linear(x.double(), w1.double()).to(torch.bfloat16).double()
        want = torch.nn.functional.linear(h, w2.double())
        assert ((y.double() - want).norm() / want.norm()).item() < 1e-2
