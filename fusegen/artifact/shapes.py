"""A loaded graph's shape values: FakeTensor ``meta["val"]`` like a compiled graph's.

An artifact records each node's dtype and shape as text (``fusegen_shape``; dims are ints
or symbolic expressions, ``["s43", "s53", 64]``). What runs at engine set-up reads values,
not text: codegen/fused_gemm.py matches and plans its fused GEMMs on ``node.meta["val"]``
and samples their arguments from the graph's symbolic sizes. ``add_shape_values`` gives the
graph those values the way a compiled graph has them::

    placeholder records ──▶ ShapeEnv with the recorded symbols, by name
                        ──▶ FakeTensors for the placeholders
                        ──▶ passes/infra.propagate_shapes (every node, FusedGroups' graphs too)
                        ──▶ each derived value printed again == its record, or refused

The derived values are what the graph's ops compute, so the records only have to agree:
an artifact whose shapes disagree with its ops was edited. Where torch cannot propagate
the symbols although the ops take the graph at one size (every symbol at its hint), the
graph is loaded without values, with a warning: it runs, its linears unfused. Only placeholder records are
parsed (a small grammar: ints, symbols, ``+ - *``), never evaluated as Python.
"""

from __future__ import annotations

import ast
import logging
import re

import sympy
import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.symbol import SymT, make_symbol
from torch.utils._sympy.value_ranges import ValueRanges

from fusegen.errors import ArtifactFormatError
from fusegen.fused_group import FusedGroup
from fusegen.ir import SHAPE, shape_record
from fusegen.passes.infra import propagate_shapes

log = logging.getLogger("fusegen.artifact")
_BACKED, _UNBACKED = re.compile(r"s(\d+)"), re.compile(r"u(\d+)")
MAX_UNBACKED = 1000   # unbacked symbols are made one by one up to the recorded index
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def add_shape_values(gm: fx.GraphModule, device: torch.device, where: str) -> int:
    """Give every node of ``gm`` (and of its FusedGroups) the ``val`` its ops compute from
    placeholders of the recorded shapes, on ``device``; returns how many nodes were checked
    against their records. A derived value that prints differently from its record, or a
    graph that does not propagate, raises ArtifactFormatError naming ``where``."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols = _Symbols(where)
    for node in inputs:
        node.meta["val"] = symbols.tensor(node.meta.get(SHAPE), node.name, device)
    try:
        _propagate_symbolically(gm)
    except Exception as e:  # an op refused its arguments' shapes or dtypes, or torch could not follow
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _fall_back_to_one_size(gm, inputs, symbols, device, where, why)
        return 0
    return _check_records(gm, where)


def _propagate_symbolically(gm: fx.GraphModule) -> None:
    """Under the Python dispatcher, as torch.export traces: composite ops such as
    aten.matmul then decompose in Python over symbolic sizes. Without it, torch 2.11's C++
    matmul on CUDA reads the sizes as ints (aten.size), a guard on the loaded symbols."""
    with enable_python_dispatcher():
        propagate_shapes(gm, reuse=True)


def _fall_back_to_one_size(gm, inputs, symbols: "_Symbols", device, where: str, why: str) -> None:
    """After the symbolic propagation failed: if the graph's ops take its inputs at one size
    (every symbol at its hint, no ShapeEnv, so no guard can fail), the IR is consistent and
    the failure was torch's symbolic machinery (a guard some torch releases cannot evaluate
    on these symbols): the graph is left without shape values, as artifacts were loaded
    before they had any, and runs with its linears unfused (codegen/fused_gemm.py skips a
    graph without values). Otherwise its ops refuse its shapes: the IR was edited."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            for node in inputs:
                node.meta["val"] = torch.empty(symbols.concrete(node.meta["val"].shape),
                                               dtype=node.meta["val"].dtype, device=device)
        propagate_shapes(gm, reuse=True)
    except Exception:   # noqa: BLE001 - inconsistent at any size
        raise ArtifactFormatError(where, f"the graph's shapes do not propagate ({why})") from None
    finally:
        _drop_values(gm)
    log.warning("%s: the graph's shapes propagate at one size but not symbolically in torch %s (%s); "
                "it is loaded without shape values, so its linears are not fused with their neighbours",
                where, torch.__version__, why)


def _drop_values(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
        if node.op == "call_module" and isinstance(getattr(gm, node.target, None), FusedGroup):
            _drop_values(getattr(gm, node.target).reference)


def _check_records(gm: fx.GraphModule, where: str, group: str = "") -> int:
    checked = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(getattr(gm, node.target, None), FusedGroup):
            checked += _check_records(getattr(gm, node.target).reference, where, f"{group}{node.target}.")
        if SHAPE not in node.meta or node.op == "output":
            continue
        got = shape_record(node.meta.get("val"))
        if got != node.meta[SHAPE]:
            raise ArtifactFormatError(where, f"node {group}{node.name!r} records {node.meta[SHAPE]}, "
                                      f"but its op computes {got}")
        checked += 1
    return checked


class _Symbols:
    """One ShapeEnv holding the symbols the placeholders' records name, under those names."""

    def __init__(self, where: str):
        self.where = where
        self.env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=True)
        self.symbols: dict[str, object] = {}    # recorded name -> sympy symbol
        self.hints: dict[object, int] = {}      # backed symbol -> its hint
        self.unbacked: dict[str, object] = {}   # every unbacked symbol made, by name
        self.values_at_hints: dict[object, int] = {}   # every symbol's value in ``concrete``

    def tensor(self, record, name: str, device: torch.device) -> torch.Tensor:
        dims = record.get("shape") if isinstance(record, dict) else None
        dtype = getattr(torch, str(record.get("dtype")), None) if isinstance(record, dict) else None
        if not isinstance(dims, list) or not isinstance(dtype, torch.dtype):
            raise ArtifactFormatError(self.where, f"input {name!r}: malformed shape record {record!r}")
        sizes = [d if isinstance(d, int) and not isinstance(d, bool) else self.size(d, name) for d in dims]
        try:
            with self.mode:
                return torch.empty(sizes, dtype=dtype, device=device)
        except Exception as e:  # e.g. a negative or overflowing size
            raise ArtifactFormatError(self.where, f"input {name!r}: no tensor has the shape {dims} "
                                      f"({type(e).__name__})") from None

    def concrete(self, sizes) -> list[int]:
        """``sizes`` with every symbol at its hint (an unbacked one at a prime of its own)."""
        values = self.values_at_hints
        values.update({k: v for k, v in self.hints.items() if k not in values})
        out = []
        for d in sizes:
            if isinstance(d, torch.SymInt):
                expr = d.node.expr
                for symbol in sorted(expr.free_symbols - values.keys(), key=str):
                    values[symbol] = sympy.nextprime(max(values.values(), default=1000))
                d = int(expr.subs(values))
            out.append(d)
        return out

    def size(self, text, name: str):
        """A SymInt of the graph's ShapeEnv for a recorded dim such as ``"u3 + 1"``."""
        try:
            tree = ast.parse(text, mode="eval").body if isinstance(text, str) else None
        except SyntaxError:
            tree = None
        expr = self._expr(tree, name) if tree is not None else None
        if expr is None:
            raise ArtifactFormatError(self.where, f"input {name!r}: dim {text!r} is not a size expression")
        if isinstance(expr, int):
            return expr
        backed = not (expr.free_symbols - self.hints.keys())
        return self.env.create_symintnode(expr, hint=int(expr.subs(self.hints)) if backed else None)

    def _expr(self, tree, name: str):
        if isinstance(tree, ast.Constant) and type(tree.value) is int:
            return tree.value
        if isinstance(tree, ast.Name):
            return self._symbol(tree.id, name)
        if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.USub):
            inner = self._expr(tree.operand, name)
            return None if inner is None else -inner
        if isinstance(tree, ast.BinOp) and type(tree.op) in _OPS:
            a, b = self._expr(tree.left, name), self._expr(tree.right, name)
            return None if a is None or b is None else _OPS[type(tree.op)](a, b)
        return None

    def _symbol(self, symbol: str, name: str):
        if symbol not in self.symbols:
            if m := _BACKED.fullmatch(symbol):
                self.symbols[symbol] = self._backed(int(m[1]))
            elif m := _UNBACKED.fullmatch(symbol):
                self.symbols[symbol] = self._unbacked(symbol, int(m[1]), name)
            else:
                return None
        return self.symbols[symbol]

    def _backed(self, index: int):
        """A backed size symbol ``s<index>`` of at least 2 (0 and 1 are specialised, as in
        export), with a hint: a distinct prime above 1000 for each, so that the guards
        propagation evaluates on hints find no two sizes, nor a size and a model dimension,
        equal."""
        symbol = make_symbol(SymT.SIZE, index, positive=True, integer=True)
        self.hints[symbol] = sympy.nextprime(max(self.hints.values(), default=1000))
        add_hint = getattr(self.env, "add_backed_var_to_val", None) or self.env.add_var_to_val
        add_hint(symbol, self.hints[symbol])
        self.env.var_to_range[symbol] = ValueRanges(2, int_oo)
        if isinstance(getattr(self.env, "unique_ids", None), set):
            self.env.unique_ids.add(index)   # a symbol created later is not named the same
        return symbol

    def _unbacked(self, symbol: str, index: int, name: str):
        """Unbacked sizes are numbered by the ShapeEnv as they are made: make them up to
        ``u<index>`` (those not recorded stay unused, as in the compiled graph)."""
        if index > MAX_UNBACKED:
            raise ArtifactFormatError(self.where, f"input {name!r}: size symbol {symbol} is numbered "
                                      f"beyond {MAX_UNBACKED}")
        while symbol not in self.unbacked:
            made = self.env.create_unbacked_symint().node.expr
            if int(str(made)[1:]) > index:
                raise ArtifactFormatError(self.where, f"input {name!r}: size symbol {symbol} is numbered "
                                          f"before {made}, which this ShapeEnv makes first")
            self.unbacked[str(made)] = made
        return self.unbacked[symbol]
