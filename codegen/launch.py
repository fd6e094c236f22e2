"""Programmatic dependent launch (PDL) for fusegen's kernels, opt-in (config ``pdl=1``).

On Hopper and later, a kernel launched with the PDL attribute may start while the kernel
before it in the stream is still finishing; it must then wait (``griddepcontrol.wait``)
before it reads anything that kernel wrote. Every fusegen kernel takes ``USE_GDC`` and,
when it is set, waits first thing and at once lets its own dependents launch, so what
overlaps is one kernel's launch and set-up with the previous kernel's tail, never data.
Kernels of other libraries (cuBLAS, aten) are launched as usual and simply end the overlap.

``dependent_launches(True)`` turns it on for the kernels launched inside the block (the
engine wraps its CUDA-graph capture in it, so the graphs record the PDL edges).
"""

from __future__ import annotations

import contextlib
import os

import torch

_ENABLED = [False]


@contextlib.contextmanager
def dependent_launches(enabled: bool):
    before = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = before


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

