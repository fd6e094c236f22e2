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
