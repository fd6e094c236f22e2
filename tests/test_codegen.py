"""Generated fused kernels (run in Triton's interpreter on CPU) against eager PyTorch."""

import os

import pytest
import torch
from torch import nn

import fusegen
from families import mini_model
from fusegen.codegen import cache
from fusegen.codegen.lower import lower
from fusegen.fused_group import KERNELS_ENV, FusedGroup
from fusegen.passes.cleanup_graph import cleanup_graph
from fusegen.passes.fuse_pointwise import fuse_pointwise
from fusegen.passes.infra import PassContext
from helpers import assert_close_report

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "1")


class RMSNorm(nn.Module):
    def __init__(self, n, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dtype=dtype))

    def forward(self, x, residual):
        s = x + residual
        h = s.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return s, self.weight * h.to(s.dtype)


class SwiGLU(nn.Module):
    def forward(self, gate, up):
        return nn.functional.silu(gate) * up


class TanhGelu(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3))))


class RowMax(nn.Module):
    def forward(self, x, bias):
        y = x + bias
        return torch.exp(y - y.amax(-1, keepdim=True))


def lowered(module, *args):
    with torch.no_grad():
        gm = torch.export.export(module, args, strict=False).module()
    ctx = PassContext()
    gm = cleanup_graph(gm, ctx).gm
    result = fuse_pointwise(gm, ctx)
    result.gm.recompile()
    records = lower(result.gm)
    return result.gm, result.stats, records


CASES = {
    "add_rmsnorm": (lambda dt: RMSNorm(213, dt), lambda dt: (torch.randn(3, 423, 213, dtype=dt),
                                                           torch.randn(3, 423, 213, dtype=dt)), "row"),
    "swiglu": (lambda dt: SwiGLU(), lambda dt: (torch.randn(5, 333, dtype=dt), torch.randn(5, 333, dtype=dt)),
               "pointwise"),
    "tanh_gelu": (lambda dt: TanhGelu(), lambda dt: (torch.randn(7, 129, dtype=dt),), "pointwise"),
    "row_max": (lambda dt: RowMax(), lambda dt: (torch.randn(4, 9, 100, dtype=dt), torch.randn(100, dtype=dt)),
                "row"),
}


KERNELS_ON_CPU = pytest.mark.skipif(torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"),
                                    reason="runs generated kernels on CPU tensors: needs TRITON_INTERPRET=1")


@KERNELS_ON_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_generated_kernel_matches_eager(case, dtype, monkeypatch):
    make_module, make_args, schedule = CASES[case]
    torch.manual_seed(0)
    module, args = make_module(dtype), make_args(dtype)
    gm, stats, records = lowered(module, *args)
    assert stats["groups"] == 1 and len(records) == 1
    assert records[0]["schedule"] == schedule
    group = next(m for m in gm.modules() if isinstance(m, FusedGroup))
    assert group.kernel is not None and "@triton.jit" in group.source
    launches = []
    kernel = group.kernel
    group.kernel = lambda *inputs: launches.append(1) or kernel(*inputs)
    with torch.no_grad():
        want = module(*args)
        monkeypatch.setenv("FUSEGEN_KERNELS", "1")     # the generated kernel (interpreted on CPU)
        got = gm(*args)
        monkeypatch.setenv("FUSEGEN_KERNELS", "0")     # the group's own nodes, run eagerly
        ref = gm(*args)
    assert launches == [1]                             # the kernel ran, once
    want, got, ref = ((t if isinstance(t, tuple) else (t,)) for t in (want, got, ref))
    atol, rtol = TOL[dtype]
    for g, r, w in zip(got, ref, want):
        assert_close_report(g, w, atol=atol, rtol=rtol, msg=f"{case}: kernel")
        assert_close_report(r, w, atol=atol, rtol=rtol, msg=f"{case}: group reference")


def test_kernel_cache_reuses_source_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEGEN_CACHE", str(tmp_path))
    args = (torch.randn(2, 64), torch.randn(2, 64))
    _, _, first = lowered(SwiGLU(), *args)
    _, _, second = lowered(SwiGLU(), *args)
    assert first[0]["source_hash"] == second[0]["source_hash"]
    files = list((tmp_path / "kernels").glob("k*.py"))
    assert [f.name for f in files] == [f"k{first[0]['source_hash']}.py"]
    assert cache.cache_dir() == tmp_path / "kernels"


def test_compiled_llama_with_generated_kernels_matches_hf(tmp_path):
    model = mini_model("llama")
    compiled = fusegen.compile(model, dump_dir=tmp_path)
    counters = compiled.report.counters
    # per layer: input norm, rotary on q, rotary on k, residual+post-attention norm, SiLU*mul;
    # plus the final norm, and the rotary tables (cos and sin times the attention scaling)
    assert counters["fuse_pointwise.groups"] == 13
    assert counters["fuse_pointwise.row_groups"] == 5
    assert len(compiled.facts["kernels"]) == 13
    assert len(list((tmp_path / "kernels").glob("fused_*.py"))) == 13
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
    assert_close_report(compiled(ids), want, atol=1e-4, rtol=0)
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, eos_token_id=[]), hf)


class SplitSwiGLU(nn.Module):
    """gate and up are strided parts of one fused projection output."""

    def forward(self, fused):
        gate, up = fused.split([37, 37], dim=-1)
        return nn.functional.silu(gate) * up


@KERNELS_ON_CPU
def test_strided_row_inputs_are_read_in_place(monkeypatch):
    monkeypatch.setenv("FUSEGEN_KERNELS", "1")   # the kernel, not the group's reference
    fused = torch.randn(3, 5, 74)
    module = SplitSwiGLU()
    gm, stats, _ = lowered(module, fused)
    assert stats["groups"] == 1
    group = next(m for m in gm.modules() if isinstance(m, FusedGroup))
    assert "out0, s0_0, s0_1, s1_0, s1_1, c0, c1, o0_0, o0_1, oc0, L1, M," in group.source  # strides are arguments
    from fusegen.codegen.pointwise import input_strides
    assert input_strides(fused[..., 37:], (3, 5, 37)) == [5 * 74, 74, 1]  # read in place
    with torch.no_grad():
        assert_close_report(gm(fused), module(fused), atol=1e-6, rtol=1e-6)


class Rotary(nn.Module):
    """HF-style rotary embedding applied to q [B, H, S, D] (a transposed view) with cos/sin
    tables [B, S, D] broadcast over heads."""

    def forward(self, q_proj, cos, sin):
        B, S, _ = q_proj.shape
        q = q_proj.view(B, S, 3, 16).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        rotated = torch.cat((-q[..., 8:], q[..., :8]), dim=-1)
        return q * c + rotated * s


@KERNELS_ON_CPU
def test_rotary_is_one_kernel_reading_the_transposed_input_in_place(monkeypatch):
    monkeypatch.setenv("FUSEGEN_KERNELS", "1")   # the kernel, not the group's reference
    from fusegen.passes.normalize_graph import normalize_graph

    args = (torch.randn(2, 7, 48), torch.randn(2, 7, 16), torch.randn(2, 7, 16))
    module = Rotary()
    with torch.no_grad():
        gm = torch.export.export(module, args, strict=False).module()
    ctx = PassContext()
    gm = cleanup_graph(gm, ctx).gm
    assert normalize_graph(gm, ctx).stats["rotate_half"] == 1
    result = fuse_pointwise(gm, ctx)
    result.gm.recompile()
    lower(result.gm)
    group = next(m for m in result.gm.modules() if isinstance(m, FusedGroup))
    assert result.stats["groups"] == 1 and "rotate_half" in group.extra_repr()
    assert group.input_layouts == ["row", "broadcast", "broadcast"]
    with torch.no_grad():
        got, want = result.gm(*args), module(*args)
    assert_close_report(got, want, atol=1e-6, rtol=1e-6)
    # laid out as eager lays out the result: token-major under the [B, H, S, D] view, so
    # going back to tokens is a view of the kernel's output, not a copy
    assert got.stride() == want.stride() == (7 * 48, 16, 48, 1)
    assert got.transpose(1, 2).reshape(2, 7, 48).data_ptr() == got.data_ptr()
    assert got.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("shape, view", [
    ((4, 6, 5), lambda x: x),                              # contiguous: the plain order
    ((4, 6, 5), lambda x: x.transpose(0, 1)),              # leading dims swapped
    ((3, 1, 6, 5), lambda x: x.transpose(1, 2)),           # a size-1 dim anywhere
    ((6, 5, 4), lambda x: x.transpose(1, 2)),              # last dim not innermost: plain order
    ((2, 3, 4, 5), lambda x: x.permute(2, 0, 1, 3)[..., 1:4]),   # a strided slice of a permutation
])
def test_output_order_matches_eager_pointwise_layout(shape, view):
    from fusegen.codegen.pointwise import output_order

    x = view(torch.randn(shape))
    order = output_order(x)
    out = torch.empty_permuted(x.shape, order)
    assert sorted(order) == list(range(x.dim()))
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()   # dense
    if x.stride(-1) == 1 or x.shape[-1] == 1:
        eager = x * 2.0                                       # TensorIterator's choice
        big = [d for d in range(x.dim()) if x.shape[d] > 1]
        assert [out.stride(d) for d in big] == [eager.stride(d) for d in big]
    else:
        assert order == list(range(x.dim()))
