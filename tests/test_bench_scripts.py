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
