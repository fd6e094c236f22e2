"""``fusegen.load``: an artifact back to a CompiledModel, checked before it is used."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import torch

from fusegen.artifact import binaries, tuning
from fusegen.artifact.format import GRAPH, MANIFEST, inside
from fusegen.artifact.shapes import add_shape_values
from fusegen.artifact.sign import check_signature
from fusegen.artifact.tensor_parallel import adopt, is_sharded, rank_directory
from fusegen.artifact.verify import read_json, read_manifest, read_verified, verify_files
from fusegen.artifact.weights import read_weights
from fusegen.codegen import cache
from fusegen.codegen.lower import group_source
from fusegen.codegen.pointwise import source_key
from fusegen.compiler import CompiledModel, CompileReport
from fusegen.config import CompileConfig
from fusegen.errors import ArtifactError, ArtifactFormatError, ArtifactMissingError, ArtifactTamperedError
from fusegen.fused_group import KERNELS_ENV, FusedGroup
from fusegen.kv import KVGeometry
from fusegen.ir import SHAPE, ir_to_graph_module, value_from_json
from fusegen.passes.dump import PassRecord


def load(directory, device: str | torch.device | None = None, *, trusted_keys=None,
         progress: bool = False, triton_binaries: bool = True, runtime: str | None = None) -> CompiledModel:
    """Load an artifact written by ``export``. ``device`` defaults to the one it was compiled
    for; another one (e.g. ``"cpu"``) moves weights and the graph's device arguments there.
    ``trusted_keys`` (Ed25519 public keys: PEM paths or bytes) makes a valid signature by one
    of them a condition (see ``sign.py``). ``triton_binaries``: put the artifact's compiled
    kernels where Triton finds them, on a GPU and Triton like the exporter's (binaries.py;
    what was done is kept as ``triton_binaries`` on the result). ``runtime``: engine fields
    of the compile config to change (``"lazy_cuda_graphs=1,max_num_seqs=8"``; the fields of
    ``config.RUNTIME_FIELDS``). Steps and their seconds are kept as ``load_seconds``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactMissingError(directory, "no such artifact directory")
    clock = _Clock()
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactMissingError(MANIFEST, "missing (not a fusegen artifact?)")
    data = path.read_bytes()
    if is_sharded(_json_or_none(data)):   # a tensor-parallel model: this rank's artifact
        return load(rank_directory(directory, json.loads(data), device), device, trusted_keys=trusted_keys,
                    progress=progress, triton_binaries=triton_binaries, runtime=runtime)
    if trusted_keys is not None:
        check_signature(directory, data, trusted_keys)   # on the very bytes parsed next
    manifest = read_manifest(directory, data)
    target = _target_device(manifest, device)
    files, weights = manifest["files"], manifest["weights"]
    streamed = target.type == "cuda"   # shards hashed as they are read (weights.py)
    read_now = set() if streamed else set(weights["tensors"].values())
    if manifest.get("tokenizer"):
        read_now |= {rel for rel in files if rel.startswith(manifest["tokenizer"] + "/")}
        _check_tokenizer_folder(directory, manifest["tokenizer"], files)
    verify_files(directory, files, hashed=read_now, progress=progress)  # graph, kernels: as read
    clock.lap("verify")
    installed = binaries.install(directory, manifest, target, triton_binaries)   # before any kernel compiles
    tuned = tuning.install(manifest, target)   # before an engine measures its kernels
    clock.lap("binaries")
    tensors = read_weights(directory, weights, files, target, progress, streamed)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    clock.lap("weights")
    graph_ir = read_json(directory, GRAPH, read_verified(directory, GRAPH, files))
    moved = target if target != torch.device(manifest["device"]) else None
    gm = ir_to_graph_module(graph_ir, tensors, moved)
    if manifest.get("kind") != _graph_kind(gm):
        raise ArtifactFormatError(MANIFEST, f"kind {manifest.get('kind')!r}, but the graph is {_graph_kind(gm)}")
    clock.lap("graph")
    add_shape_values(gm, target, GRAPH)   # before kernels attach: FusedGroups propagate by reference
    clock.lap("shapes")
    kernels = _load_kernels(directory, gm, manifest["kernels"], files, _kernels_launch(target))
    clock.lap("kernels")
    compiled = _compiled_model(manifest, gm, target, kernels, runtime)
    if compiled.config.tp > 1:
        adopt(compiled, target)
    if manifest.get("tokenizer"):
        # Read now, right after its files were verified, not at first use.
        compiled.tokenizer_path = inside(directory, manifest["tokenizer"])
        _ = compiled.tokenizer
    clock.lap("model")
    compiled.load_seconds = clock.laps
    compiled.triton_binaries = installed
    compiled.tuning = tuned
    return compiled


def _json_or_none(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None   # read_manifest names what is wrong with it


def _kv_geometry(data) -> KVGeometry:
    try:
        return KVGeometry.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ArtifactFormatError(MANIFEST, f"facts.kv is not a KV geometry ({exc})") from None


# Facts the runtime reads, with the check each must pass.
def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _ids(v) -> bool:
    items = v if isinstance(v, list) else [v]
    return all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)


FACT_CHECKS = {
    "vocab_size": _positive, "num_hidden_layers": _positive, "num_attention_heads": _positive,
    "num_key_value_heads": _positive, "hidden_size": _positive, "max_position_embeddings": _positive,
    "n_positions": _positive, "eos_token_id": _ids, "model_class": lambda v: isinstance(v, str),
    "dtype": lambda v: isinstance(v, torch.dtype), "positions": lambda v: v in ("arange", "mask"),
    "generation": lambda v: isinstance(v, dict),
}


def _graph_kind(gm) -> str:
    names = {n.target for n in gm.graph.nodes if n.op == "placeholder"}
    return "paged" if "kv_pool" in names else "dense" if "kv_cache" in names else "stateless"


def _check_kv_against_graph(gm, kv) -> None:
    """The KV geometry in the facts must be the one the graph's cache input was traced with."""
    cache = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target in ("kv_pool", "kv_cache")), None)
    if cache is None:
        return
    if not isinstance(kv, KVGeometry):
        raise ArtifactFormatError(MANIFEST, f"facts.kv is missing, but the graph reads {cache.target}")
    record = cache.meta.get("fusegen_shape") or {}
    want = kv.pool_shape("?") if cache.target == "kv_pool" else kv.dense_shape("?", "?")
    dims = record.get("shape")
    same = isinstance(dims, list) and len(dims) == len(want) and all(
        w == "?" or d == w for d, w in zip(dims, want) if isinstance(d, int) or w != "?")
    if not same or record.get("dtype") != str(kv.dtype).removeprefix("torch."):
        raise ArtifactFormatError(MANIFEST, f"facts.kv {kv} does not match the graph's {cache.target} "
                                  f"({record.get('dtype')} {dims})")


def _check_facts(facts: dict, config: CompileConfig, kind) -> None:
    for key, ok in FACT_CHECKS.items():
        if key in facts and not ok(facts[key]):
            raise ArtifactFormatError(MANIFEST, f"facts.{key} = {facts[key]!r} is out of range or of the wrong type")
    kv = facts.get("kv")
    if kind == "paged" and (not isinstance(kv, KVGeometry) or kv.block_size != config.block_size):
        raise ArtifactFormatError(MANIFEST, f"facts.kv.block_size {getattr(kv, 'block_size', None)} differs "
                                  f"from the compile config's block_size {config.block_size}")


def _check_tokenizer_folder(directory: Path, folder: str, files: dict) -> None:
    """Every file under the tokenizer folder must be listed (and so verified): an unlisted
    file, or a link, is refused rather than read."""
    inside(directory, folder)              # the folder itself stays inside the artifact
    for path in sorted((directory / folder).rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise ArtifactTamperedError(rel, "is a symbolic link; a tokenizer folder holds plain files only")
        if path.is_file() and rel not in files:
            raise ArtifactTamperedError(rel, "is not listed in the manifest; the tokenizer is not loaded")


def _compiled_model(manifest: dict, gm, target: torch.device, kernels: list[dict], runtime: str | None) -> CompiledModel:
    facts = value_from_json(manifest["facts"], MANIFEST)
    if "kv" in facts:
        facts["kv"] = _kv_geometry(facts["kv"])
    facts.update(device=target, kernels=kernels, hf_config=manifest["model"].get("config"))
    config = CompileConfig.from_string(manifest["compile_config"])
    _check_facts(facts, config, manifest.get("kind"))
    if runtime:
        config = config.with_runtime(runtime)
    _check_kv_against_graph(gm, facts.get("kv"))
    records = [PassRecord(p["name"], p["changed"], p["seconds"], p["counters"],
                          Counter(p.get("node_counts", {})), p["nodes_made"]) for p in manifest["passes"]]
    report = CompileReport(manifest["model"]["class"], config, records)
    if target.type == "cuda":
        from fusegen.codegen import attention

        attention.register()
    return CompiledModel(gm, report, facts)


def _load_kernels(directory: Path, gm, kernels: list, files: dict, launch: bool) -> list[dict]:
    """Attach each group's kernel. No shipped code is trusted: every kernel is generated
    again from its group's graph (already verified and resolved against the allow-lists)
    and must equal the shipped bytes and the manifest's ``source_hash``. The source is
    imported only when kernels will launch (``launch``: a CUDA target, or FUSEGEN_KERNELS=1)."""
    records = []
    for entry in kernels:
        group, rel = entry["group"], entry["file"]
        module = getattr(gm, group, None)
        if not isinstance(module, FusedGroup):
            raise ArtifactFormatError(MANIFEST, f"kernel entry names {group!r}, which is no fused group")
        shipped = read_verified(directory, rel, files)
        source = _regenerate(module, group, rel)
        if shipped != source.encode():
            raise ArtifactTamperedError(rel, f"differs from the kernel that group {group!r} of the graph "
                                        f"generates; it is not run")
        if entry.get("source_hash") != source_key(source):
            raise ArtifactTamperedError(MANIFEST, f"kernel {group!r}: source_hash {entry.get('source_hash')!r} "
                                        f"is not the hash of its source")
        module.source = source
        if launch:
            module.kernel = cache.load(source).launch
        records.append({k: entry[k] for k in ("group", "schedule", "source_hash", "ops") if k in entry})
    return records


def _regenerate(module: FusedGroup, group: str, rel: str) -> str:
    """The group's kernel source as codegen writes it, from the loaded group graph (with
    the shape values add_shape_values gave it; a graph loaded without them gets meta
    tensors of the recorded dtypes meanwhile, which is all codegen reads of them)."""
    bare = [n for n in module.reference.graph.nodes if "val" not in n.meta]
    try:
        for node in bare:
            shape = node.meta.get(SHAPE)
            if isinstance(shape, dict) and isinstance(shape.get("dtype"), str):
                node.meta["val"] = torch.empty((), dtype=getattr(torch, shape["dtype"]), device="meta")
        return group_source(module)
    except Exception as e:  # a group graph codegen cannot take: the IR was edited
        raise ArtifactFormatError(rel, f"group {group!r} does not generate a kernel ({type(e).__name__}: {e})") from None
    finally:
        for node in bare:
            node.meta.pop("val", None)


def _kernels_launch(target: torch.device) -> bool:
    return target.type == "cuda" or os.environ.get(KERNELS_ENV) == "1"


def _target_device(manifest: dict, device) -> torch.device:
    recorded = torch.device(manifest["device"])
    target = torch.device(device) if device is not None else recorded
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(MANIFEST, f"the artifact is for {recorded} and this machine has no CUDA "
                            f"device; load it with device='cpu'")
    return target


class _Clock:
    """Seconds spent in each step of ``load``."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
