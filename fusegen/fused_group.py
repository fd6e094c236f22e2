"""A fused group of graph nodes: one module that computes what its nodes computed.

``fuse_pointwise`` cuts groups of pointwise and row-reduction nodes out of the graph and puts
one ``call_module`` to a FusedGroup in their place. The group keeps its nodes as a small
GraphModule (the reference: it runs anywhere) and, once codegen has emitted one, a
generated Triton kernel that computes the same thing in one pass over memory.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import fx, nn

KERNELS_ENV = "FUSEGEN_KERNELS"  # "0": always run references; "1": kernels even off CUDA (interpreter)


def kernels_wanted(tensors) -> bool:
    setting = os.environ.get(KERNELS_ENV)
    if setting == "0":
        return False
    if setting == "1":
        return True
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


class FusedGroup(nn.Module):
    def __init__(self, name: str, graph_module: fx.GraphModule, schedule: str):
        super().__init__()
        self.name = name
        self.reference = graph_module          # placeholders = group inputs, output = tuple
        self.schedule = schedule               # "pointwise" or "row"
        self.kernel: Optional[Callable] = None  # set by codegen: kernel(*inputs) -> tuple
        self.source: Optional[str] = None

    def forward(self, *inputs):
        if self.kernel is not None and kernels_wanted(inputs):
            return self.kernel(*inputs)
        return self.reference(*inputs)

    def extra_repr(self) -> str:
        ops = [str(n.target).replace("aten.", "") for n in self.reference.graph.nodes if n.op == "call_function"]
        return f"{self.name}: {self.schedule}, {len(ops)} ops: {', '.join(ops)}"
