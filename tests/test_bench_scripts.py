"""The GPU-only benchmarks, run on a machine without a GPU, say so in one line and exit."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
GPU_ONLY = ("cold_start.py", "e2e.py", "kernels.py", "profile_engine.py", "quant_gemm.py", "serving.py",
            "speculative.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU prints")
@pytest.mark.parametrize("script", GPU_ONLY)
def test_gpu_benchmark_on_a_cpu_machine_is_one_line(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # they import each other, as when run from bench/
    monkeypatch.setattr(sys, "argv", [f"bench/{script}"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert info.value.code == f"bench/{script}: error: a CUDA GPU is needed (torch.cuda.is_available() is False)"
