"""Artifacts: a compiled model written to a directory, and loaded back without its Python.

    DIR/manifest.json        format and versions, model and compile config, passes with their
                             counters, kernels, weight index, and every other file's size and
                             SHA-256 (per 64 MiB chunk)
    DIR/graph.json           the optimized graph in fusegen's JSON IR (fusegen/ir.py)
    DIR/weights/NNNNN.safetensors   the tensors the graph reads (after any GQA conversion)
    DIR/kernels/<group>.py   the generated Triton source of every fused group
    DIR/tokenizer/           the tokenizer files, when one was given
    DIR/model.onnx(.data)    with ``onnx=True``: the graph for viewers (fusegen/onnx_view/)

Loading reads JSON and safetensors only, never pickle. Before anything is used every file is
checked against the manifest: a missing file, a short one, or one whose hash differs raises
an ``ArtifactError`` subclass naming the file. A kernel source is executed only from the
exact bytes that were hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fusegen
from fusegen.codegen import cache
from fusegen.codegen.pointwise import source_key
from fusegen.compiler import CompiledModel, CompileReport
from fusegen.config import CompileConfig
from fusegen.errors import (ArtifactError, ArtifactFormatError, ArtifactMissingError,
                            ArtifactTamperedError, ArtifactTruncatedError, ArtifactVersionError)
from fusegen.fused_group import FusedGroup
from fusegen.ir import graph_tensors, graph_to_ir, ir_to_graph_module, value_from_json, value_to_json
from fusegen.passes.dump import PassRecord
from fusegen.progress import Bar

FORMAT = "fusegen-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.json"
SHARD_BYTES = 1 << 30   # weights are split into files of about this size
HASH_CHUNK = 64 << 20   # files are hashed in chunks of this size, in parallel


# --- export -----------------------------------------------------------------------------------

def export(compiled: CompiledModel, directory, *, tokenizer=None, onnx: bool = False,
           progress: bool = False) -> Path:
    """Write ``compiled`` to ``directory`` (created; an older artifact there is replaced, any
    other non-empty directory is refused). ``tokenizer``: a HF tokenizer to ship along."""
    directory = check_destination(directory)
    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        gm = compiled.graph_module
        (staging / GRAPH).write_text(json.dumps(graph_to_ir(gm), separators=(",", ":")))
        weights = _write_weights(graph_tensors(gm), staging, progress)
        kernels = _write_kernels(gm, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / "tokenizer")
        if onnx:
            from fusegen.onnx_view import to_onnx

            to_onnx(gm, staging / "model.onnx", facts=compiled.facts, progress=progress)
        manifest = _manifest(compiled, weights, kernels, tokenizer is not None)
        manifest["files"] = _hash_tree(staging, progress)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def check_destination(directory) -> Path:
    """``directory`` as a Path if an artifact may be written there: new, empty, or an older
    artifact (which is replaced); anything else is refused before any work is done."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; choose an empty or new directory")
    if directory.exists() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
        raise FileExistsError(f"{directory} is not empty and holds no fusegen artifact; "
                              f"choose an empty or new directory")
    return directory


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, progress: bool) -> dict:
    """Shards of at most ~SHARD_BYTES; a tensor that is another one (tied embeddings) is
    stored once and recorded as an alias."""
    seen: dict[tuple, str] = {}
    aliases, unique = {}, {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
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
            path = f"weights/{i:05d}.safetensors"
            # One storage must not back two entries of a file: give views their own copy.
            storages = set()
            for name, tensor in list(shard.items()):
                ptr = tensor.untyped_storage().data_ptr()
                shard[name] = tensor.detach().to("cpu").contiguous() if ptr not in storages else \
                    tensor.detach().to("cpu").clone()
                storages.add(ptr)
            save_file(shard, directory / path, metadata={"format": FORMAT})
            index.update({name: path for name in shard})
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    return {"tensors": index, "aliases": aliases, "bytes": total}


def _write_kernels(gm, directory: Path) -> list[dict]:
    records = []
    for name, module in gm.named_children():
        if isinstance(module, FusedGroup) and module.source is not None:
            path = f"kernels/{name}.py"
            (directory / "kernels").mkdir(exist_ok=True)
            (directory / path).write_text(module.source)
            records.append({"group": name, "schedule": module.schedule, "file": path,
                            "source_hash": source_key(module.source), "ops": module.extra_repr()})
    return records


def _manifest(compiled: CompiledModel, weights: dict, kernels: list[dict], has_tokenizer: bool) -> dict:
    import triton

    facts = {k: v for k, v in compiled.facts.items() if k not in ("kernels", "hf_config")}
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
        "tokenizer": "tokenizer" if has_tokenizer else None,
        "facts": value_to_json(facts),
    }


# --- load -------------------------------------------------------------------------------------

def load(directory, device: str | torch.device | None = None, *, progress: bool = False) -> CompiledModel:
    """Load an artifact written by ``export``. ``device`` defaults to the one it was compiled
    for; another one (e.g. ``"cpu"``) moves weights and the graph's device arguments there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactMissingError(directory, "no such artifact directory")
    clock = _Clock()
    manifest = read_manifest(directory)
    files = manifest["files"]
    verify_files(directory, files, skip=[k["file"] for k in manifest["kernels"]], progress=progress)
    clock.lap("verify")
    target = _target_device(manifest, device)
    tensors = _read_weights(directory, _field(manifest, "weights", dict), target, progress)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    clock.lap("weights")
    graph_ir = _read_json(directory, GRAPH)
    gm = ir_to_graph_module(graph_ir, tensors, target if str(target) != manifest["device"] else None)
    clock.lap("graph")
    kernels = _load_kernels(directory, gm, manifest["kernels"], files)
    clock.lap("kernels")
    facts = value_from_json(manifest["facts"], MANIFEST)
    facts.update(device=target, kernels=kernels, hf_config=manifest["model"].get("config"))
    config = CompileConfig.from_string(manifest["compile_config"])
    records = [PassRecord(p["name"], p["changed"], p["seconds"], p["counters"],
                          _counter(p.get("node_counts", {})), p["nodes_made"]) for p in manifest["passes"]]
    compiled = CompiledModel(gm, CompileReport(manifest["model"]["class"], config, records), facts)
    if manifest.get("tokenizer"):
        compiled.tokenizer_path = directory / manifest["tokenizer"]
    if target.type == "cuda":
        from fusegen.codegen import attention

        attention.register()
    clock.lap("model")
    compiled.load_seconds = clock.laps
    return compiled


class _Clock:
    """Seconds spent in each step of ``load``, kept on the loaded model as ``load_seconds``."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now


def read_manifest(directory: Path) -> dict:
    """The manifest, with its format and versions checked against this fusegen and torch."""
    manifest = _read_json(directory, MANIFEST)
    if manifest.get("format") != FORMAT:
        raise ArtifactFormatError(MANIFEST, f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactVersionError(MANIFEST, f"artifact format version {manifest.get('format_version')!r}; "
                                   f"this fusegen reads version {FORMAT_VERSION}")
    versions = _field(manifest, "versions", dict)
    for package, ours in (("fusegen", fusegen.__version__), ("torch", torch.__version__)):
        theirs = versions.get(package)
        if not isinstance(theirs, str) or _release(theirs) != _release(ours):
            raise ArtifactVersionError(MANIFEST, f"written with {package} {theirs}, this is {package} "
                                       f"{ours}; export the model again with this version")
    for key, kind in (("files", dict), ("kernels", list), ("passes", list), ("model", dict),
                      ("compile_config", str), ("device", str), ("facts", dict)):
        _field(manifest, key, kind)
    return manifest


def verify_files(directory: Path, files: dict, skip=(), progress: bool = False) -> None:
    """Check every file the manifest lists: present, of the recorded size, hashing to the
    recorded chunk digests. Files in ``skip`` are checked by the caller when it reads them."""
    jobs = []
    for rel, entry in files.items():
        path = _inside(directory, rel)
        if not path.is_file():
            raise ArtifactMissingError(rel, "listed in the manifest but missing")
        size, recorded = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or not isinstance(recorded, list):
            raise ArtifactFormatError(MANIFEST, f"malformed entry for {rel}")
        actual = path.stat().st_size
        if actual < size:
            raise ArtifactTruncatedError(rel, f"truncated: {actual} bytes, the manifest records {size}")
        if actual > size:
            raise ArtifactTamperedError(rel, f"{actual} bytes, the manifest records {size}")
        if rel not in skip:
            jobs += [(rel, path, i, digest) for i, digest in enumerate(recorded)]
    total = sum(files[rel]["bytes"] for rel in {j[0] for j in jobs})
    with Bar(total, "verifying", progress) as bar, ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for rel, chunk, ok, nbytes in pool.map(_check_chunk, jobs):
            bar.update(nbytes)
            if not ok:
                raise ArtifactTamperedError(rel, f"content differs from the manifest (SHA-256 of "
                                            f"bytes {chunk * HASH_CHUNK}..{chunk * HASH_CHUNK + nbytes})")


def _check_chunk(job):
    rel, path, index, digest = job
    with open(path, "rb") as f:
        f.seek(index * HASH_CHUNK)
        data = f.read(HASH_CHUNK)
    return rel, index, hashlib.sha256(data).hexdigest() == digest, len(data)


def _hash_tree(directory: Path, progress: bool) -> dict:
    paths = sorted(p for p in directory.rglob("*") if p.is_file())
    with Bar(sum(p.stat().st_size for p in paths), "hashing", progress) as bar:
        files = {}
        for path in paths:
            files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size,
                                                             "sha256": _chunk_digests(path.read_bytes())}
            bar.update(path.stat().st_size)
    return files


def _chunk_digests(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i:i + HASH_CHUNK]).hexdigest()
            for i in range(0, max(len(data), 1), HASH_CHUNK)]


def _read_json(directory: Path, rel: str):
    path = directory / rel
    if not path.is_file():
        raise ArtifactMissingError(rel, "missing" + (" (not a fusegen artifact?)" if rel == MANIFEST else ""))
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactFormatError(rel, f"not valid JSON ({e}); the file is damaged or truncated") from None
    if not isinstance(data, dict):
        raise ArtifactFormatError(rel, "expected a JSON object")
    return data


def _read_weights(directory: Path, weights: dict, device: torch.device, progress: bool) -> dict:
    index, aliases = weights.get("tensors"), weights.get("aliases", {})
    if not isinstance(index, dict) or not isinstance(aliases, dict):
        raise ArtifactFormatError(MANIFEST, "malformed weight index")
    tensors = {}
    by_file: dict[str, list[str]] = {}
    for name, rel in index.items():
        by_file.setdefault(rel, []).append(name)
    with Bar(weights.get("bytes", 0), "reading weights", progress) as bar:
        for rel, names in by_file.items():
            try:
                with safe_open(_inside(directory, rel), framework="pt", device=str(device)) as f:
                    missing = set(names) - set(f.keys())
                    if missing:
                        raise ArtifactFormatError(rel, f"lacks tensors {sorted(missing)[:3]}")
                    for name in names:
                        tensors[name] = f.get_tensor(name)
                        bar.update(tensors[name].numel() * tensors[name].element_size())
            except ArtifactError:
                raise
            except Exception as e:  # safetensors' own header/size errors
                raise ArtifactFormatError(rel, f"not a readable safetensors file ({e})") from None
    for name, canonical in aliases.items():
        if canonical not in tensors:
            raise ArtifactFormatError(MANIFEST, f"alias {name!r} of unknown tensor {canonical!r}")
        tensors[name] = tensors[canonical]
    return tensors


def _load_kernels(directory: Path, gm, kernels: list, files: dict) -> list[dict]:
    """Attach each group's kernel, executing its source only if those exact bytes hash to the
    manifest's record."""
    records = []
    for entry in kernels:
        group, rel = entry.get("group"), entry.get("file")
        module = getattr(gm, group, None) if isinstance(group, str) else None
        if not isinstance(module, FusedGroup) or rel not in files:
            raise ArtifactFormatError(MANIFEST, f"kernel entry {entry!r} names no fused group or file")
        data = _inside(directory, rel).read_bytes()
        if _chunk_digests(data) != files[rel]["sha256"]:
            raise ArtifactTamperedError(rel, "kernel source differs from the manifest; not executed")
        source = data.decode()
        module.source = source
        module.kernel = cache.load(source).launch
        records.append({k: entry[k] for k in ("group", "schedule", "source_hash", "ops") if k in entry})
    return records


def _target_device(manifest: dict, device) -> torch.device:
    recorded = torch.device(manifest["device"])
    target = torch.device(device) if device is not None else recorded
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(MANIFEST, f"the artifact is for {recorded} and this machine has no CUDA "
                            f"device; load it with device='cpu'")
    return target


def _inside(directory: Path, rel: str) -> Path:
    """``directory/rel``, refusing names that would leave the artifact directory."""
    if not isinstance(rel, str) or (directory / rel).resolve().parent == Path("/"):
        raise ArtifactFormatError(MANIFEST, f"file name {rel!r} points outside the artifact")
    path = (directory / rel).resolve()
    if directory.resolve() not in path.parents:
        raise ArtifactFormatError(MANIFEST, f"file name {rel!r} points outside the artifact")
    return path


def _field(mapping: dict, key: str, kind):
    value = mapping.get(key)
    if not isinstance(value, kind):
        raise ArtifactFormatError(MANIFEST, f"missing or malformed field {key!r}")
    return value


def _release(version: str) -> tuple:
    """(major, minor) of a version string: artifacts move between patch releases."""
    parts = version.split("+")[0].split(".")
    return tuple(parts[:2])


def _counter(counts: dict):
    from collections import Counter

    return Counter(counts)
