"""Tensor parallelism over NCCL on two GPUs (the CPU tests run the same code over gloo):
``python -m pytest -m multigpu -q`` on a machine with two or more NVIDIA GPUs."""

from __future__ import annotations

import pytest
import torch

import tp_workers

pytestmark = pytest.mark.multigpu


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if torch.cuda.device_count() < tp_workers.TP:
        pytest.skip(f"needs {tp_workers.TP} GPUs, this machine has {torch.cuda.device_count()}")
    return tp_workers.spawn(["cuda_logits_and_greedy"], tmp_path_factory.mktemp("tp-gpu"))


def _entry(result: dict) -> dict:
    entry = result["cuda_logits_and_greedy"]
    assert "error" not in entry, entry.get("traceback", entry.get("error"))
    return entry


def test_nccl_logits_equal_tp1(ranks):
    lead = _entry(ranks[0])
    assert [_entry(r)["backend"] for r in ranks] == ["nccl", "nccl"]
    # fp32 weights; the CUDA attention kernels' TF32 dots and the all-reduce's order round
    assert lead["max_error"] <= 1e-3 * max(1.0, lead["max_logit"])


def test_nccl_greedy_identical_to_tp1(ranks):
    lead = _entry(ranks[0])
    assert lead["tokens"] == lead["want"]
