"""The Hopper prefill kernels (codegen/prefill_hopper.py) and their tuning
(codegen/prefill_tuning.py) against the reference ops in fusegen.ops.

Without a GPU the kernels run in the Triton interpreter, which also runs TMA descriptors, so
the descriptor path (``hopper_interpret``), the pointer path (``hopper_interpret_pointers``)
and the persistent tile loop (``hopper_interpret_persistent``, 3 programs) are all checked
on odd shapes: 37 queries, GQA 5 -> 1, head dim 80 (padded to 128), windows, paged blocks of
1, 16 and 64 rows with a cached prefix. ``python -m pytest -m gpu tests/test_prefill_hopper.py``
runs the compiled kernels in bf16 against float64, tuned and with fixed tiles.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

from fusegen import ops  # noqa: E402
from fusegen.codegen import attention as attn  # noqa: E402
from fusegen.codegen import prefill_hopper, prefill_tuning  # noqa: E402
from helpers import assert_close_report  # noqa: E402
from test_attention_kernels import (DEVICE, TOL, nan_outputs, needs_gpu, paged_batch,  # noqa: E402, F401
                                    reference, run_paged)

INTERPRET_CONFIGS = ["hopper_interpret", "hopper_interpret_pointers", "hopper_interpret_persistent"]

# (B, Hq, Hkv, S, L, D, causal, window, softcap)
DENSE_CASES = {
    "s37-gqa5/1-d80-causal": (1, 5, 1, 37, 37, 80, True, 0, 0.0),
    "s37-gqa5/1-d80-window-prefix": (2, 5, 1, 37, 45, 80, True, 9, 0.0),
    "noncausal-softcap-d32": (1, 4, 2, 29, 29, 32, False, 0, 30.0),
    "noncausal-window-d16": (1, 2, 2, 19, 23, 16, False, 5, 0.0),
}


def dense_inputs(B, Hq, Hkv, S, L, D, dtype, device=DEVICE, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=g).transpose(1, 2).to(device, dtype)  # HF layout
    k = torch.randn(B, Hkv, L, D, generator=g).to(device, dtype)
    v = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2).to(device, dtype)
    return q, k, v


@pytest.mark.parametrize("config", INTERPRET_CONFIGS)
@pytest.mark.parametrize("case, dtype", [pytest.param(c, torch.float32, id=f"{c}-fp32") for c in DENSE_CASES]
                         + [pytest.param("s37-gqa5/1-d80-window-prefix", torch.float16, id="window-fp16")])
def test_hopper_flash_attention_matches_reference(case, dtype, config):
    B, Hq, Hkv, S, L, D, causal, window, softcap = DENSE_CASES[case]
    q, k, v = dense_inputs(B, Hq, Hkv, S, L, D, dtype)
    got = attn.flash_attention(q, k, v, 0.9, causal, window, softcap, config=config)
    want = reference(ops.attention, q, k, v, None, 0.9, causal, window, softcap)
    assert_close_report(got, want, *TOL[dtype], msg=f"{case} {config}")


# (seq_lens, q_lens): sequences with a cached prefix (70 - 40 keys before their queries),
# one without, one decode-like row among them; T padded by 2 unowned rows
PAGED_SEQS = ([70, 9, 100, 5], [40, 9, 3, 1])


@pytest.mark.parametrize("config", INTERPRET_CONFIGS[:2])
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("causal, window, softcap, dtype", [
    pytest.param(True, 0, 0.0, torch.float32, id="causal-fp32"),
    pytest.param(True, 9, 30.0, torch.float32, id="window-softcap-fp32"),
    pytest.param(False, 0, 0.0, torch.float16, id="noncausal-fp16"),
])
def test_hopper_paged_prefill_with_prefix_matches_reference(block_size, causal, window, softcap,
                                                            dtype, config, nan_outputs):
    b = paged_batch(*PAGED_SEQS, 5, 1, 80, block_size, dtype, pad_tokens=2)
    got, args = run_paged(b, 1, 0.8, causal, window, softcap, config=config)
    want = reference(ops.paged_attention, *args)
    assert not got.isnan().any(), "a row no program wrote"
    assert_close_report(got, want, *TOL[dtype], msg=f"block {block_size} {config}")
    assert torch.count_nonzero(got[:, :, -2:]) == 0


def test_tma_layout_needs_unit_last_stride_and_16_byte_strides():
    x = torch.zeros(2, 5, 40, 80, dtype=torch.float16)
    assert prefill_hopper.tma_layout_ok(x, x.transpose(1, 2).contiguous().transpose(1, 2))
    assert not prefill_hopper.tma_layout_ok(x.transpose(2, 3))               # last stride 40
    assert not prefill_hopper.tma_layout_ok(torch.zeros(3, 12, dtype=torch.float16)[:, :4])  # 24-byte rows
    assert prefill_hopper.tma_layout_ok(torch.zeros(1, 3, 8, dtype=torch.float16)[:, :1])    # length-1 dim


def test_resolve_config_names_and_refusals():
    q = torch.zeros(1, 2, 4, 16, device=DEVICE)
    resolve = lambda config, scale=1.0: prefill_tuning.resolve_config(
        "flash_attention", config, q, scale, (q,), "key", lambda cfg: None)
    assert resolve(None) == prefill_tuning.default_prefill_config(16, q.is_cuda)
    assert resolve("fa2") == resolve(None)
    assert resolve("hopper_interpret")["kernel"] == "hopper"
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        resolve("huge")
    with pytest.raises(ValueError, match="Hopper prefill kernel needs a positive scale, got -1.0"):
        resolve("hopper", scale=-1.0)
    with pytest.raises(ValueError, match="needs last strides of 1"):
        prefill_tuning.resolve_config("flash_attention", "hopper", q.transpose(2, 3), 1.0, (q,),
                                      "key", lambda cfg: None)


def test_prefill_configs_have_tile_keys_and_known_options():
    for name, cfg in prefill_tuning.PREFILL_CONFIGS.items():
        assert prefill_tuning.TILE_KEYS <= set(cfg) <= prefill_tuning.TILE_KEYS | prefill_tuning.OPTION_KEYS, name
        assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16, name
    for names in prefill_tuning.HOPPER_CANDIDATES.values():
        assert all(prefill_tuning.PREFILL_CONFIGS[n]["kernel"] == "hopper" for n in names)


@pytest.fixture
def fake_gpu_timing(monkeypatch, tmp_path):
    """tuned_choice on CPU: a fake GPU name, a fake do_bench reading ``times`` (ms per tile
    config, keyed by BLOCK_N and num_stages), a fresh cache directory; records the runs."""
    monkeypatch.setenv("FUSEGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(prefill_tuning, "_choices", {})
    monkeypatch.setattr(prefill_tuning, "_device_names", {0: "fake GPU"})
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    state = {"runs": [], "capturing": capturing, "times": {}}

    def do_bench(fn, **kwargs):
        fn()
        cfg = state["runs"][-1]
        return state["times"][(cfg["BLOCK_N"], cfg["num_stages"])]

    monkeypatch.setattr(prefill_tuning.triton.testing, "do_bench", do_bench)
    return state


def test_tuning_measures_once_per_shape_class_and_keeps_the_choice_on_disk(fake_gpu_timing):
    state = fake_gpu_timing
    names = ("hopper_m128_n128_w8_s2", "hopper_m128_n64_w8_s3", "hopper_m64_n64_w4_s2")
    state["times"] = {(128, 2): 2.0, (64, 3): 1.5, (64, 2): 3.0}
    run = state["runs"].append
    assert prefill_tuning.tuned_choice("cuda:0", "k1", names, run) == "hopper_m128_n64_w8_s3"
    assert len(state["runs"]) == 3
    assert prefill_tuning.tuned_choice("cuda:0", "k1", names, run) == "hopper_m128_n64_w8_s3"
    assert len(state["runs"]) == 3  # remembered
    prefill_tuning._choices.clear()  # a new process: read back from disk
    assert prefill_tuning.tuned_choice("cuda:0", "k1", names, run) == "hopper_m128_n64_w8_s3"
    assert len(state["runs"]) == 3
    stored = prefill_tuning._read_disk()
    assert list(stored) == ["fake GPU | triton " + prefill_tuning.triton.__version__ + " | k1"]
    assert stored[next(iter(stored))]["ms"]["hopper_m128_n128_w8_s2"] == 2.0
    state["capturing"][0] = True  # inside a capture a new class never measures
    assert prefill_tuning.tuned_choice("cuda:0", "k2", names, run) == names[0]
    assert len(state["runs"]) == 3


def test_tuning_skips_candidates_that_fail(fake_gpu_timing):
    state = fake_gpu_timing
    state["times"] = {(128, 2): 2.0}
    names = ("hopper_m128_n64_w8_s3", "hopper_m128_n128_w8_s2")  # (64, 3) has no time: KeyError
    assert prefill_tuning.tuned_choice("cuda:0", "k", names, state["runs"].append) == names[1]
    state["times"] = {}
    assert prefill_tuning.tuned_choice("cuda:0", "other", names, state["runs"].append) is None


# --- GPU: compiled kernels, bf16 against float64 --------------------------------------------

GPU_CONFIGS = ["hopper", "hopper_m128_n64_w8_s3", "hopper_m128_n128_w8_s2_persistent",
               "hopper_m64_n64_w4_s3", "hopper_m128_n128_w8_s2_pointers"]


def _needs_hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the Hopper kernel's TMA path needs sm90+")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", GPU_CONFIGS)
@pytest.mark.parametrize("B, Hq, Hkv, S, L, D, causal, window, softcap", [
    (2, 8, 2, 333, 333, 128, True, 0, 0.0),
    (1, 4, 4, 517, 600, 64, True, 100, 30.0),   # windowed, cached prefix, softcap
    (2, 6, 1, 129, 400, 80, False, 0, 0.0),     # MQA, padded head dim
    (1, 4, 2, 300, 300, 256, True, 64, 0.0),
])
def test_gpu_hopper_flash_attention_against_float64(B, Hq, Hkv, S, L, D, causal, window, softcap, config):
    _needs_hopper()
    if D > 128 and config != "hopper":
        pytest.skip("fixed 128-row tiles are for head dims up to 128 (the tuned D256 candidates are smaller)")
    q, k, v = dense_inputs(B, Hq, Hkv, S, L, D, torch.bfloat16, device="cuda", seed=3)
    got = attn.flash_attention(q, k, v, D ** -0.5, causal, window, softcap, config=config)
    want = reference(ops.attention, q, k, v, None, D ** -0.5, causal, window, softcap,
                     dtype=torch.float64)
    assert_close_report(got, want, *TOL[torch.bfloat16], msg=config)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", ["hopper", "hopper_m128_n64_w8_s3", "hopper_m64_n64_w4_s3"])
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("D, causal, window, softcap", [(128, True, 0, 0.0), (128, True, 64, 30.0),
                                                        (80, False, 0, 0.0)])
def test_gpu_hopper_paged_prefill_with_prefix_against_float64(block_size, D, causal, window, softcap, config):
    _needs_hopper()
    seq_lens, q_lens = [333, 17, 1000, 4099, 1], [96, 5, 333, 700, 1]  # cached prefixes
    b = paged_batch(seq_lens, q_lens, 8, 2, D, block_size, torch.bfloat16, pad_tokens=3)
    got, args = run_paged(b, 1, D ** -0.5, causal, window, softcap, config=config)
    want = reference(ops.paged_attention, *args, dtype=torch.float64)
    assert_close_report(got, want, *TOL[torch.bfloat16], msg=f"block {block_size} {config}")
    assert torch.count_nonzero(got[:, :, -3:]) == 0


@pytest.mark.gpu
@needs_gpu
def test_gpu_default_is_tuned_outside_capture_and_replays_in_a_cuda_graph():
    _needs_hopper()
    b = paged_batch([300, 64], [200, 64], 8, 2, 128, 16, torch.bfloat16, pad_tokens=5)
    call = lambda: run_paged(b, 1, 0.1, True, 0, 0.0)[0]
    call()  # tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    b["q"].normal_()
    graph.replay()
    assert torch.equal(out, call())
    want = reference(ops.paged_attention, *run_paged(b, 1, 0.1, True, 0, 0.0)[1], dtype=torch.float64)
    assert_close_report(out, want, *TOL[torch.bfloat16])
