"""FusedGroups fused into the skinny GEMM around them (codegen/fused_gemm.py).

Graphs are compiled the way the pipeline compiles them (export, cleanup, fuse_projections,
fuse_pointwise, lower), routed (skinny_gemm.route_linears) and fused; the fused kernel runs
in Triton's interpreter on CPU ($FUSEGEN_KERNELS=1) with table entries the test sets, and
is compared with the unfused graph in float64. Odd sizes on purpose (N, K not multiples of
any tile), fp32 and fp16, with and without split-K and bias. The counters are asserted on
the four families' compiled graphs.
"""

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from fusegen.codegen import skinny_gemm  # noqa: E402
from fusegen.codegen.fused_gemm import FusedGemm  # noqa: E402
from fusegen.codegen.lower import lower  # noqa: E402
from fusegen.codegen.skinny_gemm import Choice, GemmConfig  # noqa: E402
from fusegen.passes.cleanup_graph import cleanup_graph  # noqa: E402
from fusegen.passes.fuse_pointwise import fuse_pointwise  # noqa: E402
from fusegen.passes.fuse_projections import fuse_projections  # noqa: E402
from fusegen.passes.infra import PassContext  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class GatedMLP(nn.Module):
    def __init__(self, H, I, bias):
        super().__init__()
        self.gate = nn.Linear(H, I, bias=bias)
        self.up = nn.Linear(H, I, bias=bias)

    def forward(self, x):
        return torch.nn.functional.silu(self.gate(x)) * self.up(x)


class ScaledResidual(nn.Module):
    """y = linear(x) * 0.5 + residual: one segment, an extra full-row input."""
    def __init__(self, H, N):
        super().__init__()
        self.proj = nn.Linear(H, N, bias=False)

    def forward(self, x, residual):
        return self.proj(x) * 0.5 + residual


class RMSNorm(nn.Module):
    def __init__(self, H):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(H) + 0.5)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class NormQKV(nn.Module):
    """RMSNorm, then three projections fuse_projections merges: a prologue, no epilogue."""
    def __init__(self, H, N, bias):
        super().__init__()
        self.norm = RMSNorm(H)
        self.q, self.k, self.v = (nn.Linear(H, N, bias=bias) for _ in range(3))

    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h), self.v(h)


class ResidualNormMLP(nn.Module):
    """residual + RMSNorm (two outputs), gated MLP: prologue and epilogue in one kernel; the
    residual sum is used again after the MLP."""
    def __init__(self, H, I):
        super().__init__()
        self.norm = RMSNorm(H)
        self.mlp = GatedMLP(H, I, False)
        self.down = nn.Linear(I, H, bias=False)

    def forward(self, x, residual):
        h = x + residual
        return self.down(self.mlp(self.norm(h))) + h


def compiled(module, *args):
    with torch.no_grad():
        gm = torch.export.export(module, args, strict=False).module()
    ctx = PassContext()
    for p in (cleanup_graph, fuse_projections, fuse_pointwise):
        gm = p(gm, ctx).gm
        gm.recompile()
    lower(gm)
    return gm


@pytest.fixture
def table_entry(monkeypatch):
    """Sets the table's choice for shapes (the interpreter measures nothing)."""
    monkeypatch.setenv("FUSEGEN_KERNELS", "1")
    monkeypatch.setattr(skinny_gemm, "TABLE", skinny_gemm.GemmTable())

    def put(M, N, K, dtype, bias, config):
        skinny_gemm.TABLE.choices[(M, N, K, dtype, bias)] = Choice(M, N, K, config, 1.0, 1.0)
    return put


CONFIGS = [GemmConfig(8, 32), GemmConfig(16, 16, split_k=3), GemmConfig(16, 16, split_k=2, dot=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M", [1, 5])   # 1: the fma path's one-row accumulation
def test_silu_mul_epilogue(table_entry, dtype, config, bias, M):
    H, I = 40, 24
    torch.manual_seed(0)
    module = GatedMLP(H, I, bias).to(DEVICE, dtype)
    x = torch.randn(1, M, H, device=DEVICE, dtype=dtype)
    gm = compiled(module, x)
    routed, _, stats = skinny_gemm.route_linears(gm, [], DEVICE)
    assert stats == {"gemm_epilogues": 1, "gemm_epilogue_segments_2": 1}
    fused = [n for n in routed.graph.nodes if isinstance(n.target, FusedGemm)]
    assert len(fused) == 1 and not any(n.target is skinny_gemm.linear for n in routed.graph.nodes)
    table_entry(M, 2 * I, H, dtype, bias, config)
    epilogue, launches = fused[0].target, []
    launch = epilogue.launch
    epilogue.launch = lambda *a: launches.append(1) or launch(*a)
    got = routed(x)[0]
    assert launches == [1]   # the fused kernel ran, not the reference
    with torch.no_grad():
        want = copy.deepcopy(module).double()(x.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < tol, f"{config} {dtype} bias={bias}: rel err {err:.2e}"
    # without a table entry the same call is the unfused graph: F.linear, then the group
    skinny_gemm.TABLE.choices.clear()
    torch.testing.assert_close(routed(x)[0], gm(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_segment_epilogue_with_extra_input(table_entry, dtype):
    M, H, N = 3, 33, 20
    torch.manual_seed(1)
    module = ScaledResidual(H, N).to(DEVICE, dtype)
    x = torch.randn(1, M, H, device=DEVICE, dtype=dtype)
    r = torch.randn(1, M, N, device=DEVICE, dtype=dtype)
    gm = compiled(module, x, r)
    routed, _, stats = skinny_gemm.route_linears(gm, [], DEVICE)
    assert stats["gemm_epilogues"] == 1 and stats["gemm_epilogue_segments_1"] == 1
    table_entry(M, N, H, dtype, False, GemmConfig(8, 16, split_k=2))
    got = routed(x, r)[0]
    want = copy.deepcopy(module).double()(x.double(), r.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert ((got.double() - want).norm() / want.norm()).item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("M", [1, 3])
def test_rmsnorm_prologue(table_entry, dtype, config, M):
    H, N = 37, 12
    torch.manual_seed(2)
    module = NormQKV(H, N, bias=True).to(DEVICE, dtype)
    x = torch.randn(1, M, H, device=DEVICE, dtype=dtype)
    gm = compiled(module, x)
    routed, _, stats = skinny_gemm.route_linears(gm, [], DEVICE)
    assert stats["gemm_prologues"] == 1 and "gemm_epilogues" not in stats
    table_entry(M, 3 * N, H, dtype, True, config)
    got = routed(x)
    with torch.no_grad():
        want = copy.deepcopy(module).double()(x.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for g, w in zip(got, want):
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err < tol, f"{config} {dtype}: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", CONFIGS[1:], ids=str)
@pytest.mark.parametrize("M", [1, 4])
def test_prologue_and_epilogue_with_a_side_output(table_entry, dtype, config, M):
    H, I = 40, 24
    torch.manual_seed(3)
    module = ResidualNormMLP(H, I).to(DEVICE, dtype)
    x = torch.randn(1, M, H, device=DEVICE, dtype=dtype)
    r = torch.randn(1, M, H, device=DEVICE, dtype=dtype)
    gm = compiled(module, x, r)
    routed, _, stats = skinny_gemm.route_linears(gm, [], DEVICE)
    assert stats["gemm_prologues"] == 1 and stats["gemm_epilogues"] == 1
    fused = [n.target for n in routed.graph.nodes if isinstance(n.target, FusedGemm)]
    assert [f.prologue is not None and f.epilogue is not None for f in fused] == [True]
    table_entry(M, 2 * I, H, dtype, False, config)
    got = routed(x, r)[0]
    with torch.no_grad():
        want = copy.deepcopy(module).double()(x.double(), r.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < tol, f"{config} {dtype}: rel err {err:.2e}"
    skinny_gemm.TABLE.choices.clear()   # no table entry: what the graph did
    torch.testing.assert_close(routed(x, r)[0], gm(x, r)[0], rtol=0, atol=0)


def test_linear_with_another_user_is_not_fused():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 8, bias=False)

        def forward(self, x):
            y = self.proj(x)
            return torch.sigmoid(y) * 2.0, y

    gm = compiled(TwoUsers(), torch.randn(1, 3, 16))
    _, _, stats = skinny_gemm.route_linears(gm, [], "cpu")
    assert "gemm_epilogues" not in stats


@pytest.mark.parametrize("family,fused", [("llama", 2), ("mistral", 2), ("qwen2", 2), ("gpt2", 0)])
def test_counters_on_the_families(family, fused):
    """Per layer (two) the SiLU*mul of the fused gate/up projection becomes its epilogue,
    and both RMSNorms become prologues (of q/k/v and of gate/up); the LM head reads the
    final norm's rows at logits_indices (a gather between them), so it stays unfused, as do
    the o and down projections (inputs from attention and from a fused GEMM). GPT-2's linears are addmm (Conv1D) after LayerNorm (two levels of
    reduction): nothing fuses."""
    import fusegen
    from families import mini_model

    gm = fusegen.compile(mini_model(family)).graph_module
    routed, _, stats = skinny_gemm.route_linears(gm, [], "cpu")
    assert stats.get("gemm_epilogues", 0) == fused
    assert stats.get("gemm_prologues", 0) == 2 * fused
    assert stats["linears_unfused"] == 2 * fused + 1   # GPT-2: its LM head only
    if fused:
        assert stats["gemm_epilogue_segments_2"] == fused
        torch.manual_seed(0)
        ids = torch.randint(0, 100, (1, 5))
        # the routed, fused graph computes what the graph did (references off CUDA)
        from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs

        compiled = fusegen.compile(mini_model(family))
        runner = PagedRunner(compiled.graph_module, compiled.facts["kv"], 8, "cpu")
        inputs = packed_inputs(runner, [Chunk(ids[0].tolist(), list(range(5)), 0, [1])])
        torch.testing.assert_close(routed(**inputs)[0], compiled.graph_module(**inputs)[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("M", [1, 8, 16])
def test_gpu_prologue_and_epilogue_bf16_at_1b_sizes(table_entry, M):
    """The 1B config's residual + RMSNorm -> gate/up -> SiLU*mul in bf16 against float64,
    for every configuration the table would time at this M."""
    H, I = 2048, 8192
    torch.manual_seed(4)
    module = ResidualNormMLP(H, I).to("cuda", torch.bfloat16)
    x = torch.randn(1, M, H, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, M, H, device="cuda", dtype=torch.bfloat16)
    gm = compiled(module, x, r)
    routed, _, stats = skinny_gemm.route_linears(gm, [], "cuda")
    assert stats["gemm_prologues"] == 1 and stats["gemm_epilogues"] == 1
    with torch.no_grad():
        want = copy.deepcopy(module).double()(x.double(), r.double())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for config in skinny_gemm.candidates(M, 2 * I, H, sms):
        table_entry(M, 2 * I, H, torch.bfloat16, False, config)
        got = routed(x, r)[0]
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{config}: rel err {err:.2e}"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("config", [GemmConfig(16, 32), GemmConfig(16, 16, split_k=2, dot=True)], ids=str)
def test_whole_model_with_fused_gemms_matches_the_graph(table_entry, family, config):
    """A mini model's routed, fused step graph with every fused kernel running (prologues,
    the SiLU*mul epilogue, the q/k/v epilogue with rotary and the paged KV write) against
    the compiled graph's references: a 5-token prefill, then a decode step on top of it;
    logits and the KV pool agree."""
    import fusegen
    from families import mini_model
    from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs

    compiled = fusegen.compile(mini_model(family))
    gm = compiled.graph_module
    routed, _, stats = skinny_gemm.route_linears(gm, [], "cpu")
    assert stats["gemm_qkv_epilogues"] == 2 and stats["gemm_prologues"] == 4
    H = 64
    shapes = {(N, K, bias) for N, K, bias in
              [(n.args[1].meta["val"].shape[0], H, len(n.args) > 2 and n.args[2] is not None)
               for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and n.args[0].meta["val"].shape[-1] == H]}
    for M in (5, 1):
        for N, K, bias in shapes:
            table_entry(M, N, K, torch.float32, bias, config)
    fused = [n.target for n in routed.graph.nodes if isinstance(n.target, FusedGemm)]
    launches = []
    for f in fused:
        for name in ("launch", "launch_qkv"):
            original = getattr(f, name)
            setattr(f, name, (lambda original: lambda *a: launches.append(1) or original(*a))(original))
    runners = [PagedRunner(gm, compiled.facts["kv"], 8, "cpu") for _ in range(2)]
    for r in runners:
        r.kv_pool.normal_(generator=torch.Generator().manual_seed(9))   # stale values everywhere
    chunks = [Chunk([5, 6, 7, 8, 9], list(range(5)), 0, [3]), Chunk([11], [5], 5, [3])]
    for chunk in chunks:
        want = gm(**packed_inputs(runners[0], [chunk]))[0]
        got = routed(**packed_inputs(runners[1], [chunk]))[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runners[1].kv_pool, runners[0].kv_pool, rtol=1e-4, atol=1e-4)
    assert len(launches) == 2 * 2 * 2   # per step and layer: q/k/v and gate/up fused kernels


@pytest.mark.parametrize("M", [1, 3])
def test_measurement_samples_are_packed_like_the_runtime(M):
    """measure_fused's arguments at M tokens have the runtime's packed shapes (batch 1,
    sequence M), so every fused call's reference, the q/k/v one with its paged KV write
    included, runs on them."""
    import fusegen
    from families import mini_model
    from fusegen.codegen import fused_gemm
    from fusegen.runtime.paged import PagedRunner

    compiled = fusegen.compile(mini_model("llama"))
    routed, _, stats = skinny_gemm.route_linears(compiled.graph_module, [], "cpu")
    assert stats["gemm_qkv_epilogues"] == 2
    runner = PagedRunner(compiled.graph_module, compiled.facts["kv"], 8, "cpu")
    gen = torch.Generator().manual_seed(0)
    sites = [n for n in routed.graph.nodes if isinstance(n.target, FusedGemm)]
    assert sites
    for node in sites:
        args = fused_gemm._sample(node, routed, M, "cpu", runner.kv_pool, gen)
        ins, weight, _, _ = node.target._split(args)
        assert all(t.shape[:-1] == (1, M) for t in ins if isinstance(t, torch.Tensor) and t.dim() == 3)
        out = node.target.reference(*args)[0]
        assert out.shape[0] == 1 and M in out.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gpu_engine_with_every_fused_kernel_matches_hf_greedy(monkeypatch, family):
    """The engine on CUDA with the template and every fused call forced on (whatever the
    measurements say), fp32, CUDA graphs: greedy tokens identical to HF's."""
    import functools

    import fusegen
    from families import mini_model
    from fusegen.codegen import fused_gemm

    monkeypatch.setattr(skinny_gemm.GemmTable, "lookup", skinny_gemm.GemmTable.best_template)
    monkeypatch.setattr(fused_gemm, "measure_fused", functools.partial(fused_gemm.measure_fused, margin=1e9))
    monkeypatch.setattr(skinny_gemm, "TABLE", skinny_gemm.GemmTable())
    model = mini_model(family).cuda()
    engine = fusegen.compile(model).engine(num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4)
    calls = engine.setup["gemm_fusion"]["calls"]
    assert calls and all(c["chosen"] == "fused" for c in calls)
    assert engine.setup["gemm_fusion"]["gemm_qkv_epilogues"] == 2
    prompts = [[5, 9, 33, 2, 17, 88, 41], [7, 3], [64] * 5, [12, 13, 14]]
    got = engine.generate_batch(prompts, 10, eos_token_ids=[])
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == want[0, len(prompt):].tolist(), prompt
