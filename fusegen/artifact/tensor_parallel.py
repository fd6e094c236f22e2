"""Artifacts of a tensor-parallel model: one ordinary artifact per rank, its shard of the
weights and its graph (collectives included), under one directory.

    DIR/manifest.json      {"format": ..., "tensor_parallel": {"size": N, "ranks": [
                              {"dir": "rank0", "manifest_sha256": ...}, ...]}}
    DIR/rank0/             rank 0's artifact (manifest.json, graph.json, weights/, ...)
    DIR/rank1/             ...

Every rank writes its own directory (``export`` called on every rank, as under torchrun);
rank 0 then writes the top manifest, which pins each rank's manifest by its SHA-256. Loading
on N ranks, each reads its own directory, checked against that digest, then as any artifact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from fusegen.artifact.format import FORMAT, FORMAT_VERSION, MANIFEST
from fusegen.errors import ArtifactFormatError, ArtifactTamperedError

KEY = "tensor_parallel"


def rank_dir(rank: int) -> str:
    return f"rank{rank}"


def _barrier(group, what: str) -> None:
    import torch.distributed as dist

    from fusegen.distributed import collective

    collective(group, what, dist.barrier)


def export_ranks(compiled, directory, export, **kwargs) -> Path:
    """Every rank: write this rank's artifact under ``directory``; rank 0 the top manifest."""
    from fusegen.artifact.export import check_destination

    group = compiled.tp_group
    directory = Path(directory).absolute()
    if group.rank == 0:
        check_destination(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():   # an older artifact (check_destination allows only that)
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    _barrier(group, "clearing the artifact directory")
    export(compiled, directory / rank_dir(group.rank), **kwargs)
    _barrier(group, "writing the ranks' artifacts")
    if group.rank == 0:
        ranks = [{"dir": rank_dir(r), "manifest_sha256": _digest(directory / rank_dir(r) / MANIFEST)}
                 for r in range(group.size)]
        top = {"format": FORMAT, "format_version": FORMAT_VERSION, KEY: {"size": group.size, "ranks": ranks},
               "model": {"class": compiled.report.model_class}, "compile_config": compiled.config.to_string()}
        (directory / MANIFEST).write_text(json.dumps(top, indent=1, sort_keys=True))
    _barrier(group, "writing the top manifest")
    return directory


def is_sharded(manifest: dict) -> bool:
    return isinstance(manifest, dict) and KEY in manifest


def rank_directory(directory: Path, manifest: dict, device) -> Path:
    """This process's rank directory (joining the process group of ``size`` ranks), its
    manifest checked against the top manifest's digest."""
    from fusegen.distributed import join

    entry = manifest.get(KEY)
    size = entry.get("size") if isinstance(entry, dict) else None
    ranks = entry.get("ranks") if isinstance(entry, dict) else None
    if not isinstance(size, int) or size < 2 or not isinstance(ranks, list) or len(ranks) != size \
            or not all(isinstance(r, dict) and r.get("dir") == rank_dir(i) for i, r in enumerate(ranks)):
        raise ArtifactFormatError(MANIFEST, f"malformed field {KEY!r}: {entry!r}")
    group = join(size, device)
    path = directory / rank_dir(group.rank)
    if not (path / MANIFEST).is_file():
        raise ArtifactFormatError(MANIFEST, f"rank {group.rank}'s directory {rank_dir(group.rank)} has no manifest")
    if _digest(path / MANIFEST) != ranks[group.rank].get("manifest_sha256"):
        raise ArtifactTamperedError(f"{rank_dir(group.rank)}/{MANIFEST}", "does not hash to what the top "
                                    "manifest records for it")
    return path


def adopt(compiled, device) -> None:
    """A loaded rank's model joins this process's group: the check that it is this rank's
    shard, and its collectives renamed to the group's name."""
    from fusegen.distributed import join

    shard = compiled.facts.get("tp") or {}
    group = join(compiled.config.tp, device)
    if shard.get("rank") != group.rank or shard.get("size") != group.size:
        raise ArtifactFormatError(MANIFEST, f"the artifact is rank {shard.get('rank')} of {shard.get('size')}, "
                                  f"this process is rank {group.rank} of {group.size}")
    collectives = {torch.ops._c10d_functional.all_reduce.default: 2,
                   torch.ops._c10d_functional.all_gather_into_tensor.default: 2}
    for node in compiled.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in collectives:
            args = list(node.args)
            args[collectives[node.target]] = group.group_name
            node.args = tuple(args)
    compiled.graph_module.recompile()
    compiled.tp_group = group


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
