"""The process group of a tensor-parallel model: one process per rank, started by torchrun
or by ``fusegen-cli ... --tp N`` (which spawns them), joined here.

    rank 0  ── schedules, samples ──┐   broadcast: each step's inputs
    rank 1  ─────────────────────── ┼── in the graphs: all-reduce after the row-parallel
    ...                             │   linears, all-gather of the vocabulary-parallel logits
    rank N-1 ───────────────────────┘

The backend is NCCL on CUDA and gloo on the CPU; nothing else differs. Every collective has
the group's timeout, and a collective that fails (a peer closed its connection, or did not
answer in time) raises ``TensorParallelError`` naming this rank and the ranks that stopped
sending heartbeats: each rank writes one to the group's store every second.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass

import torch

from fusegen.errors import ConfigError, FusegenError

TIMEOUT_ENV = "FUSEGEN_TP_TIMEOUT"   # seconds a collective waits for the other ranks
DEFAULT_TIMEOUT = 60.0
HEARTBEAT = 1.0                      # seconds between a rank's heartbeats
_KEY = "fusegen_tp/alive/{}"


class TensorParallelError(FusegenError, RuntimeError):
    """A collective between the ranks of a tensor-parallel model failed."""

    def __init__(self, rank: int, what: str, missing: list[int], cause: BaseException):
        self.rank, self.missing, self.cause = rank, missing, cause
        lost = (f"rank {', '.join(map(str, missing))} stopped answering" if missing
                else "no rank stopped its heartbeat (a timeout or a mismatched collective)")
        super().__init__(f"tensor parallelism: rank {rank}: {what} failed: {lost}: "
                         f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")


@dataclass(frozen=True)
class TPGroup:
    """This process's place among ``size`` ranks."""
    rank: int
    size: int
    group_name: str     # what the graph's functional collectives name
    backend: str

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def timeout_seconds() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))


def join(tp: int, device: torch.device | str | None = None) -> TPGroup:
    """This process's TPGroup of ``tp`` ranks: the default process group if one is initialized,
    else one initialized from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT; LOCAL_RANK picks the GPU). ConfigError when there is none, when its size is
    not ``tp``, or when this machine has fewer GPUs than ``tp``."""
    import torch.distributed as dist

    device = torch.device(device) if device is not None else None
    if not dist.is_available():
        raise ConfigError(f"tp={tp} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ConfigError(f"tp={tp} runs one process per rank: start them with torchrun "
                              f"--nproc-per-node {tp} (or fusegen-cli generate/export/run --tp {tp}); "
                              f"this process has no RANK/WORLD_SIZE")
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if cuda:
            check_devices(tp)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
    size = dist.get_world_size()
    if size != tp:
        raise ConfigError(f"tp={tp} but the process group has {size} ranks; start {tp} processes")
    group = TPGroup(dist.get_rank(), size, dist.group.WORLD.group_name, dist.get_backend())
    _start_heartbeat(group)
    return group


def check_devices(tp: int) -> None:
    """ConfigError when this machine has fewer CUDA devices than ``tp`` ranks need."""
    count = torch.cuda.device_count()
    if count < tp:
        raise ConfigError(f"tp={tp} needs {tp} GPUs, this machine has {count}")


def free_port() -> int:
    """A TCP port free on this host now (MASTER_PORT of ranks spawned here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_failure(group: TPGroup, what: str, exc: BaseException) -> TensorParallelError:
    """The error to raise for collective ``what`` that raised ``exc``: names the ranks whose
    heartbeat is older than three beats (or that the store, on rank 0, cannot be read for).
    A peer that died just now still has a fresh heartbeat, so where none is stale the
    heartbeats are read once more, three beats later."""
    silent = _silent_ranks(group)
    if not silent:
        time.sleep(3 * HEARTBEAT + 0.5)
        silent = _silent_ranks(group)
    return TensorParallelError(group.rank, what, silent, exc)


def collective(group: TPGroup, what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a collective, with its failure raised as TensorParallelError."""
    try:
        return fn(*args, **kwargs)
    except TensorParallelError:
        raise
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError or DistBackendError
        raise check_failure(group, what, exc) from exc


_BEATING: set = set()


def _start_heartbeat(group: TPGroup) -> None:
    """A daemon thread writing this rank's time to the group's store every HEARTBEAT s."""
    if group in _BEATING:
        return
    _BEATING.add(group)
    store = _store()
    if store is None:
        return

    def beat():
        while True:
            try:
                store.set(_KEY.format(group.rank), repr(time.time()))
            except Exception:  # noqa: BLE001 - the store went away with rank 0: stop beating
                return
            time.sleep(HEARTBEAT)

    threading.Thread(target=beat, name=f"fusegen-tp-heartbeat-{group.rank}", daemon=True).start()


def _store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a group initialized without a store
        return None


def _silent_ranks(group: TPGroup) -> list[int]:
    store = _store()
    if store is None:
        return []
    now, silent = time.time(), []
    for rank in range(group.size):
        if rank == group.rank:
            continue
        try:
            store.set_timeout(datetime.timedelta(seconds=2))
            last = float(store.get(_KEY.format(rank)).decode())
        except Exception:  # noqa: BLE001 - no heartbeat, or the store (rank 0's) is gone
            silent.append(rank)
            continue
        if now - last > 3 * HEARTBEAT:
            silent.append(rank)
    return silent

