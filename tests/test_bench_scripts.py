"""The GPU-only benchmarks, run on a machine without a GPU, say so in one line and exit."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
GPU_ONLY = ("cold_start.py", "compile_time.py", "e2e.py", "kernel_bench.py", "profile_engine.py", "quant_gemm.py", "schedule_sweep.py", "serving.py",
            "speculative.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU prints")
@pytest.mark.parametrize("script", GPU_ONLY)
def test_gpu_benchmark_on_a_cpu_machine_is_one_line(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # they import each other, as when run from bench/
    monkeypatch.setattr(sys, "argv", [f"bench/{script}"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert info.value.code == f"bench/{script}: error: a CUDA GPU is needed (torch.cuda.is_available() is False)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU prints")
def test_a_bench_script_run_as_a_user_runs_it_imports_the_libraries_not_its_neighbours():
    """``python bench/e2e.py`` puts bench/ first on sys.path, ahead of the installed
    packages: no script there may shadow a library that transformers imports (a
    bench/kernels.py shadowed the ``kernels`` package and transformers died importing it)."""
    import subprocess

    proc = subprocess.run([sys.executable, str(BENCH / "e2e.py")], capture_output=True, text=True, timeout=300,
                          cwd=BENCH.parent)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "bench/e2e.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)"]


def test_e2e_tp_refuses_fewer_gpus_than_the_largest_tp_and_bad_values(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["bench/e2e.py", *argv])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(BENCH / "e2e.py"), run_name="__main__")
        return info.value.code

    assert run("--tp", "0") == 2 and "--tp values must be >= 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run("--tp", "1", "2") == "bench/e2e.py: error: a CUDA GPU is needed (torch.cuda.is_available() is False)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run("--tp", "1", "2") == "bench/e2e.py: error: --tp 1 2 needs 2 GPUs, this machine has 1"


def test_e2e_tp_rows_carry_their_ratio_against_tp1(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    e2e = runpy.run_path(str(BENCH / "e2e.py"), run_name="e2e")
    measures = {"decode_ms_per_token": 10.0, "ttft_2048_ms": 100.0, "throughput_tok_s": 1000.0,
                "decode_b64_ms_per_step": 20.0}
    rows = [{"model": "1b", "tp": 1, "roofline_ms": 5.0, **measures},
            {"model": "1b", "tp": 2, "roofline_ms": 2.5, **{k: v / 2 for k, v in measures.items()}}]
    rows = e2e["add_tp_ratios"](rows)
    assert rows[0]["vs_tp1"] == dict.fromkeys(measures, 1.0)
    assert rows[1]["vs_tp1"] == {"decode_ms_per_token": 2.0, "ttft_2048_ms": 2.0, "throughput_tok_s": 0.5,
                                 "decode_b64_ms_per_step": 2.0}
    e2e["print_tp"](rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:4] == ["1b", "2", "5.00", "2.00x"] and lines[2].endswith("50%")


def test_e2e_variants_carry_their_ratio_against_the_first(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    e2e = runpy.run_path(str(BENCH / "e2e.py"), run_name="e2e")
    assert e2e["variant_key"]("bf16") == "fusegen"
    assert e2e["variant_key"]("weights=fp8") == "fusegen[weights=fp8]"
    base = {"decode_ms_per_token": 4.0, "decode_b64_ms_per_step": 8.0, "throughput_tok_s": 1000.0}
    fp8 = {"decode_ms_per_token": 2.0, "decode_b64_ms_per_step": 5.0, "throughput_tok_s": 1500.0}
    out = {"fusegen": dict(base), "fusegen[weights=fp8]": dict(fp8)}
    e2e["add_variant_ratios"](out, ["bf16", "weights=fp8", "weights=int4"])  # int4 absent: left out
    assert out["fusegen[weights=fp8]"]["vs_bf16"] == {"decode_b1": 2.0, "decode_b64": 1.6, "throughput": 1.5}
    assert "vs_bf16" not in out["fusegen"]
