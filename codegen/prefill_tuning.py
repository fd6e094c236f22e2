"""Which prefill kernel and tiles a call runs: the named configurations, the defaults, and the
Hopper kernel's tiles measured once per shape class and kept on disk.

    config=None       where the Hopper kernel suits the call (``hopper_suits``: sm90+,
                      fp16/bf16, last strides 1, scale > 0), the fastest measured of the
                      Hopper candidates and the FA2 kernel's default tiles; otherwise the
                      FlashAttention-2 kernel with ``default_prefill_config``
    config="fa2"      the FlashAttention-2 kernel, default tiles
    config="hopper"   the Hopper kernel, the fastest measured of its candidates (small tiles
                      under the interpreter)
    a PREFILL_CONFIGS name or a dict of its keys: exactly those tiles; ``kernel`` picks the
                      kernel ("fa2" when absent), ``tma``, ``persistent``, ``warp_specialize``
                      are Hopper options (default True, False, False)

When tuning runs. The first call of a shape class (``tuning_key``: kind, dtype, head dim,
masking, GQA group, block size, token counts rounded up to powers of two) made outside a
CUDA-graph capture times every candidate of ``HOPPER_CANDIDATES`` on that call's own inputs
(``triton.testing.do_bench``, median) and keeps the fastest, in memory and in
``$FUSEGEN_CACHE/tuning/prefill_attention.json`` (keyed by GPU name and Triton version too),
so later calls, and later processes, only look it up. A call inside a capture never
measures (timing synchronises): it takes the stored choice or the first candidate. The
engine runs each step shape once before capturing it, so its graphs hold tuned kernels.
``FUSEGEN_PREFILL_TUNE=0`` turns measuring off (stored choice or first candidate).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Optional, Union

import torch
import triton
import triton.testing
from torch import Tensor

from fusegen.codegen.attention_common import _fail, head_dim_pad
from fusegen.codegen.cache import cache_root

log = logging.getLogger("fusegen.codegen")


def _hopper(bm: int, bn: int, warps: int, stages: int, **options) -> dict:
    return dict(kernel="hopper", BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                **options)


# Tile configurations of the prefill kernels; a benchmark sweeps them through ``config=``.
PREFILL_CONFIGS = {
    "m128_n64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "m128_n128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "m128_n32_w4_s4": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    "m64_n64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "m128_n64_w4_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "m64_n32_w4_s2": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    "interpret": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
    "hopper_m128_n128_w8_s2": _hopper(128, 128, 8, 2),
    "hopper_m128_n64_w8_s3": _hopper(128, 64, 8, 3),
    "hopper_m128_n64_w4_s3": _hopper(128, 64, 4, 3),
    "hopper_m128_n64_w4_s4": _hopper(128, 64, 4, 4),
    "hopper_m64_n64_w4_s3": _hopper(64, 64, 4, 3),
    "hopper_m64_n32_w4_s2": _hopper(64, 32, 4, 2),
    "hopper_m64_n64_w4_s2": _hopper(64, 64, 4, 2),
    "hopper_m128_n128_w8_s2_persistent": _hopper(128, 128, 8, 2, persistent=True),
    "hopper_m128_n64_w8_s3_persistent": _hopper(128, 64, 8, 3, persistent=True),
    # Fails to compile on sm90 with Triton 3.6 and 3.9: their Hopper warp specialisation takes
    # a kernel with one key loop only, and the masked stretches are loops of their own.
    "hopper_m128_n128_w4_s2_ws": _hopper(128, 128, 4, 2, warp_specialize=True),
    "hopper_m128_n128_w8_s2_pointers": _hopper(128, 128, 8, 2, tma=False),
    "hopper_interpret": _hopper(16, 16, 1, 1),
    "hopper_interpret_pointers": _hopper(16, 16, 1, 1, tma=False),
    "hopper_interpret_persistent": _hopper(16, 16, 1, 1, persistent=True),
}

# What tuning measures, by the padded head dim (first: the choice when nothing is measured).
# Persistent launches only apply to the dense kernel; no warp-specialised loop (see above).
HOPPER_CANDIDATES = {
    128: ("hopper_m128_n64_w8_s3", "hopper_m128_n128_w8_s2", "hopper_m128_n64_w4_s3",
          "hopper_m64_n64_w4_s3", "hopper_m128_n64_w8_s3_persistent"),
    256: ("hopper_m64_n64_w4_s2", "hopper_m64_n32_w4_s2", "hopper_m128_n64_w8_s3"),
}
OPTION_KEYS = {"kernel", "tma", "persistent", "warp_specialize"}
TILE_KEYS = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}


def default_prefill_config(head_dim: int, on_cuda: bool) -> dict:
    """FlashAttention-2 kernel defaults, by the padded head dim (80 and 96 run as 128);
    small tiles under the interpreter. Measured on H100, causal bf16 B4 H32 T4096: D128 ~395
    TFLOP/s (m128_n64_w8_s3 the same, SDPA flash 323), D64 ~340 (SDPA flash 285); paged B1
    H32/8 T4096 D128: ~340 with block_size 64, ~255 with block_size 16 (rows gathered)."""
    if not on_cuda:
        return PREFILL_CONFIGS["interpret"]
    if head_dim_pad(head_dim) <= 128:
        return PREFILL_CONFIGS["m64_n64_w4_s3"]
    return PREFILL_CONFIGS["m64_n32_w4_s2"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def hopper_suits(q: Tensor, scale: float, *tensors: Tensor) -> bool:
    """Whether ``config=None`` picks the Hopper kernel: a compiled sm90+ device, 16-bit
    inputs (fp32 keeps the FA2 kernel), unit last strides, a positive scale."""
    return (q.is_cuda and not _interpreting() and torch.cuda.get_device_capability(q.device)[0] >= 9
            and q.dtype in (torch.float16, torch.bfloat16) and scale > 0.0
            and all(t.stride(-1) == 1 for t in (q, *tensors)))


def _check_hopper(op: str, q: Tensor, scale: float, *tensors: Tensor) -> None:
    if scale <= 0.0:
        _fail(op, f"the Hopper prefill kernel needs a positive scale, got {scale}")
    bad = [tuple(t.stride()) for t in (q, *tensors) if t.stride(-1) != 1]
    if bad:
        _fail(op, f"the Hopper prefill kernel needs last strides of 1, got strides {bad}")


def tuning_key(kind: str, q: Tensor, group: int, causal: bool, window: int, softcap: float,
               tokens: int, keys: int, rows: int, page: int = 0) -> str:
    """The shape class a tuned choice applies to: token, key and row counts (rows: batch x
    heads, or sequences) rounded up to powers of two."""
    p2 = lambda n: 1 << max(0, int(n) - 1).bit_length()
    return (f"{kind} {str(q.dtype).removeprefix('torch.')} D{q.shape[-1]} causal{int(causal)} "
            f"window{int(window > 0)} softcap{int(softcap > 0)} group{group} page{page} "
            f"T{p2(tokens)} L{p2(keys)} R{p2(rows)}")


def resolve_config(op: str, config: Union[None, str, dict], q: Tensor, scale: float,
                   tensors: tuple, key: str, run: Callable[[dict], None]) -> dict:
    """The configuration dict a prefill call runs (see the module docstring); ``run(cfg)``
    launches the kernel ``cfg`` names on this call's inputs, for tuning."""
    auto = config is None and hopper_suits(q, scale, *tensors)
    if config is None and not auto or config == "fa2":
        return default_prefill_config(q.shape[-1], q.is_cuda)
    if auto or config == "hopper":
        _check_hopper(op, q, scale, *tensors)
        if not q.is_cuda or _interpreting():
            return PREFILL_CONFIGS["hopper_interpret"]
        wide = head_dim_pad(q.shape[-1]) > 128
        candidates = HOPPER_CANDIDATES[256 if wide else 128]
        if op != "flash_attention":
            candidates = tuple(c for c in candidates if not PREFILL_CONFIGS[c].get("persistent"))
        if auto:  # the FA2 kernel competes too: the default is never slower than it was
            candidates += ("m64_n32_w4_s2" if wide else "m64_n64_w4_s3",)
        name = tuned_choice(q.device, f"{key} {'auto' if auto else 'hopper'}", candidates, run)
        return PREFILL_CONFIGS[name] if name else default_prefill_config(q.shape[-1], True)
    if isinstance(config, str):
        if config not in PREFILL_CONFIGS:
            _fail(op, f"unknown config {config!r}; known: {sorted(PREFILL_CONFIGS)} or 'fa2', 'hopper'")
        config = PREFILL_CONFIGS[config]
    if config.get("kernel", "fa2") == "hopper":
        _check_hopper(op, q, scale, *tensors)
    return dict(config)


# ------------------------------------------------------------------------------------------
# measured choices
# ------------------------------------------------------------------------------------------

_choices: dict[str, str] = {}
_device_names: dict[int, str] = {}


def _cache_file():
    return cache_root() / "tuning" / "prefill_attention.json"


def _read_disk() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_disk(full_key: str, entry: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_disk()
        data[full_key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only cache only costs the next process a measurement
        log.warning("prefill tuning: could not write %s: %s", path, exc)


def tuned_choice(device: torch.device, key: str, candidates: tuple,
                 run: Callable[[dict], None]) -> Optional[str]:
    """The fastest of ``candidates`` for shape class ``key`` (see the module docstring);
    None when every candidate failed to compile or run."""
    full_key = f"{_device_name(device)} | triton {triton.__version__} | {key}"
    if full_key in _choices:
        return _choices[full_key]
    stored = _read_disk().get(full_key)
    if stored and stored.get("choice") in candidates:
        _choices[full_key] = stored["choice"]
        return stored["choice"]
    if os.environ.get("FUSEGEN_PREFILL_TUNE") == "0":
        _choices[full_key] = candidates[0]
        return candidates[0]
    if torch.cuda.is_current_stream_capturing():  # not remembered: a later call may measure
        return candidates[0]
    times = {name: _time(name, run) for name in candidates}
    best = min(times, key=times.get)
    if not math.isfinite(times[best]):
        return None
    _choices[full_key] = best
    _write_disk(full_key, {"choice": best, "ms": {n: t for n, t in times.items() if math.isfinite(t)}})
    log.info("prefill tuning: %s -> %s (%s)", key, best,
             ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda x: x[1])))
    return best


def _device_name(device) -> str:
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def _time(name: str, run: Callable[[dict], None]) -> float:
    cfg = PREFILL_CONFIGS[name]
    try:
        return triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=25, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is skipped
        log.info("prefill tuning: %s failed: %s", name, str(exc).splitlines()[0] if str(exc) else exc)
        return math.inf


def stored_choices() -> dict:
    """What this process measured or looked up, for benchmarks' reports."""
    disk = _read_disk()
    return {k: disk.get(k, {"choice": v}) for k, v in _choices.items()}


def seed_choices(choices: dict) -> int:
    """Take tuned choices (``stored_choices()``'s keys, each with its "choice") made on
    another machine as if measured here; a key names its GPU and Triton release, so only
    those of this device ever match. Returns how many were new; an unknown configuration
    name raises ValueError."""
    added = 0
    for key, entry in choices.items():
        name = entry.get("choice") if isinstance(entry, dict) else None
        if not isinstance(key, str) or name not in PREFILL_CONFIGS:
            raise ValueError(f"prefill tuning entry {key!r}: {entry!r} names no configuration")
        if key not in _choices:
            _choices[key] = name
            added += 1
    return added
