"""What the ranks of the tensor-parallel tests run: ``spawn(checks, out_dir)`` starts two gloo
processes once; each runs every check in order and writes what it saw to
``out_dir/rank<r>.json``, which the tests then read.

Checks are functions ``(rank, state) -> dict``; ``state`` carries compiled models from one
check to the next (compiling is the slow part)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

TP = 2
TIMEOUT_S = 30   # of each collective (FUSEGEN_TP_TIMEOUT): a dead rank is found well within the test


def spawn(checks: list[str], out_dir: Path, tp: int = TP, backend_env: dict | None = None) -> list[dict]:
    """Run ``checks`` (names of functions of this module) on ``tp`` spawned ranks; their results."""
    import torch.multiprocessing as mp

    from fusegen.distributed import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(tp),
           "FUSEGEN_TP_TIMEOUT": str(TIMEOUT_S), "TP_OUT": str(out_dir), **(backend_env or {})}
    context = mp.start_processes(_rank_main, args=(tp, checks, str(out_dir), env), nprocs=tp,
                                 start_method="spawn", join=False)
    deadline = time.time() + 240
    while not context.join(timeout=1):   # raises if a rank failed
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"tensor-parallel ranks still running after 240 s: {checks}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(tp)]


def _rank_main(rank: int, tp: int, checks: list[str], out_dir: str, env: dict) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)   # two ranks on two cores
    results, state = {}, {}
    for name in checks:
        start = time.perf_counter()
        try:
            results[name] = globals()[name](rank, state)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to show
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
        if results[name].get("exit"):
            os._exit(0)


# --- checks -----------------------------------------------------------------------------------

def _compile(model, config: str, dump_dir=None):
    import fusegen

    return fusegen.compile(model, config, dump_dir=dump_dir)


def _logits(compiled):
    from families import left_padded

    ids, mask = left_padded([6, 3, 5], 7, seed=1)
    return compiled(ids, mask)[mask.bool()]


def logits_families(rank: int, state: dict) -> dict:
    """Each Llama-like family at tp=2 against tp=1: max |logit difference| (fp32)."""
    from families import mini_model

    out = {}
    dump = Path(os.environ["TP_OUT"]) / f"dump{rank}"
    for family in ("llama", "mistral", "qwen2"):
        sharded = _compile(mini_model(family), f"tp={TP}", dump if family == "llama" else None)
        got = _logits(sharded)
        counters = {k.split(".", 1)[1]: v for k, v in sharded.report.counters.items()
                    if k.startswith("shard_tensor_parallel.")}
        entry = {"counters": counters, "kv_heads": sharded.facts["kv"].kv_heads}
        if rank == 0:
            whole = _compile(mini_model(family), "default")
            entry["max_error"] = (got - _logits(whole)).abs().max().item()
            state[f"{family}_tp1"] = whole
        state[family] = sharded
        out[family] = entry
    text = next(dump.glob("*_shard_tensor_parallel.py")).read_text()
    out["dump_collectives"] = {op: text.count(f"_c10d_functional.{op}.default(")
                               for op in ("all_reduce", "all_gather_into_tensor")}
    return out


def kv_replicated(rank: int, state: dict) -> dict:
    """One KV head, two ranks: each keeps it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from families import VOCAB, left_padded

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                         max_position_embeddings=256)).eval()
    sharded = _compile(model, f"tp={TP}")
    ids, mask = left_padded([6, 3], 6, seed=2)
    got = sharded(ids, mask)[mask.bool()]
    want = model(ids, attention_mask=mask).logits[mask.bool()]
    counters = {k.split(".", 1)[1]: v for k, v in sharded.report.counters.items()
                if k.startswith("shard_tensor_parallel.")}
    return {"counters": counters, "max_error": (got - want).abs().max().item()}


def refusals(rank: int, state: dict) -> dict:
    """GPT-2 (Conv1D as addmm), heads or an MLP width that tp does not divide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from families import VOCAB, mini_model

    out = {}

    def error(model):
        try:
            _compile(model, f"tp={TP}")
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return None

    out["gpt2"] = error(mini_model("gpt2"))
    torch.manual_seed(0)
    out["heads"] = error(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=3,
                                                      num_key_value_heads=1)).eval())
    out["mlp"] = error(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=65,
                                                    num_hidden_layers=1, num_attention_heads=4,
                                                    num_key_value_heads=2)).eval())
    return out


PROMPTS = [list(range(3, 40)), list(range(3, 25)) + [60, 61], [90, 91, 92]]   # a shared 22-token prefix


def engine_greedy(rank: int, state: dict) -> dict:
    """Greedy tokens through rank 0's engine (chunked prefill, a shared prefix) against tp=1."""
    sharded = state["llama"]
    if rank != 0:
        return {"steps": sharded.follow()}
    engine = sharded.engine(num_blocks=16, max_num_batched_tokens=32, max_num_seqs=4)
    tokens = engine.generate_batch(PROMPTS, max_new_tokens=8)
    state["engine_tokens"] = tokens
    stats = dict(engine.stats)
    also = sharded.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=5, eos_token_id=[]).tolist()
    sharded.stop_followers()
    whole = state["llama_tp1"]
    want = whole.engine(num_blocks=16, max_num_batched_tokens=32, max_num_seqs=4).generate_batch(
        PROMPTS, max_new_tokens=8)
    return {"tokens": tokens, "want": want, "steps": engine.runner.steps, "stats": stats,
            "generate": also, "generate_want": whole.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=5,
                                                              eos_token_id=[]).tolist()}


def artifact_round_trip(rank: int, state: dict) -> dict:
    """Per-rank shards exported by both ranks, loaded on both: the same logits and tokens."""
    import fusegen

    sharded = state["llama"]
    directory = Path(os.environ["TP_OUT"]) / "artifact"
    sharded.save(directory)
    loaded = fusegen.load(directory)
    out = {"max_error": (_logits(loaded) - _logits(sharded)).abs().max().item(),
           "ranks_stored": sorted(int(p.name[4:]) for p in directory.glob("rank*")),
           "tp_rank": loaded.tp_group.rank}
    if rank != 0:
        loaded.follow()
        return out
    out["tokens"] = loaded.engine(num_blocks=16, max_num_seqs=4).generate_batch(PROMPTS, max_new_tokens=4)
    loaded.stop_followers()
    out["want"] = [t[:4] for t in state["engine_tokens"]]
    return out


def idle_headers(rank: int, state: dict) -> dict:
    """An idle engine's keep-alive headers between steps: the follower skips them."""
    sharded = state["llama"]
    if rank != 0:
        return {"steps": sharded.follow()}
    engine = sharded.engine(num_blocks=8)
    engine.runner._idle_every = 0.0   # every call sends one
    for _ in range(3):
        engine.runner.idle()
    tokens = engine.generate_batch([PROMPTS[2]], max_new_tokens=3)
    engine.runner.idle()
    sharded.stop_followers()
    return {"tokens": tokens, "want": [state["engine_tokens"][2][:3]], "steps": engine.runner.steps}


def rank_dies(rank: int, state: dict) -> dict:
    """Rank 1 exits; rank 0's next step fails with an error naming it, within the timeout."""
    sharded = state["llama"]
    if rank != 0:
        return {"exit": True}
    time.sleep(3 * 1.0 + 1)   # rank 1's heartbeat goes stale
    start = time.perf_counter()
    try:
        sharded.engine(num_blocks=8).generate_batch([PROMPTS[2]], max_new_tokens=2)
    except Exception as exc:  # noqa: BLE001
        return {"error_message": f"{type(exc).__name__}: {exc}", "after_s": time.perf_counter() - start}
    return {"error_message": None, "after_s": time.perf_counter() - start}


def cuda_logits_and_greedy(rank: int, state: dict) -> dict:
    """On GPU r (NCCL): the mini Llama at tp=2 against tp=1 on GPU 0, logits and greedy tokens."""
    from families import left_padded, mini_model

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    sharded = _compile(mini_model("llama").to(device), f"tp={TP}")
    ids, mask = left_padded([6, 3, 5], 7, seed=1)
    got = sharded(ids.to(device), mask.to(device))[mask.to(device).bool()]
    out = {"backend": sharded.tp_group.backend}
    if rank != 0:
        sharded.follow()
        return out
    tokens = sharded.engine(num_blocks=16, max_num_seqs=4).generate_batch(PROMPTS, max_new_tokens=8)
    sharded.stop_followers()
    whole = _compile(mini_model("llama").to(device), "default")
    want = whole(ids.to(device), mask.to(device))[mask.to(device).bool()]
    out["max_error"] = (got - want).abs().max().item()
    out["max_logit"] = want.abs().max().item()
    out["tokens"] = tokens
    out["want"] = whole.engine(num_blocks=16, max_num_seqs=4).generate_batch(PROMPTS, max_new_tokens=8)
    return out
