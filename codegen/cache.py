"""Generated kernels on disk, keyed by the hash of their source (which spells out dtypes).

Triton needs a kernel's source in a real file, so each generated module is written once to
``$FUSEGEN_CACHE/kernels/<hash>.py`` and imported from there; Triton's own cache then keeps
the compiled binary per device."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fusegen.codegen.pointwise import source_key

_loaded: dict[str, object] = {}
PLACEHOLDER = "__fusegen_kernel__"


def name_by_content(source: str, prefix: str) -> tuple[str, str]:
    """(kernel name, source) for ``source`` written with PLACEHOLDER as its kernel's name:
    the name is ``_<prefix>_<hash>_kernel``, the hash that of the code itself, so groups and
    layers that generate the same code share one module and one compiled binary (a 16-layer
    model compiles its RMSNorm once, not 16 times)."""
    name = f"_{prefix}_{source_key(source)}_kernel"
    return name, source.replace(PLACEHOLDER, name)


def cache_root() -> Path:
    """``$FUSEGEN_CACHE``, or ``~/.cache/fusegen``."""
    return Path(os.environ.get("FUSEGEN_CACHE") or Path.home() / ".cache" / "fusegen")


def cache_dir() -> Path:
    path = cache_root() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(source: str):
    """Import the module holding ``source`` (written to the cache the first time)."""
    key = source_key(source)
    if key in _loaded:
        return _loaded[key]
    path = cache_dir() / f"k{key}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(f"fusegen_kernel_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _loaded[key] = module
    return module
