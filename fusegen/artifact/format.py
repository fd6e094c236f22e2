"""What an artifact directory holds, and the helpers every side of it shares."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fusegen.errors import ArtifactFormatError

FORMAT = "fusegen-artifact"
FORMAT_VERSION = 2   # 2: fused groups carry what regenerating their kernels needs
MANIFEST = "manifest.json"
GRAPH = "graph.json"
TOKENIZER = "tokenizer"
BINARIES = "triton"   # Triton's compiled binaries (binaries.py)
SHARD_BYTES = 1 << 30   # weights are split into files of about this size
HASH_CHUNK = 64 << 20   # files are hashed in chunks of this size, in parallel


def chunk_digests(data: bytes) -> list[str]:
    """SHA-256 of every HASH_CHUNK-sized piece of ``data`` (one digest for an empty file)."""
    return [hashlib.sha256(data[i:i + HASH_CHUNK]).hexdigest()
            for i in range(0, max(len(data), 1), HASH_CHUNK)]


def chunk_count(size: int) -> int:
    return max(1, -(-size // HASH_CHUNK))


def hash_chunk(path: Path, index: int) -> tuple[str, int]:
    """Digest and length of chunk ``index`` of ``path`` (hashlib releases the GIL: threads scale)."""
    with open(path, "rb") as f:
        f.seek(index * HASH_CHUNK)
        data = f.read(HASH_CHUNK)
    return hashlib.sha256(data).hexdigest(), len(data)


def inside(directory: Path, rel) -> Path:
    """``directory/rel`` with links resolved, refusing names that lead out of the artifact."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactFormatError(MANIFEST, f"malformed file name {rel!r}")
    root = directory.resolve()
    path = (root / rel).resolve()
    if root not in path.parents:
        raise ArtifactFormatError(MANIFEST, f"file name {rel!r} points outside the artifact")
    return path
