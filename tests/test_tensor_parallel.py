"""Tensor parallelism on the CPU: two gloo processes (tp_workers.py), started once for the
module, run every check; the tests read what each rank saw.

    logits     llama / mistral / qwen2 at tp=2 against tp=1 (fp32, 1e-5), the pass's counters
    KV heads   one KV head on two ranks: replicated, counted
    refusals   GPT-2 (Conv1D as addmm), 3 query heads, MLP width 65: errors naming them
    engine     greedy tokens through rank 0's engine (chunked prefill, shared prefix) = tp=1
    artifact   per-rank shards exported, loaded on two ranks, the same logits and tokens
    dead rank  rank 1 exits; rank 0's next step raises naming rank 1, well within the timeout
"""

from __future__ import annotations

import pytest

import tp_workers
from fusegen.config import CompileConfig
from fusegen.errors import ConfigError

CHECKS = ["logits_families", "kv_replicated", "refusals", "engine_greedy", "artifact_round_trip", "rank_dies"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    return tp_workers.spawn(CHECKS, out)


def _ok(result: dict, name: str) -> dict:
    entry = result[name]
    assert "error" not in entry, entry.get("traceback", entry.get("error"))
    return entry


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_logits_equal_tp1(ranks, family):
    lead, other = (_ok(r, "logits_families")[family] for r in ranks)
    assert lead["max_error"] <= 1e-5
    for entry in (lead, other):
        c = entry["counters"]
        # per layer: o and down all-reduced; qkv, gate_up, o, down sharded; the LM head gathered
        assert c["allreduces"] == 4 and c["allgathers"] == 1
        assert c["sharded_linears"] == 9 and c["replicated_linears"] == 0
        assert c["query_heads_per_rank"] == 2 and c["kv_heads_per_rank"] == 1
        assert entry["kv_heads"] == 1 and "kv_heads_replicated" not in c


def test_dump_shows_collectives(ranks):
    lead = _ok(ranks[0], "logits_families")
    assert lead["dump_collectives"] == {"all_reduce": 4, "all_gather_into_tensor": 1}


def test_kv_heads_fewer_than_tp_are_replicated(ranks):
    for result in ranks:
        entry = _ok(result, "kv_replicated")
        assert entry["max_error"] <= 1e-5
        assert entry["counters"]["kv_heads_replicated"] == 1
        assert entry["counters"]["kv_heads_per_rank"] == 1


def test_refusals_name_the_numbers(ranks):
    for result in ranks:
        entry = _ok(result, "refusals")
        assert "GPT2LMHeadModel" in entry["gpt2"] and "aten.linear" in entry["gpt2"]
        assert entry["heads"].startswith("ConfigError") and "3 query heads" in entry["heads"]
        assert entry["mlp"].startswith("ConfigError") and "MLP width 65" in entry["mlp"]


def test_engine_greedy_identical_to_tp1(ranks):
    lead, other = _ok(ranks[0], "engine_greedy"), _ok(ranks[1], "engine_greedy")
    assert lead["tokens"] == lead["want"]
    assert lead["generate"] == lead["generate_want"]
    assert lead["stats"]["prefill_chunks_cut"] >= 1
    # rank 1 ran every step rank 0 broadcast: the engine's and generate's
    assert other["steps"] > lead["steps"] > 0


def test_artifact_round_trip(ranks):
    lead, other = _ok(ranks[0], "artifact_round_trip"), _ok(ranks[1], "artifact_round_trip")
    assert lead["max_error"] == 0.0 and other["max_error"] == 0.0
    assert lead["ranks_stored"] == [0, 1]
    assert lead["tokens"] == lead["want"]


def test_dead_rank_is_named_not_waited_for(ranks):
    entry = _ok(ranks[0], "rank_dies")
    assert entry["error_message"] is not None
    assert "rank 1" in entry["error_message"] and "TensorParallelError" in entry["error_message"]
    assert entry["after_s"] < tp_workers.TIMEOUT_S + 5


def test_config_checks():
    assert CompileConfig.from_string("tp=2").tp == 2
    with pytest.raises(ConfigError, match="tp must be >= 1"):
        CompileConfig(tp=0)
    with pytest.raises(ConfigError, match="weights=int8 needs tp=1"):
        CompileConfig(tp=2, weights="int8")


def test_tp_without_ranks_is_a_config_error(monkeypatch):
    from fusegen.distributed import join

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        join(2, "cpu")


def test_fewer_gpus_than_tp(monkeypatch):
    import torch

    from fusegen.distributed import check_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="tp=2 needs 2 GPUs, this machine has 1"):
        check_devices(2)


def test_cli_generate_tp2_spawns_ranks_and_matches_tp1(tiny_chat_dir, capfd, monkeypatch):
    from fusegen.cli import main

    monkeypatch.setenv("FUSEGEN_TP_TIMEOUT", str(tp_workers.TIMEOUT_S))
    argv = ["generate", str(tiny_chat_dir), "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main(argv) == 0
    want = capfd.readouterr().out
    assert main(argv + ["--tp", "2"]) == 0
    assert capfd.readouterr().out == want
