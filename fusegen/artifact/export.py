"""``fusegen-cli export`` / ``CompiledModel.save``: a compiled model written as an artifact."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

import fusegen
from fusegen.artifact import binaries, tuning
from fusegen.artifact.sign import read_key, sign
from fusegen.artifact.format import (FORMAT, FORMAT_VERSION, GRAPH, MANIFEST, SHARD_BYTES, TOKENIZER,
                                     chunk_count, hash_chunk)
from fusegen.codegen.pointwise import source_key
from fusegen.compiler import CompiledModel
from fusegen.fused_group import FusedGroup
from fusegen.kv import KVGeometry
from fusegen.ir import graph_tensors, graph_to_ir, value_to_json
from fusegen.progress import Bar


def export(compiled: CompiledModel, directory, *, tokenizer=None, onnx: bool = False,
           sign_key=None, progress: bool = False, triton_binaries: bool = True) -> Path:
    """Write ``compiled`` to ``directory`` (created; an older artifact there is replaced, any
    other non-empty directory is refused). ``tokenizer``: a HF tokenizer to ship along.
    ``sign_key``: an Ed25519 private key (PEM path or bytes) that signs the manifest.
    ``triton_binaries``: a CUDA model's artifact carries Triton's compiled kernels
    (binaries.py; the engine is set up first, so that every kernel it runs is compiled).
    A tensor-parallel model is exported by every rank at once: each writes its shard's
    artifact under ``directory`` (tensor_parallel.py)."""
    if compiled.tp_group is not None:
        from fusegen.artifact.tensor_parallel import export_ranks

        return export_ranks(compiled, directory, _write, tokenizer=tokenizer, onnx=onnx, sign_key=sign_key,
                            # compiled binaries come from setting up an engine, which needs every rank
                            progress=progress and compiled.tp_group.rank == 0, triton_binaries=False)
    return _write(compiled, directory, tokenizer=tokenizer, onnx=onnx, sign_key=sign_key, progress=progress,
                  triton_binaries=triton_binaries)


def _write(compiled: CompiledModel, directory, *, tokenizer, onnx: bool, sign_key, progress: bool,
           triton_binaries: bool) -> Path:
    directory = check_destination(directory)
    if sign_key is not None:
        sign_key = read_key(sign_key, private=True)   # a bad key fails before the slow part
    gm = compiled.graph_module
    if onnx and any("val" not in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        raise ValueError("the ONNX view needs the graph's shapes, which a model loaded from an "
                         "artifact does not carry; export it from the model")
    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / GRAPH).write_text(json.dumps(graph_to_ir(gm), separators=(",", ":")))
        weights = _write_weights(graph_tensors(gm), staging, progress)
        kernels = _write_kernels(gm, staging)
        compiled_kernels = binaries.write(compiled, staging) if triton_binaries else None
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / TOKENIZER)
        if onnx:
            from fusegen.onnx_view import to_onnx

            to_onnx(gm, staging / "model.onnx", facts=compiled.facts, progress=progress)
        manifest = _manifest(compiled, weights, kernels, tokenizer is not None)
        manifest["triton_binaries"] = compiled_kernels
        manifest[tuning.FIELD] = tuning.write(compiled)   # after binaries.write has set the engine up
        manifest["files"] = _hash_tree(staging, progress)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if sign_key is not None:
            sign(staging, sign_key)
        _replace(directory, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _replace(directory: Path, staging: Path) -> None:
    """Move the finished artifact into place. An existing directory keeps its identity (it
    may be the working directory): only its contents, an older artifact, are replaced."""
    if not directory.exists():
        staging.rename(directory)
        return
    for old in directory.iterdir():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for new in staging.iterdir():
        new.rename(directory / new.name)


def check_destination(directory) -> Path:
    """``directory`` (absolute) if an artifact may be written there: new, empty, or holding a
    fusegen artifact (which is replaced). Anything else is refused before any work is done."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; choose an empty or new directory")
    if directory.exists() and any(directory.iterdir()) and not _holds_artifact(directory):
        raise FileExistsError(f"{directory} is not empty and holds no fusegen artifact; "
                              f"choose an empty or new directory")
    return directory


def _holds_artifact(directory: Path) -> bool:
    try:
        return json.loads((directory / MANIFEST).read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, progress: bool) -> dict:
    """Shards of at most ~SHARD_BYTES. A tensor that is another one (the same storage, offset,
    shape and strides) is stored once and recorded as an alias."""
    seen: dict[tuple, str] = {}
    aliases, unique = {}, {}
    for name, tensor in tensors.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in unique.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    (directory / "weights").mkdir()
    index = {}
    total = sum(t.numel() * t.element_size() for t in unique.values())
    with Bar(total, "writing weights", progress) as bar:
        for i, shard in enumerate(shards):
            rel = f"weights/{i:05d}.safetensors"
            # safetensors refuses two entries over one storage: each gets its own CPU copy.
            shard = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in shard.items()}
            save_file(shard, directory / rel, metadata={"format": FORMAT})
            index.update({name: rel for name in shard})
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    return {"tensors": index, "aliases": aliases, "bytes": total}


def _write_kernels(gm, directory: Path) -> list[dict]:
    records = []
    for name, module in gm.named_children():
        if isinstance(module, FusedGroup) and module.source is not None:
            rel = f"kernels/{name}.py"
            (directory / "kernels").mkdir(exist_ok=True)
            (directory / rel).write_text(module.source)
            records.append({"group": name, "schedule": module.schedule, "file": rel,
                            "source_hash": source_key(module.source), "ops": module.extra_repr()})
    return records


def _manifest(compiled: CompiledModel, weights: dict, kernels: list[dict], has_tokenizer: bool) -> dict:
    import triton

    facts = {k: v for k, v in compiled.facts.items() if k not in ("kernels", "hf_config")}
    if isinstance(facts.get("kv"), KVGeometry):
        facts["kv"] = facts["kv"].to_dict()
    report = compiled.report
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"fusegen": fusegen.__version__, "torch": torch.__version__, "triton": triton.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"class": report.model_class, "config": compiled.facts.get("hf_config")},
        "compile_config": report.config.to_string(),
        "device": str(compiled.device),
        "dtype": str(compiled.facts["dtype"]).removeprefix("torch."),
        "kind": compiled.kind,
        "passes": [{"name": r.name, "changed": r.changed, "seconds": round(r.seconds, 4),
                    "counters": dict(r.stats), "nodes": r.total_nodes, "nodes_made": r.nodes_made,
                    "node_counts": dict(r.node_counts)} for r in report.records],
        "kernels": kernels,
        "weights": weights,
        "tokenizer": TOKENIZER if has_tokenizer else None,
        "facts": value_to_json(facts),
    }


def _hash_tree(directory: Path, progress: bool) -> dict:
    """Size and chunk digests of every file under ``directory``, chunks hashed in parallel."""
    sizes = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file()}
    jobs = [(rel, i) for rel, size in sizes.items() for i in range(chunk_count(size))]
    with Bar(sum(sizes.values()), "hashing", progress) as bar, \
            ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        digests: dict[str, list[str]] = {rel: [] for rel in sizes}
        for (rel, _), (digest, nbytes) in zip(jobs, pool.map(lambda j: hash_chunk(directory / j[0], j[1]), jobs)):
            digests[rel].append(digest)
            bar.update(nbytes)
    return {rel: {"bytes": sizes[rel], "sha256": digests[rel]} for rel in sizes}
