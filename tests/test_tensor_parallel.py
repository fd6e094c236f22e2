"""Tensor parallelism on the CPU: two gloo processes (tp_workers.py), started once for the
module, run every check; the tests read what each rank saw.

    logits     llama / mistral / qwen2 at tp=2 against tp=1 (fp32, 1e-5), the pass's counters
    KV heads   one KV head on two ranks: replicated, counted
    refusals   GPT-2 (Conv1D as addmm), 3 query heads, MLP width 65: errors naming them
    engine     greedy tokens through rank 0's engine (chunked prefill, shared prefix) = tp=1
    artifact   per-rank shards exported, loaded on two ranks, the same logits and tokens
    idle       keep-alive headers of an idle engine between steps: skipped by the follower
    dead rank  rank 1 exits; rank 0's next step raises naming rank 1, well within the timeout
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import tp_workers
from fusegen.config import CompileConfig
from fusegen.errors import ConfigError

CHECKS = ["logits_families", "kv_replicated", "refusals", "engine_greedy", "artifact_round_trip", "idle_headers",
          "rank_dies"]


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


def test_idle_headers_between_steps_are_skipped(ranks):
    lead, other = _ok(ranks[0], "idle_headers"), _ok(ranks[1], "idle_headers")
    assert lead["tokens"] == lead["want"]
    assert other["steps"] == lead["steps"] > 0


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
    # --prompt -: read once, by the launcher (the ranks' stdin is not the terminal's)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main([*argv[:2], "--prompt", "-", *argv[4:], "--tp", "2"]) == 0
    assert capfd.readouterr().out == want


# --- fusegen-cli serve --tp 2: a live server on two gloo ranks ---------------------------------

def _serve_tp2(model_dir):
    """``python -m fusegen serve MODEL --tp 2`` on a free port, once /health answers: (process,
    url, the two ranks' pids)."""
    import subprocess
    import sys
    import time

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn"), pytest.importorskip("fastapi")
    from fusegen.distributed import free_port

    port = free_port()
    env = {**os.environ, "FUSEGEN_TP_TIMEOUT": str(tp_workers.TIMEOUT_S)}
    process = subprocess.Popen([sys.executable, "-m", "fusegen", "serve", str(model_dir), "--tp", "2",
                                "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the server did not answer /health within 180 s"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    return process, url, _ranks(process.pid)


def _ranks(pid: int) -> list[int]:
    """The rank processes a launcher spawned (multiprocessing's resource tracker left out)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{p}").exists() for p in pids)


def test_cli_serve_tp2_answers_like_tp1_and_stops_its_ranks(tiny_chat_dir):
    import signal

    import httpx

    import fusegen
    from fusegen.models import load_model, load_tokenizer

    process, url, ranks = _serve_tp2(tiny_chat_dir)
    try:
        assert len(ranks) == 2
        body = {"model": tiny_chat_dir.name, "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        response = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["text"]
    finally:
        process.send_signal(signal.SIGTERM)   # to the launcher, which passes it on to rank 0
        _, err = process.communicate(timeout=60)
    tokenizer = load_tokenizer(tiny_chat_dir)
    tokens = fusegen.compile(load_model(tiny_chat_dir)).generate_batch([tokenizer("Hello").input_ids], 6)[0]
    assert text == tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True)
    assert process.returncode == 0, err[-3000:]
    assert "tp=2" in err and _gone(ranks)


def test_cli_serve_tp2_ends_with_an_error_naming_a_dead_rank(tiny_chat_dir):
    import signal
    import time

    process, url, ranks = _serve_tp2(tiny_chat_dir)
    os.kill(ranks[1], signal.SIGKILL)
    start = time.monotonic()
    try:
        _, err = process.communicate(timeout=tp_workers.TIMEOUT_S)
    finally:
        process.kill()
    # rank 0 finds out at its next keep-alive (a quarter of the timeout), then names rank 1
    assert time.monotonic() - start < tp_workers.TIMEOUT_S / 4 + 15
    assert process.returncode != 0
    assert "rank 1 stopped answering" in err and "rank 1: ended by SIGKILL" in err, err[-3000:]
    assert _gone(ranks)
