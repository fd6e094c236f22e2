"""``fusegen-cli ... --tp N``: the command run by N processes, one per rank, spawned here
with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so a
rank behaves the same whether this module or torchrun started it.

Rank 0 keeps the terminal; the other ranks' standard output is dropped, and a rank that
failed has its standard error shown after rank 0's (only its last line where rank 0 failed
too: a user error, such as a tp that does not divide the heads, happens on every rank
alike). The exit status is the worst rank's.
"""

from __future__ import annotations

import os
import sys
import tempfile


def under_launcher() -> bool:
    """Started as a rank (by torchrun, or by ``spawn``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def spawn(argv: list[str], tp: int) -> int:
    """Run ``fusegen-cli argv`` on ``tp`` spawned ranks; the worst exit status."""
    import multiprocessing

    import torch

    from fusegen.distributed import check_devices, free_port

    if torch.cuda.is_available():
        check_devices(tp)   # before anything is spawned
    env = {"WORLD_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fusegen-tp-") as folder:
        logs = [os.path.join(folder, f"rank{r}.log") if r else None for r in range(tp)]
        processes = [context.Process(target=_rank_main, args=(argv, r, env, logs[r]), name=f"fusegen-rank-{r}")
                     for r in range(tp)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        codes = [p.exitcode if p.exitcode is not None else 1 for p in processes]
        _show_failures(codes, logs)
    return max(codes, key=abs)


def _show_failures(codes: list[int], logs: list[str | None]) -> None:
    for r in range(1, len(codes)):
        if codes[r]:
            with open(logs[r], "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            # where rank 0 failed too, each rank saw the same error, or the loss of rank 0
            shown = lines if codes[0] == 0 else lines[-1:]
            sys.stderr.write("".join(f"rank {r}: {line}\n" for line in shown))


def _rank_main(argv: list[str], rank_: int, env: dict, log: str | None) -> None:
    os.environ.update(env, RANK=str(rank_), LOCAL_RANK=str(rank_))
    if log is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
    from fusegen.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
