"""OnnxGraph: one ONNX graph under construction, filled from one fx graph in order."""

from __future__ import annotations

import operator

import onnx
import torch
from onnx import helper
from torch import fx

from fusegen.onnx_view.values import dtype_of, onnx_dtype, tensor_bytes, to_attribute, value_info


class OnnxGraph:
    """One ONNX graph, filled from one fx graph in order. ``used`` is shared with nested
    graphs (FusedKernel bodies): ONNX names must be unique across scopes."""

    def __init__(self, used: set[str], prefix: str):
        self.used, self.prefix = used, prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.names: dict[fx.Node, str | list[str]] = {}
        self.latest: dict[fx.Node, str] = {}     # tensors written in place -> their newest version
        self.opaque: dict[fx.Node, str] = {}     # get_attr of a non-tensor (e.g. a submodule)
        self.attrs: dict[str, str] = {}          # get_attr target -> its value name
        self.vectors: dict[str, str] = {}        # int64 scalar -> its 1-D [1] form
        self.node_names: set[str] = set()
        self.consts: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        name, k = self.prefix + base, 0
        while name in self.used:
            k += 1
            name = f"{self.prefix}{base}_{k}"
        self.used.add(name)
        return name

    def out(self, n: fx.Node) -> str:
        """The name of fx node ``n``'s (single) value, with its value_info."""
        name = self.fresh(n.name)
        self.names[n] = name
        self.describe(name, n.meta.get("val"))
        return name

    def outs(self, n: fx.Node, vals) -> list[str]:
        """Names of a multi-output node's values: output i is named after its getitem user."""
        names: list[str | None] = [None] * len(vals)
        for user in n.users:
            if user.target is operator.getitem and isinstance(user.args[1], int):
                i = user.args[1]
                if names[i] is None:
                    names[i] = self.fresh(user.name)
                    self.describe(names[i], vals[i])
                self.names[user] = names[i]
        names = [name or self.fresh(f"{n.name}/out{i}") for i, name in enumerate(names)]
        self.names[n] = names
        return names

    def describe(self, name: str, v) -> None:
        info = value_info(name, v)
        if info is not None:
            self.value_info.append(info)

    def value(self, arg: fx.Node) -> str:
        if arg in self.latest:
            return self.latest[arg]
        name = self.names[arg]
        if isinstance(name, list):
            raise ValueError(f"to_onnx: {arg.name} has {len(name)} outputs; it is read only through getitem")
        return name

    def emit(self, owner: fx.Node | str, op_type: str, inputs, outputs, domain: str = "", **attrs) -> list[str]:
        """Append one node. ``outputs``: names, or a count of fresh helper names. The node that
        produces an fx node's own value is named after it, its helpers ``<node>/<Op>``; a
        node owned by a plain name (shared constants) is named after that."""
        base = owner.name if isinstance(owner, fx.Node) else owner
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{base}/{op_type}") for _ in range(outputs)]
        own = self.names.get(owner, []) if isinstance(owner, fx.Node) else outputs
        own = [own] if isinstance(own, str) else own
        primary = not outputs or any(o in own for o in outputs)
        first = self.prefix + (base if primary else f"{base}/{op_type}")
        name, k = first, 0
        while name in self.node_names:
            k += 1
            name = f"{first}_{k}"
        self.node_names.add(name)
        node = helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain)
        if isinstance(owner, fx.Node):
            node.doc_string = label(owner)
        node.attribute.extend(a for a in (to_attribute(k, v) for k, v in attrs.items()) if a is not None)
        self.nodes.append(node)
        return list(outputs)

    def const(self, value, dtype: torch.dtype) -> str:
        """A Constant node for a scalar (0-d) or a list (1-d), shared within this graph."""
        key = (repr(value), dtype)
        if key not in self.consts:
            t = torch.tensor(value, dtype=dtype)
            proto = helper.make_tensor("value", onnx_dtype(dtype), list(t.shape),
                                       tensor_bytes(t).tobytes(), raw=True)
            self.consts[key] = self.emit("const", "Constant", [], [self.fresh("const")], value=proto)[0]
        return self.consts[key]

    def cast(self, owner, name: str, src: torch.dtype, dst: torch.dtype) -> str:
        return name if src == dst else self.emit(owner, "Cast", [name], 1, to=onnx_dtype(dst))[0]

    def operand(self, owner, arg, dtype: torch.dtype) -> str:
        """A tensor or Python-scalar argument as an ONNX value of ``dtype``."""
        if isinstance(arg, fx.Node):
            return self.cast(owner, self.value(arg), dtype_of(arg), dtype)
        return self.const(arg, dtype)

    def int_vector(self, owner, items) -> str:
        """A 1-D int64 value of ints and symbolic-int nodes (a shape, split sizes, ...)."""
        if all(not isinstance(i, fx.Node) for i in items):
            return self.const([int(i) for i in items], torch.int64)
        pieces, run = [], []
        for item in items:
            if isinstance(item, fx.Node):
                if run:
                    pieces.append(self.const(run, torch.int64))
                    run = []
                pieces.append(self.vector(owner, item))
            else:
                run.append(int(item))
        if run:
            pieces.append(self.const(run, torch.int64))
        return pieces[0] if len(pieces) == 1 else self.emit(owner, "Concat", pieces, 1, axis=0)[0]

    def vector(self, owner, arg: fx.Node) -> str:
        scalar = self.operand(owner, arg, torch.int64)
        if scalar not in self.vectors:
            self.vectors[scalar] = self.emit(owner, "Unsqueeze", [scalar, self.const([0], torch.int64)], 1)[0]
        return self.vectors[scalar]


def label(n: fx.Node) -> str:
    """What an fx node calls, for a node's doc_string: the op, function or submodule."""
    if n.op == "call_module":
        return f"call_module {n.target}"
    if isinstance(n.target, torch._ops.OpOverload):
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target))
