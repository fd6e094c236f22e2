"""Reading an artifact's weight shards: onto a GPU in parallel through pinned memory, hashed
as they are read; onto the CPU memory-mapped, after ``verify_files`` hashed them.

The streamed read works in the manifest's hash chunks (HASH_CHUNK bytes from the start of
each shard), the unit the digests are recorded in, so each chunk is hashed from the very
buffer its tensors are copied from:

    worker thread ×W     read chunk ──▶ pinned slot ──copy (side stream, async)──▶ tensors
                                           └──── SHA-256 (meanwhile) ──▶ == manifest digest?

W threads (hashlib and file reads release the GIL) take chunks from one list; a slot (a
pinned buffer, its stream and an event) is reused once its copies are done. A chunk whose
digest differs raises ``ArtifactTamperedError`` and nothing read is returned. Each shard's
safetensors header is read first to place the tensors, and must equal the bytes of chunk 0
that were hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fusegen.artifact.format import HASH_CHUNK, MANIFEST, chunk_count, inside
from fusegen.errors import ArtifactError, ArtifactFormatError, ArtifactTamperedError, ArtifactTruncatedError
from fusegen.progress import Bar

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_WORKERS = 16


def read_weights(directory: Path, weights: dict, files: dict, device: torch.device, progress: bool = False,
                 streamed: bool | None = None) -> dict:
    """Every tensor of the weight index (aliases resolved) on ``device``. ``streamed``
    (default: on CUDA) hashes while reading; otherwise the shards must be verified already."""
    by_file: dict[str, list[str]] = {}
    for name, rel in weights["tensors"].items():
        by_file.setdefault(rel, []).append(name)
    streamed = device.type == "cuda" if streamed is None else streamed
    with Bar(weights.get("bytes", 0), "reading weights", progress) as bar:
        read = _read_streamed if streamed else _read_mapped
        tensors = read(directory, by_file, files, device, bar)
    for name, canonical in weights.get("aliases", {}).items():
        if canonical not in tensors:
            raise ArtifactFormatError(MANIFEST, f"alias {name!r} of unknown tensor {canonical!r}")
        tensors[name] = tensors[canonical]
    return tensors


def _read_mapped(directory: Path, by_file: dict, files: dict, device: torch.device, bar: Bar) -> dict:
    tensors = {}
    for rel, names in by_file.items():
        try:
            with safe_open(inside(directory, rel), framework="pt", device=str(device)) as f:
                missing = set(names) - set(f.keys())
                if missing:
                    raise ArtifactFormatError(rel, f"lacks tensors {sorted(missing)[:3]}")
                for name in names:
                    tensors[name] = f.get_tensor(name)
                    bar.update(tensors[name].numel() * tensors[name].element_size())
        except ArtifactError:
            raise
        except Exception as e:  # safetensors' own header and size errors
            raise ArtifactFormatError(rel, f"not a readable safetensors file ({e})") from None
    return tensors


# --- streamed ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Placed:
    """One tensor of a shard: its bytes [begin, end) in the file and its destination."""
    name: str
    begin: int
    end: int
    out: torch.Tensor

    @property
    def bytes(self) -> torch.Tensor:
        return self.out.view(-1).view(torch.uint8)


@dataclass(frozen=True)
class _Shard:
    rel: str
    path: Path
    header: bytes          # the file's first bytes: length and JSON header
    tensors: list[_Placed]


def _read_streamed(directory: Path, by_file: dict, files: dict, device: torch.device, bar: Bar) -> dict:
    shards = [_plan(directory, rel, names, files[rel]["bytes"], device) for rel, names in by_file.items()]
    jobs = [(shard, i) for shard in shards for i in range(chunk_count(files[shard.rel]["bytes"]))]
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(jobs)))
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    slots: queue.Queue = queue.Queue()
    for _ in range(workers + 2):   # two spare: a worker seldom waits for a buffer's copies
        slots.put(_Slot(device, ready))
    pool = ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(_read_chunk, shard, i, files[shard.rel]["sha256"][i], slots) for shard, i in jobs]
        for future in futures:
            bar.update(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        while not slots.empty():
            slots.get().wait()
    return {p.name: p.out for shard in shards for p in shard.tensors}


class _Slot:
    """A staging buffer (pinned for a GPU), the stream its copies go on, and their event;
    made by the first worker that takes it, so that buffers are pinned in parallel."""

    def __init__(self, device: torch.device, ready: "torch.cuda.Event | None"):
        self.device, self.ready = device, ready   # ready: recorded once the destinations exist
        self.buffer = self.view = self.stream = self.event = None

    def take(self) -> None:
        if self.buffer is not None:
            if self.event is not None:
                self.event.synchronize()   # the copies out of this buffer before are done
            return
        cuda = self.device.type == "cuda"
        self.buffer = torch.empty(HASH_CHUNK, dtype=torch.uint8, pin_memory=cuda)
        self.view = memoryview(self.buffer.numpy())
        if cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_event(self.ready)
            self.event = torch.cuda.Event()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _read_chunk(shard: _Shard, index: int, digest: str, slots: queue.Queue) -> int:
    """Chunk ``index`` of ``shard``: read into a slot, its tensors' bytes copied out, hashed
    meanwhile and compared. Returns the bytes read."""
    slot = slots.get()
    try:
        slot.take()
        start = index * HASH_CHUNK
        with open(shard.path, "rb") as f:
            f.seek(start)
            n = f.readinto(slot.view)
        data = slot.view[:n]
        _copy_out(shard, slot, start, n)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactTamperedError(shard.rel, f"content differs from the manifest (SHA-256 of chunk {index}, "
                                        f"from byte {start})")
        if index == 0 and bytes(data[:len(shard.header)]) != shard.header:
            raise ArtifactTamperedError(shard.rel, "the safetensors header changed while it was read")
        return n
    finally:
        slots.put(slot)


def _copy_out(shard: _Shard, slot: _Slot, start: int, n: int) -> None:
    end = start + n
    with torch.cuda.stream(slot.stream) if slot.stream is not None else contextlib.nullcontext():
        for p in shard.tensors:
            lo, hi = max(p.begin, start), min(p.end, end)
            if lo < hi:
                p.bytes[lo - p.begin:hi - p.begin].copy_(slot.buffer[lo - start:hi - start], non_blocking=True)
        if slot.event is not None:
            slot.event.record(slot.stream)


def _plan(directory: Path, rel: str, names: list[str], size: int, device: torch.device) -> _Shard:
    """The shard's tensors, placed from its safetensors header (8-byte little-endian length,
    then JSON: name -> dtype, shape, data_offsets after the header), destinations allocated."""
    path = inside(directory, rel)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= HASH_CHUNK - 8 or 8 + length > size:
            raise ArtifactFormatError(rel, f"not a readable safetensors file (header length {length})")
        raw = f.read(length)
    if len(raw) < length:
        raise ArtifactTruncatedError(rel, "truncated in its safetensors header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactFormatError(rel, f"not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactFormatError(rel, "not a readable safetensors file (header is no object)")
    missing = set(names) - set(header)
    if missing:
        raise ArtifactFormatError(rel, f"lacks tensors {sorted(missing)[:3]}")
    base = 8 + length
    placed = [_place(rel, name, header[name], base, size, device) for name in names]
    return _Shard(rel, path, head + raw, placed)


def _place(rel: str, name: str, info, base: int, size: int, device: torch.device) -> _Placed:
    dtype = DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
    shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
    ok = dtype is not None and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) \
        and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if ok:
        begin, end = base + offsets[0], base + offsets[1]
        numel = 1
        for d in shape:
            numel *= d
        ok = base <= begin <= end <= size and end - begin == numel * dtype.itemsize
    if not ok:
        raise ArtifactFormatError(rel, f"not a readable safetensors file (entry {name!r}: {info!r})")
    return _Placed(name, begin, end, torch.empty(shape, dtype=dtype, device=device))
