"""What the model is evaluated for: a GPU's datasheet roof and the element type of floating
tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense 16-bit tensor-core FLOP/s
    bandwidth: float   # HBM bytes/s

    @property
    def ridge(self) -> float:
        """FLOP per byte where the memory roof meets the compute roof."""
        return self.peak_flops / self.bandwidth


GPUS = {  # datasheet figures, dense (no sparsity)
    "h100": GPU("H100 SXM", 989e12, 3.35e12),
    "h200": GPU("H200 SXM", 989e12, 4.8e12),
    "a100": GPU("A100 SXM 80GB", 312e12, 2.039e12),
}


def gpu_spec(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    key = str(gpu).strip().lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[key]

