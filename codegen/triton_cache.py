"""Triton's compiled binaries of fusegen's kernels: collected from this process, and put
back where Triton's compiler looks for them in another.

Triton compiles a kernel once per specialization (argument dtypes, constexprs, pointer
alignment, compile options) and keeps the result in its cache directory
($TRITON_CACHE_DIR, by default ~/.triton/cache), the same layout in Triton 3.6 and 3.9:

    <cache dir>/<dir>/<name>.json           metadata: launch parameters, target, options
    <cache dir>/<dir>/<name>.cubin          the binary
    <cache dir>/<dir>/__grp__<name>.json    {"child_paths": {file name: absolute path}}

``<dir>`` is the base32 of a SHA-256 over the kernel's source hash, its specialization, the
options, the Triton build and the GPU target (triton/compiler/compiler.py ``compile``). A
``compile`` that finds the group file with every child present loads the binary instead of
compiling (with TRITON_STORE_BINARY_ONLY Triton itself keeps only the two files above).

``compiled_binaries`` lists what fusegen's kernels compiled in this process: each JIT
function's in-memory cache holds every specialization that ran, with the files Triton
wrote. ``seed`` writes such entries into the cache directory, so that the same ``compile``
in another process finds them. ``count_compiles`` counts Triton's cache hits and compiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

SAFE_NAME = re.compile(r"^[A-Za-z0-9_]{1,200}$")   # what a cache directory or file stem may be
GENERATED = "fusegen_kernel_"                      # module prefix of generated kernels (cache.py)


@dataclass(frozen=True)
class TargetKey:
    """What a binary is valid for beyond its Triton cache key: the Triton release that made
    it and the GPU (a binary of one GPU is never offered to another)."""
    triton: str
    gpu: str
    capability: tuple[int, int]

    @classmethod
    def of(cls, device) -> "TargetKey | None":
        """The key of ``device`` with this process's Triton; None where no binary runs
        (not CUDA, or Triton's interpreter)."""
        device = torch.device(device)
        if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
            return None
        import triton

        return cls(triton.__version__, torch.cuda.get_device_name(device),
                   tuple(torch.cuda.get_device_capability(device)))

    def to_dict(self) -> dict:
        return {"triton": self.triton, "gpu": self.gpu, "capability": list(self.capability)}

    @classmethod
    def from_dict(cls, data) -> "TargetKey":
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        capability = data.get("capability")
        if not (isinstance(data.get("triton"), str) and isinstance(data.get("gpu"), str)
                and isinstance(capability, list) and len(capability) == 2
                and all(isinstance(c, int) and not isinstance(c, bool) for c in capability)):
            raise ValueError(f"malformed target {data!r}")
        return cls(data["triton"], data["gpu"], tuple(capability))

    def mismatch(self, other: "TargetKey") -> str | None:
        """Why binaries made for ``self`` do not run on ``other`` (None: they do)."""
        for what, mine, theirs in (("Triton", self.triton, other.triton), ("GPU", self.gpu, other.gpu),
                                   ("compute capability", self.capability, other.capability)):
            if mine != theirs:
                return f"compiled with {what} {mine}, this is {theirs}"
        return None


@dataclass(frozen=True)
class Binary:
    """One compiled specialization of one kernel, as Triton's cache holds it."""
    dir: str           # the cache directory's name (Triton's key)
    name: str          # the file stem in it (the kernel's name)
    ext: str           # the binary's extension: "cubin"
    function: str      # "module:qualname" of the JIT function
    source_hash: str   # that function's source hash as Triton computes it (JITFunction.cache_key)
    metadata: bytes
    binary: bytes

    @property
    def files(self) -> dict[str, bytes]:
        return {f"{self.name}.json": self.metadata, f"{self.name}.{self.ext}": self.binary}


def jit_functions() -> dict[str, object]:
    """Every Triton JIT function defined in fusegen's modules and in the generated kernel
    modules imported so far, by ``module:qualname`` (autotuned or heuristic wrappers are
    unwrapped to the function they compile)."""
    from triton.runtime.jit import JITFunction

    from fusegen.codegen import cache

    modules = [m for n, m in list(sys.modules.items()) if n == "fusegen" or n.startswith("fusegen.")]
    modules += list(cache._loaded.values())
    found = {}
    for module in modules:
        for value in list(vars(module).values()):
            while not isinstance(value, JITFunction) and hasattr(value, "fn"):
                value = value.fn
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found[f"{module.__name__}:{value.fn.__qualname__}"] = value
    return found


def resolve(function: str):
    """The JIT function named ``module:qualname`` in this process, importing a module of
    fusegen's codegen if needed; None when there is none."""
    from triton.runtime.jit import JITFunction

    from fusegen.codegen import cache

    module_name, _, qualname = function.partition(":")
    if module_name.startswith(GENERATED):
        module = cache._loaded.get(module_name.removeprefix(GENERATED))
    elif module_name.startswith("fusegen.codegen.") and SAFE_NAME.match(module_name.replace(".", "_")):
        import importlib

        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    else:
        return None
    value = getattr(module, qualname, None) if SAFE_NAME.match(qualname) else None
    while value is not None and not isinstance(value, JITFunction) and hasattr(value, "fn"):
        value = value.fn
    return value if isinstance(value, JITFunction) else None


def compiled_binaries(device) -> list[Binary]:
    """The binaries fusegen's kernels compiled (or loaded from Triton's cache) in this
    process for ``device``, one per specialization that ran."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    out = {}
    for function, fn in jit_functions().items():
        caches = getattr(fn, "device_caches", None)
        if not caches or index not in caches:
            continue
        for kernel in list(caches[index][0].values()):
            if hasattr(kernel, "result"):   # Triton's async compile mode: a future
                if not kernel.done():
                    continue
                kernel = kernel.result()
            binary = _binary(kernel, function, fn.cache_key)
            if binary is not None:
                out[(binary.dir, binary.name)] = binary
    return [out[k] for k in sorted(out)]


def _binary(kernel, function: str, source_hash: str) -> Binary | None:
    from triton.compiler.compiler import make_backend

    group = getattr(kernel, "metadata_group", None) or {}
    json_name = next((n for n in group if n.endswith(".json")), None)
    if json_name is None:
        return None
    name, path = json_name[:-len(".json")], Path(group[json_name])
    ext = make_backend(kernel.metadata.target).binary_ext
    if not (SAFE_NAME.match(name) and SAFE_NAME.match(path.parent.name) and SAFE_NAME.match(ext)):
        return None
    try:
        metadata = path.read_bytes()
    except OSError:   # the cache was cleaned since: the same JSON from the loaded metadata
        metadata = json.dumps(kernel.metadata._asdict(), default=vars).encode()
    return Binary(path.parent.name, name, ext, function, source_hash, metadata, bytes(kernel.kernel))


def cache_dir() -> Path:
    """Triton's cache directory, as its compiler will look it up."""
    from triton import knobs

    return Path(knobs.cache.dir)


def file_cache_reason() -> str | None:
    """Why seeding files would not reach Triton's compiler (None: it does)."""
    try:
        from triton import knobs
    except ImportError:
        return "this Triton has no knobs module (older than 3.4)"
    if knobs.cache.manager_class is not None or os.environ.get("TRITON_REMOTE_CACHE_BACKEND"):
        return "Triton is set to another cache manager (TRITON_CACHE_MANAGER)"
    if knobs.compilation.always_compile:
        return "TRITON_ALWAYS_COMPILE is set"
    return None


@dataclass(frozen=True)
class Seeded:
    written: int   # entries written into Triton's cache
    present: int   # entries Triton's cache already held


def seed(binaries: list[Binary], directory: Path | None = None) -> Seeded:
    """Write ``binaries`` into Triton's cache directory (``directory``: another one). An entry
    already complete there is left as it is; files are written whole before their group
    file names them, so a compile running meanwhile sees an entry complete or not at all."""
    root = Path(directory) if directory is not None else cache_dir()
    written = present = 0
    for b in binaries:
        folder = root / b.dir
        group = folder / f"__grp__{b.name}.json"
        if _complete(group):
            present += 1
            continue
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for file_name, data in b.files.items():
            _write(folder / file_name, data)
            paths[file_name] = str(folder / file_name)
        _write(group, json.dumps({"child_paths": paths}).encode())
        written += 1
    return Seeded(written, present)


def _complete(group: Path) -> bool:
    try:
        children = json.loads(group.read_bytes()).get("child_paths")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(children, dict) and bool(children) and all(os.path.exists(p) for p in children.values())


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def count_compiles():
    """Count Triton's ``compile`` calls of fusegen's kernels while the block runs:
    ``{"hits": binaries loaded from the cache, "misses": kernels compiled}`` (Triton's
    compilation listener; an earlier listener keeps being called)."""
    from triton import knobs

    counts: Counter = Counter(hits=0, misses=0)
    before = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        fn = getattr(src, "fn", None)
        module = getattr(getattr(fn, "fn", None), "__module__", "") or ""
        if module.startswith(("fusegen", GENERATED)):
            counts["hits" if cache_hit else "misses"] += 1
        if before is not None:
            before(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)

    knobs.compilation.listener = listener
    try:
        yield counts
    finally:
        knobs.compilation.listener = before
