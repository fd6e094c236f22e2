"""Reading an artifact's manifest, and checking files against it, before anything is used.

The manifest is checked whole when it is read, so a malformed one fails here with the field
named, not later as a stray KeyError. Every file it lists must be present and of its recorded
size; the files loading reads must hash to the recorded chunk digests.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import fusegen
from fusegen.artifact import tuning
from fusegen.artifact.format import (BINARIES, FORMAT, FORMAT_VERSION, GRAPH, HASH_CHUNK, MANIFEST, chunk_count,
                                     chunk_digests, hash_chunk, inside)
from fusegen.codegen.triton_cache import SAFE_NAME, TargetKey
from fusegen.config import CompileConfig
from fusegen.errors import (ArtifactFormatError, ArtifactMissingError, ArtifactTamperedError,
                            ArtifactTruncatedError, ArtifactVersionError, FusegenError)
from fusegen.progress import Bar


def read_json(directory: Path, rel: str, data: bytes | None = None) -> dict:
    """The JSON object in ``rel`` (or in ``data``, its already verified bytes)."""
    if data is None:
        path = directory / rel
        if not path.is_file():
            hint = " (not a fusegen artifact?)" if rel == MANIFEST else ""
            raise ArtifactMissingError(rel, "missing" + hint)
        data = path.read_bytes()
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactFormatError(rel, f"not valid JSON ({e}); the file is damaged or truncated") from None
    if not isinstance(value, dict):
        raise ArtifactFormatError(rel, "expected a JSON object")
    return value


def read_manifest(directory: Path, data: bytes | None = None) -> dict:
    """The manifest (from ``data``, its bytes, when given), its format and versions checked
    against this fusegen and torch, and every field loading uses checked for type."""
    manifest = read_json(directory, MANIFEST, data)
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
    _check_layout(manifest)
    return manifest


def _check_layout(m: dict) -> None:
    files = _field(m, "files", dict)
    for rel, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digests = entry.get("sha256") if isinstance(entry, dict) else None
        _expect(isinstance(size, int) and size >= 0 and isinstance(digests, list)
                and all(isinstance(d, str) for d in digests) and len(digests) == chunk_count(size),
                f"malformed entry for {rel!r} in 'files'")
    _expect(GRAPH in files, f"{GRAPH} is not listed in 'files'")
    for p in _field(m, "passes", list):
        _expect(isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("changed"), bool)
                and isinstance(p.get("seconds"), (int, float)) and isinstance(p.get("counters"), dict)
                and isinstance(p.get("nodes_made"), int) and isinstance(p.get("node_counts", {}), dict),
                f"malformed pass record {p!r}")
    for k in _field(m, "kernels", list):
        _expect(isinstance(k, dict) and isinstance(k.get("group"), str)
                and isinstance(k.get("file"), str) and k["file"] in files,
                f"kernel entry {k!r} names no group or no listed file")
    model = _field(m, "model", dict)
    _expect(isinstance(model.get("class"), str) and isinstance(model.get("config"), (dict, type(None))),
            "malformed field 'model'")
    weights = _field(m, "weights", dict)
    tensors, aliases = weights.get("tensors"), weights.get("aliases", {})
    _expect(isinstance(tensors, dict) and all(isinstance(v, str) and v in files for v in tensors.values())
            and isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())
            and isinstance(weights.get("bytes", 0), int), "malformed weight index (or a shard not in 'files')")
    tokenizer = m.get("tokenizer")
    _expect(tokenizer is None or (isinstance(tokenizer, str)
                                  and any(rel.startswith(tokenizer + "/") for rel in files)),
            f"tokenizer {tokenizer!r} is not a listed folder")
    _field(m, "facts", dict)
    _check_binaries(m.get("triton_binaries"), files)
    tuning.check(m.get(tuning.FIELD))
    try:
        CompileConfig.from_string(_field(m, "compile_config", str))
        torch.device(_field(m, "device", str))
    except (FusegenError, RuntimeError, ValueError) as e:
        raise ArtifactFormatError(MANIFEST, f"malformed compile_config or device ({e})") from None


BINARY_FIELDS = ("dir", "name", "ext", "function", "source_hash", "metadata", "binary")


def _check_binaries(record, files: dict) -> None:
    """``triton_binaries`` (binaries.py): absent, or a target and entries whose two files
    are listed under the names their fields make."""
    if record is None:
        return
    _expect(isinstance(record, dict) and isinstance(record.get("entries"), list), "malformed field 'triton_binaries'")
    try:
        TargetKey.from_dict(record.get("target"))
    except ValueError as exc:
        raise ArtifactFormatError(MANIFEST, f"triton_binaries: {exc}") from None
    for e in record["entries"]:
        _expect(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in BINARY_FIELDS)
                and all(SAFE_NAME.match(e[k]) for k in ("dir", "name", "ext"))
                and e["metadata"] == f"{BINARIES}/{e['dir']}/{e['name']}.json"
                and e["binary"] == f"{BINARIES}/{e['dir']}/{e['name']}.{e['ext']}"
                and e["metadata"] in files and e["binary"] in files,
                f"triton_binaries entry {e!r} is malformed or names unlisted files")


def verify_files(directory: Path, files: dict, hashed, progress: bool = False) -> None:
    """Every listed file present and of its recorded size; those in ``hashed`` also hashing
    to the recorded digests (in parallel; the first mismatch stops the rest)."""
    jobs = []
    for rel, entry in files.items():
        path = inside(directory, rel)
        if not path.is_file():
            raise ArtifactMissingError(rel, "listed in the manifest but missing")
        size, actual = entry["bytes"], path.stat().st_size
        if actual < size:
            raise ArtifactTruncatedError(rel, f"truncated: {actual} bytes, the manifest records {size}")
        if actual > size:
            raise ArtifactTamperedError(rel, f"{actual} bytes, the manifest records {size}")
        if rel in hashed:
            jobs += [(rel, path, i, digest) for i, digest in enumerate(entry["sha256"])]
    total = sum(files[rel]["bytes"] for rel in {j[0] for j in jobs})
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))
    try:
        with Bar(total, "verifying", progress) as bar:
            futures = [(job, pool.submit(hash_chunk, job[1], job[2])) for job in jobs]
            for (rel, _, index, digest), future in futures:
                got, nbytes = future.result()
                bar.update(nbytes)
                if got != digest:
                    raise ArtifactTamperedError(rel, f"content differs from the manifest (SHA-256 of chunk "
                                                f"{index}, from byte {index * HASH_CHUNK})")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_verified(directory: Path, rel: str, files: dict) -> bytes:
    """The bytes of ``rel``, checked against the manifest: what is returned is what was hashed."""
    path = inside(directory, rel)
    if not path.is_file():
        raise ArtifactMissingError(rel, "listed in the manifest but missing")
    data = path.read_bytes()
    if len(data) < files[rel]["bytes"]:
        raise ArtifactTruncatedError(rel, f"truncated: {len(data)} bytes, the manifest records "
                                     f"{files[rel]['bytes']}")
    if chunk_digests(data) != files[rel]["sha256"]:
        raise ArtifactTamperedError(rel, "content differs from the manifest")
    return data


def _field(mapping: dict, key: str, kind):
    value = mapping.get(key)
    if not isinstance(value, kind):
        raise ArtifactFormatError(MANIFEST, f"missing or malformed field {key!r}")
    return value


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise ArtifactFormatError(MANIFEST, problem)


def _release(version: str) -> tuple:
    """(major, minor) of a version string: artifacts move between patch releases."""
    return tuple(version.split("+")[0].split(".")[:2])
