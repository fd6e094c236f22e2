"""Triton's compiled binaries shipped in an artifact, so that a model loaded onto the GPU and
Triton it was exported with runs without compiling a kernel.

    DIR/triton/<dir>/<name>.json     Triton's metadata of one compiled specialization
    DIR/triton/<dir>/<name>.cubin    its binary

    manifest "triton_binaries": {"target": {"triton": "3.6.0", "gpu": "NVIDIA H200",
                                            "capability": [9, 0]},
                                 "entries": [{"dir", "name", "ext", "function",
                                              "source_hash", "metadata", "binary"}, ...]}

An entry is keyed three ways: by Triton's own cache key (``dir``, a hash of the kernel's
source, specialization, options, Triton build and GPU target: Triton finds the entry only
for the very compile that made it), by the target above, and by the kernel's source hash
(``source_hash``: Triton's hash of the function's source, compared with the function this
fusegen defines; a generated kernel's module is named by the hash of its source).

Exported from a CUDA model: what fusegen's kernels compiled in the exporting process (the
engine is set up first, so its GEMM measurements and CUDA graphs compile theirs). Loaded
onto a CUDA device of the same target: the entries are read, checked against the manifest
(a changed byte raises ``ArtifactTamperedError``; nothing of it reaches Triton's cache) and
written into Triton's cache directory (codegen/triton_cache.py) before any kernel runs.
Otherwise they are left unread and the reason is logged: kernels compile from source.

The binaries are machine code that loading cannot regenerate and compare, unlike the
kernel sources: they are trusted as far as the manifest is (its digests, and with
``trusted_keys`` its signature). ``fusegen.load(..., triton_binaries=False)`` leaves them
unused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusegen.artifact.format import BINARIES
from fusegen.artifact.verify import read_verified
from fusegen.codegen import triton_cache

log = logging.getLogger("fusegen.artifact")


@dataclass(frozen=True)
class BinaryReport:
    """What loading did with an artifact's binaries."""
    shipped: int = 0     # entries in the artifact
    seeded: int = 0      # written into Triton's cache
    present: int = 0     # Triton's cache already held them
    ignored: int = 0     # left unused
    reasons: tuple[str, ...] = field(default_factory=tuple)   # why, per set or entry

    @property
    def used(self) -> int:
        return self.seeded + self.present


def write(compiled, directory: Path) -> dict | None:
    """Write the binaries of ``compiled``'s kernels under ``directory``; the manifest record
    (None off CUDA, or when no kernel compiled)."""
    target = triton_cache.TargetKey.of(compiled.device)
    if target is None:
        return None
    if compiled.kind == "paged":
        _ = compiled._engine   # its set-up compiles the kernels the engine's steps run
    binaries = triton_cache.compiled_binaries(compiled.device)
    if not binaries:
        return None
    entries = []
    for b in binaries:
        folder = directory / BINARIES / b.dir
        folder.mkdir(parents=True, exist_ok=True)
        rels = {}
        for file_name, data in b.files.items():
            (folder / file_name).write_bytes(data)
            rels[file_name] = f"{BINARIES}/{b.dir}/{file_name}"
        entries.append({"dir": b.dir, "name": b.name, "ext": b.ext, "function": b.function,
                        "source_hash": b.source_hash, "metadata": rels[f"{b.name}.json"],
                        "binary": rels[f"{b.name}.{b.ext}"]})
    return {"target": target.to_dict(), "entries": entries}


def install(directory: Path, manifest: dict, target: torch.device, enabled: bool = True) -> BinaryReport:
    """Put the artifact's binaries where Triton's compiler finds them, when they are for
    ``target``; every byte written was first checked against the manifest."""
    record = manifest.get("triton_binaries")
    if not record:
        return BinaryReport()
    entries = record["entries"]
    here = triton_cache.TargetKey.of(target)
    reason = ("turned off (triton_binaries=False)" if not enabled
              else f"no binaries run on {target}" if here is None
              else triton_cache.TargetKey.from_dict(record["target"]).mismatch(here)
              or triton_cache.file_cache_reason())
    if reason is not None:
        level = logging.WARNING if here is not None and enabled else logging.INFO   # a CUDA load slowed
        log.log(level, "the artifact's %d Triton binaries are not used: %s; kernels compile from source", len(entries), reason)
        return BinaryReport(len(entries), ignored=len(entries), reasons=(reason,))
    files = manifest["files"]
    binaries, reasons = [], []
    for e in entries:
        why = _stale(e)
        if why is not None:
            reasons.append(why)
            continue
        binaries.append(triton_cache.Binary(e["dir"], e["name"], e["ext"], e["function"], e["source_hash"],
                                            read_verified(directory, e["metadata"], files),
                                            read_verified(directory, e["binary"], files)))
    for why in reasons:
        log.warning("Triton binary not used: %s", why)
    seeded = triton_cache.seed(binaries)
    return BinaryReport(len(entries), seeded.written, seeded.present, len(reasons), tuple(reasons))


def _stale(entry: dict) -> str | None:
    """Why an entry's kernel is not the one this fusegen defines (None: it is, or it is a
    generated kernel, whose module name is the hash of its source)."""
    if entry["function"].startswith(triton_cache.GENERATED):
        return None
    fn = triton_cache.resolve(entry["function"])
    if fn is None:
        return f"{entry['function']} is no kernel of this fusegen"
    if fn.cache_key != entry["source_hash"]:
        return f"{entry['function']} changed since the export (its source hash differs)"
    return None
