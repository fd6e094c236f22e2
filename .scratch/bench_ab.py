"""A/B: old (HEAD) vs new attention kernels on the GPU."""
import importlib.util, math, sys, torch, triton.testing
from fusegen.codegen import attention as new
spec = importlib.util.spec_from_file_location("attention_old", ".scratch/attention_old.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
DT = torch.bfloat16
def ms(fn): return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

def paged(B_real, q_len, kv_len, N, T, D, bs=64, H=32, Hkv=8):
    need = -(-kv_len // bs)
    pool = torch.randn(1, 2, need * B_real + 1, bs, Hkv, D, device="cuda", dtype=DT)
    tables = torch.zeros(N, need, dtype=torch.int32, device="cuda")
    perm = torch.randperm(need * B_real, device="cuda").int() + 1
    tables[:B_real] = perm.view(B_real, need)
    lens = torch.zeros(N, dtype=torch.int32, device="cuda"); lens[:B_real] = kv_len
    starts = torch.zeros(N + 1, dtype=torch.int32, device="cuda")
    starts[1:B_real + 1] = torch.arange(1, B_real + 1, device="cuda") * q_len
    starts[B_real + 1:] = B_real * q_len
    q = torch.randn(1, H, T, D, device="cuda", dtype=DT)
    args = (q, pool, 0, tables, lens, starts, D ** -0.5, True, 0, 0.0)
    a, b = old.paged_attention(*args), new.paged_attention(*args)
    err = (a.float() - b.float()).abs().max().item()
    flops = 4 * B_real * H * D * q_len * (kv_len - q_len / 2)
    t_old, t_new = ms(lambda: old.paged_attention(*args)), ms(lambda: new.paged_attention(*args))
    print(f"paged B{B_real} q{q_len} kv{kv_len} N{N} T{T} D{D}: old {t_old:.3f} ms ({flops/t_old/1e9:.0f} TF/s)"
          f" new {t_new:.3f} ms ({flops/t_new/1e9:.0f} TF/s) maxdiff {err:.2e}", flush=True)

def dense(B, T, D, H=32):
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=DT) for _ in range(3))
    flops = 4 * B * H * T * T * D / 2
    f = lambda m: (lambda: m.flash_attention(q, k, v, D ** -0.5, True))
    err = (f(old)().float() - f(new)().float()).abs().max().item()
    t_old, t_new = ms(f(old)), ms(f(new))
    print(f"dense B{B} T{T} D{D}: old {flops/t_old/1e9:.0f} TF/s new {flops/t_new/1e9:.0f} TF/s maxdiff {err:.2e}", flush=True)

def decode_new(B, L, D):
    paged_new_only = None
    bs, H, Hkv = 16, 32, 8
    need = -(-L // bs)
    pool = torch.randn(1, 2, need * B, bs, Hkv, D, device="cuda", dtype=DT)
    tables = torch.randperm(need * B, device="cuda").int().view(B, need)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    starts = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(1, H, B, D, device="cuda", dtype=DT)
    args = (q, pool, 0, tables, lens, starts, D ** -0.5, True, 0, 0.0)
    byts = 2 * B * L * Hkv * D * 2
    res = []
    for m in (old, new):
        if D & (D - 1) and m is old: res.append(float("nan")); continue
        g = torch.cuda.CUDAGraph(); m.paged_attention(*args); torch.cuda.synchronize()
        with torch.cuda.graph(g): m.paged_attention(*args)
        res.append(byts / ms(g.replay) / 1e9)
    print(f"decode B{B} L{L} D{D}: old {res[0]:.2f} TB/s new {res[1]:.2f} TB/s", flush=True)

paged(1, 4096, 4096, 1, 4096, 128)
paged(1, 4096, 4096, 1, 4096, 80) if False else None
paged(2, 1000, 1000, 64, 2048, 128)     # padded bucket: 2 real of N=64, T=2048
paged(3, 16, 2000, 64, 2048, 128)
dense(4, 4096, 128)
decode_new(1, 8192, 128); decode_new(32, 4096, 128); decode_new(32, 4096, 80)
# new-only head dims
for D in (80, 96, 256):
    q, k, v = (torch.randn(4, 32, 4096, D, device="cuda", dtype=DT) for _ in range(3))
    t = ms(lambda: new.flash_attention(q, k, v, D ** -0.5, True))
    print(f"dense new D{D}: {4*4*32*4096*4096*D/2/t/1e9:.0f} TF/s (FLOPs of the real D)", flush=True)
