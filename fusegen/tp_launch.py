"""``fusegen-cli ... --tp N``: the command run by N processes, one per rank, spawned here
with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so a
rank behaves the same whether this module or torchrun started it.

Rank 0 keeps the terminal; the other ranks' standard output is dropped, and a rank that
failed has its standard error shown after rank 0's (only its last line where rank 0 failed
too: a user error, such as a tp that does not divide the heads, happens on every rank
alike). The exit status is the worst rank's.

Rank 0 leads the shutdown: the ranks run in a process group of their own, so a Ctrl-C in
the terminal reaches this process only, which passes SIGINT and SIGTERM on to rank 0 (the
server stops and then stops the followers; generate ends as on one process). A rank still
running ``FUSEGEN_TP_TIMEOUT`` + 10 s after rank 0 ended is killed and named.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import time

GRACE_S = 10.0   # past the collective timeout, how long followers may outlive rank 0


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
        with _signals_to(processes[0]):
            for process in processes:
                process.start()
            stuck = _join(processes)
        codes = [p.exitcode if p.exitcode is not None else 1 for p in processes]
        for r, seconds in stuck:
            sys.stderr.write(f"rank {r}: still running {seconds:.0f} s after rank 0 ended; killed\n")
        _show_failures(codes, logs, skip={r for r, _ in stuck})
    return max(codes, key=abs)


@contextlib.contextmanager
def _signals_to(lead):
    """SIGINT and SIGTERM to this process go on to rank 0, which stops the others."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        if lead.is_alive():
            os.kill(lead.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _join(processes) -> list[tuple[int, float]]:
    """Wait for rank 0, then for the others a bounded time; kill those still running."""
    from fusegen.distributed import timeout_seconds

    processes[0].join()
    ended, grace = time.monotonic(), timeout_seconds() + GRACE_S
    for process in processes[1:]:
        process.join(max(0.0, ended + grace - time.monotonic()))
    stuck = [(r, time.monotonic() - ended) for r, p in enumerate(processes) if p.is_alive()]
    for r, _ in stuck:
        processes[r].kill()
        processes[r].join()
    return stuck


def _show_failures(codes: list[int], logs: list[str | None], skip: set = frozenset()) -> None:
    for r in range(1, len(codes)):
        if codes[r] < 0 and r not in skip:
            sys.stderr.write(f"rank {r}: ended by {signal.Signals(-codes[r]).name}\n")
        elif codes[r] and r not in skip:
            with open(logs[r], "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            # where rank 0 failed too, each rank saw the same error, or the loss of rank 0
            shown = lines if codes[0] == 0 else lines[-1:]
            sys.stderr.write("".join(f"rank {r}: {line}\n" for line in shown))


def _rank_main(argv: list[str], rank_: int, env: dict, log: str | None) -> None:
    os.environ.update(env, RANK=str(rank_), LOCAL_RANK=str(rank_))
    os.setpgrp()   # out of the terminal's foreground group: signals come through the launcher
    if log is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
    from fusegen.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
