"""Pointwise groups fused into the skinny GEMM that feeds them (codegen/gemm_epilogue.py).

Graphs are compiled the way the pipeline compiles them (export, cleanup, fuse_projections,
fuse_pointwise, lower), routed (skinny_gemm.route_linears) and fused; the fused kernel runs
in Triton's interpreter on CPU ($FUSEGEN_KERNELS=1) with table entries the test sets, and
is compared with the unfused graph in float64. Odd sizes on purpose (N, K not multiples of
any tile), fp32 and fp16, with and without split-K and bias. The counters are asserted on
the four families' compiled graphs.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from fusegen.codegen import skinny_gemm  # noqa: E402
from fusegen.codegen.gemm_epilogue import GemmEpilogue, fuse_epilogues  # noqa: E402
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
def test_silu_mul_epilogue(table_entry, dtype, config, bias):
    M, H, I = 5, 40, 24
    torch.manual_seed(0)
    module = GatedMLP(H, I, bias).to(DEVICE, dtype)
    x = torch.randn(1, M, H, device=DEVICE, dtype=dtype)
    gm = compiled(module, x)
    routed, _, stats = skinny_gemm.route_linears(gm, [], DEVICE)
    assert stats == {"gemm_epilogues": 1, "gemm_epilogue_segments_2": 1}
    fused = [n for n in routed.graph.nodes if isinstance(n.target, GemmEpilogue)]
    assert len(fused) == 1 and not any(n.target is skinny_gemm.linear for n in routed.graph.nodes)
    table_entry(M, 2 * I, H, dtype, bias, config)
    epilogue, launches = fused[0].target, []
    launch = epilogue.launch
    epilogue.launch = lambda *a: launches.append(1) or launch(*a)
    got = routed(x)[0]
    assert launches == [1]   # the fused kernel ran, not the reference
    with torch.no_grad():
        want = module.double()(x.double())
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
    want = module.double()(x.double(), r.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert ((got.double() - want).norm() / want.norm()).item() < tol


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
    """Per layer the SiLU*mul of the fused gate/up projection becomes its epilogue (two
    layers). GPT-2's MLP is an addmm (Conv1D) with its tanh-GELU: not a linear, not fused."""
    import fusegen
    from families import mini_model

    gm = fusegen.compile(mini_model(family)).graph_module
    routed, _, stats = skinny_gemm.route_linears(gm, [], "cpu")
    assert stats.get("gemm_epilogues", 0) == fused
    if fused:
        assert stats["gemm_epilogue_segments_2"] == fused
