"""Programmatic dependent launch (PDL) for fusegen's kernels, opt-in (config ``pdl=1``).

On Hopper and later, a kernel launched with the PDL attribute may start while the kernel
before it in the stream is still finishing; it must then wait (``griddepcontrol.wait``)
before it reads anything that kernel wrote. Every fusegen kernel takes ``USE_GDC`` and,
when it is set, waits first thing and at once lets its own dependents launch, so what
overlaps is one kernel's launch and set-up with the previous kernel's tail, never data.
Kernels of other libraries (cuBLAS, aten) are launched as usual and simply end the overlap.

``dependent_launches(True)`` turns it on for the kernels launched inside the block (the
engine wraps its CUDA-graph capture in it, so the graphs record the PDL edges).

The one read that may start before the wait is of data no kernel of the step writes: the
weights. The skinny GEMMs ask L2 for the first part of their weight slice
(``prefetch_rows``) before they wait, so a decode linear's weight stream starts while the
kernel before it (a norm, attention) is still running, instead of after its launch gap.

``ticket_counters`` is the zeroed int32 buffer that kernels whose last program to finish
combines the others' partials take their tickets from.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_ENABLED = [False]


@contextlib.contextmanager
def dependent_launches(enabled: bool):
    before = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = before


# Bytes one program asks L2 for ahead of its wait: the programs resident at once (about a
# wave) then ask for well under the 50 MB L2 of an H100/H200, so nothing prefetched is
# evicted before it is read.
PREFETCH_BYTES = 32 << 10


def enabled() -> bool:
    """Whether kernels launched now use PDL (inside ``dependent_launches(True)``)."""
    return _ENABLED[0]


# Ticket counters, zeros between launches; every buffer made stays alive, since a captured
# CUDA graph keeps the address it was captured with.
_TICKET_ENTRIES = 1 << 16
_tickets: dict[str, list[torch.Tensor]] = {}


def ticket_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 zeros that the kernels taking tickets from them (the fused decode
    reduction, the greedy token choice) leave at zero: one buffer per device, made outside
    any CUDA-graph capture and reused by every launch in stream order. During a capture that
    needs more than the buffer holds, a fresh zeroed tensor (its memset is part of the
    graph, so every replay starts from zeros)."""
    key = str(device)
    buffers = _tickets.setdefault(key, [])
    if buffers and buffers[-1].numel() >= n:
        return buffers[-1][:n]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    buffers.append(torch.zeros(max(n, _TICKET_ENTRIES), dtype=torch.int32, device=device))
    return buffers[-1][:n]


def supported(device) -> bool:
    """PDL needs a CUDA device of compute capability 9.0 or later and compiled kernels."""
    device = torch.device(device)
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl(x: torch.Tensor) -> dict:
    """Launch keywords for a kernel over ``x``'s device: ``USE_GDC`` and, when on,
    ``launch_pdl``."""
    on = _ENABLED[0] and x.is_cuda
    return {"USE_GDC": True, "launch_pdl": True} if on else {"USE_GDC": False}


def prefetchable(w: torch.Tensor) -> bool:
    """Whether ``w``'s rows can be prefetched by ``prefetch_rows``: unit column stride and
    16-byte aligned rows (the bulk prefetch's rule)."""
    size = w.element_size()
    return w.stride(-1) == 1 and (w.stride(0) * size) % 16 == 0 and w.data_ptr() % 16 == 0


@triton.jit
def prefetch_rows(row_ptrs, nbytes, mask):
    """Ask L2 for ``nbytes`` (a multiple of 16) from each 16-byte aligned address in
    ``row_ptrs`` where ``mask`` holds: ``cp.async.bulk.prefetch.L2.global`` (PTX ISA 8.0,
    sm90+). A hint: nothing waits for it and nothing is written."""
    on = (mask & (nbytes > 0)).to(tl.int32)
    size = (tl.zeros_like(on) + nbytes).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [row_ptrs.to(tl.int64), on, size], dtype=tl.int32, is_pure=False, pack=1)
