"""aten ops: a standard-domain spelling from the table ``ATEN`` where one is exact, else a node
of the "aten" domain named after the op (+ attribute "overload"). Python arithmetic on
symbolic ints (``operator.mul``, ...) likewise, from ``PYTHON``.

A handler ``(g, n, a)`` gets the node's arguments by schema name in ``a``. It returns False,
having emitted nothing, where the arguments fall outside what its ONNX op expresses exactly;
the node then goes to the "aten" domain instead. The shape and indexing handlers are in
aten_shape_ops.py (``SHAPE_OPS``)."""

from __future__ import annotations

import functools
import operator

import onnx
import torch
from onnx import TensorProto
from torch import fx

from fusegen.onnx_view.aten_shape_ops import SHAPE_OPS
from fusegen.onnx_view.custom_domain import bind, custom_node, positional
from fusegen.onnx_view.graph import OnnxGraph
from fusegen.onnx_view.values import (ATEN_DOMAIN, DTYPES, OPSET, dtype_of, meta_val, onnx_dtype,
                                      scalar_dtype)

aten = torch.ops.aten


def aten_op(g: OnnxGraph, n: fx.Node) -> None:
    """A call of an OpOverload outside the fusegen namespace."""
    target = n.target
    bound = bind(target, n.args, n.kwargs)
    handler = ATEN.get(target)
    if handler is not None and _standard_ok(n) and handler(g, n, {k: v for k, v, _ in bound}):
        return
    base = target._schema.name.split("::")[-1]
    overload = None if target._overloadname == "default" else target._overloadname
    custom_node(g, n, ATEN_DOMAIN, base, bound, target._schema, overload=overload)


def python_op(g: OnnxGraph, n: fx.Node) -> None:
    """A call of a plain Python function (``operator.mul`` on symbolic ints, ...)."""
    handler = PYTHON.get(n.target)
    if handler is not None and handler(g, n):
        return
    custom_node(g, n, ATEN_DOMAIN, getattr(n.target, "__name__", str(n.target)), positional(n))


def _standard_ok(n: fx.Node) -> bool:
    """Standard-domain spellings are only used where every value has an ONNX type."""
    v = n.meta.get("val")
    vals = v if isinstance(v, (list, tuple)) else [v]
    return all(dtype_of(x) in DTYPES for x in vals) and all(
        dtype_of(a) in DTYPES for a in n.all_input_nodes)


def _result_type(x, y) -> torch.dtype | None:
    """The dtype PyTorch computes ``x op y`` in (0-d tensors and Python scalars promote less)."""
    proxies = []
    for arg in (x, y):
        v = meta_val(arg)
        if isinstance(v, torch.Tensor):
            proxies.append(torch.empty([1] * min(v.dim(), 1), dtype=v.dtype))
        elif scalar_dtype(v) is not None:  # a Python number of that kind
            proxies.append({torch.bool: True, torch.int64: 1, torch.float64: 1.0}[scalar_dtype(v)])
        else:
            return None
    if not any(isinstance(p, torch.Tensor) for p in proxies):
        return None
    return torch.result_type(*proxies)


@functools.cache
def _supports(op_type: str, dtype: torch.dtype | None) -> bool:
    """Whether the standard op (at OPSET) takes ``dtype`` for its first input: Cos has no
    bfloat16, Sqrt no int64, ..."""
    if dtype not in DTYPES:
        return False
    schema = onnx.defs.get_schema(op_type, OPSET)
    param = schema.inputs[0].type_str
    allowed = next((c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == param), [param])
    return f"tensor({TensorProto.DataType.Name(DTYPES[dtype]).lower()})" in allowed


def _unary(op_type: str):
    def handler(g, n, a):
        if not _supports(op_type, dtype_of(n)):
            return False
        g.emit(n, op_type, [g.operand(n, a["self"], dtype_of(n))], [g.out(n)])
        return True
    return handler


_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}


def _binary(op_type: str, second: str = "other", negate: bool = False):
    def handler(g, n, a):
        if a.get("alpha", 1) != 1 or a.get("rounding_mode") is not None:
            return False
        x, y = a["self"], a[second]
        compute = _result_type(x, y)
        if op_type == "Div" and compute is not None and not compute.is_floating_point:
            compute = dtype_of(n)  # true division of integers computes in the float result dtype
        expected = torch.bool if op_type in _COMPARISONS else compute
        if not _supports(op_type, compute) or dtype_of(n) != expected:
            return False
        inputs = [g.operand(n, x, compute), g.operand(n, y, compute)]
        if negate:
            inputs = g.emit(n, op_type, inputs, 1)
        g.emit(n, "Not" if negate else op_type, inputs, [g.out(n)])
        return True
    return handler


def _silu(g, n, a):
    if not _supports("Sigmoid", dtype_of(n)):
        return False
    x = g.operand(n, a["self"], dtype_of(n))
    g.emit(n, "Mul", [x, g.emit(n, "Sigmoid", [x], 1)[0]], [g.out(n)])
    return True


def _rsqrt(g, n, a):
    if not _supports("Sqrt", dtype_of(n)):
        return False
    x = g.operand(n, a["self"], dtype_of(n))
    g.emit(n, "Reciprocal", g.emit(n, "Sqrt", [x], 1), [g.out(n)])
    return True


def _gelu(g, n, a):
    if not _supports("Gelu", dtype_of(n)):
        return False
    g.emit(n, "Gelu", [g.value(a["self"])], [g.out(n)], approximate=a["approximate"])
    return True


def _cast(g, n, a):
    g.emit(n, "Cast", [g.value(a["self"])], [g.out(n)], to=onnx_dtype(dtype_of(n)))
    return True


def _logical(op_type: str):
    """and / or / not of bool tensors (other dtypes are bitwise: not these ops)."""
    def handler(g, n, a):
        args = [a["self"]] + ([a["other"]] if "other" in a else [])
        if any(not isinstance(x, fx.Node) or dtype_of(x) != torch.bool for x in args):
            return False
        g.emit(n, op_type, [g.value(x) for x in args], [g.out(n)])
        return True
    return handler


def _arange(g, n, a):
    """Integer arange as Range (ONNX computes start + i * delta in the output type)."""
    dtype = dtype_of(n)
    bounds = [a.get("start", 0), a["end"], a.get("step", 1)]
    if dtype not in (torch.int64, torch.int32) or any(
            dtype_of(b) != torch.int64 for b in bounds if isinstance(b, fx.Node)) or any(
            isinstance(b, float) for b in bounds):
        return False
    g.emit(n, "Range", [g.operand(n, b, dtype) for b in bounds], [g.out(n)])
    return True


def _where(g, n, a):
    dtype = dtype_of(n)
    if dtype_of(a["condition"]) != torch.bool or _result_type(a["self"], a["other"]) != dtype:
        return False
    inputs = [g.value(a["condition"]), g.operand(n, a["self"], dtype), g.operand(n, a["other"], dtype)]
    g.emit(n, "Where", inputs, [g.out(n)])
    return True


def _masked_fill(g, n, a):
    dtype = dtype_of(n)
    if dtype_of(a["mask"]) != torch.bool:
        return False
    inputs = [g.value(a["mask"]), g.operand(n, a["value"], dtype), g.value(a["self"])]
    g.emit(n, "Where", inputs, [g.out(n)])
    return True


def _softmax(op_type: str):
    def handler(g, n, a):  # dtype / half_to_float: the input is cast to the output dtype first
        if not _supports(op_type, dtype_of(n)):
            return False
        g.emit(n, op_type, [g.operand(n, a["self"], dtype_of(n))], [g.out(n)], axis=a["dim"])
        return True
    return handler


def _reduce(op_type: str):
    def handler(g, n, a):
        if not _supports(op_type, dtype_of(n)):
            return False
        dims = a.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        inputs = [g.operand(n, a["self"], dtype_of(n))]
        if dims:
            inputs.append(g.const(dims, torch.int64))
        g.emit(n, op_type, inputs, [g.out(n)], keepdims=int(bool(a.get("keepdim", False))))
        return True
    return handler


def _layer_norm(g, n, a):
    x, weight, bias = a["input"], a["weight"], a["bias"]
    if weight is None or not _supports("LayerNormalization", dtype_of(x)) or any(
            dtype_of(t) != dtype_of(x) for t in (weight, bias) if t is not None):
        return False
    inputs = [g.value(x), g.value(weight)] + ([g.value(bias)] if bias is not None else [])
    g.emit(n, "LayerNormalization", inputs, [g.out(n)], axis=-len(a["normalized_shape"]),
           epsilon=float(a["eps"]))
    return True


def _linear(g, n, a):
    """y = x @ W^T + b: Gemm(transB=1) for 2-D x, else Transpose + MatMul (+ Add)."""
    x, weight, bias = a["input"], a["weight"], a["bias"]
    if meta_val(weight).dim() != 2 or not _supports("MatMul", dtype_of(n)):
        return False
    if meta_val(x).dim() == 2:
        inputs = [g.value(x), g.value(weight)] + ([g.value(bias)] if bias is not None else [])
        g.emit(n, "Gemm", inputs, [g.out(n)], transB=1)
        return True
    w_t = g.emit(n, "Transpose", [g.value(weight)], 1, perm=[1, 0])[0]
    if bias is None:
        g.emit(n, "MatMul", [g.value(x), w_t], [g.out(n)])
    else:
        product = g.emit(n, "MatMul", [g.value(x), w_t], 1)[0]
        g.emit(n, "Add", [product, g.value(bias)], [g.out(n)])
    return True


def _addmm(g, n, a):
    if not _supports("Gemm", dtype_of(n)):
        return False
    inputs = [g.value(a["mat1"]), g.value(a["mat2"]), g.value(a["self"])]
    g.emit(n, "Gemm", inputs, [g.out(n)], alpha=float(a["alpha"]), beta=float(a["beta"]))
    return True


def _matmul(g, n, a):
    if not _supports("MatMul", dtype_of(n)):
        return False
    g.emit(n, "MatMul", [g.value(a["self"]), g.value(a.get("other", a.get("mat2")))], [g.out(n)])
    return True


ATEN = {
    **{op: _binary(t) for op, t in [
        (aten.add.Tensor, "Add"), (aten.add.Scalar, "Add"), (aten.sub.Tensor, "Sub"), (aten.sub.Scalar, "Sub"),
        (aten.mul.Tensor, "Mul"), (aten.mul.Scalar, "Mul"), (aten.div.Tensor, "Div"), (aten.div.Scalar, "Div"),
        (aten.div.Tensor_mode, "Div"), (aten.maximum.default, "Max"), (aten.minimum.default, "Min"),
        (aten.eq.Tensor, "Equal"), (aten.eq.Scalar, "Equal"), (aten.lt.Tensor, "Less"), (aten.lt.Scalar, "Less"),
        (aten.le.Tensor, "LessOrEqual"), (aten.le.Scalar, "LessOrEqual"), (aten.gt.Tensor, "Greater"),
        (aten.gt.Scalar, "Greater"), (aten.ge.Tensor, "GreaterOrEqual"), (aten.ge.Scalar, "GreaterOrEqual")]},
    aten.ne.Tensor: _binary("Equal", negate=True), aten.ne.Scalar: _binary("Equal", negate=True),
    aten.pow.Tensor_Scalar: _binary("Pow", "exponent"), aten.pow.Tensor_Tensor: _binary("Pow", "exponent"),
    **{op: _unary(t) for op, t in [
        (aten.neg.default, "Neg"), (aten.exp.default, "Exp"), (aten.log.default, "Log"),
        (aten.sqrt.default, "Sqrt"), (aten.tanh.default, "Tanh"), (aten.sin.default, "Sin"),
        (aten.cos.default, "Cos"), (aten.sigmoid.default, "Sigmoid"), (aten.relu.default, "Relu"),
        (aten.abs.default, "Abs"), (aten.erf.default, "Erf"), (aten.reciprocal.default, "Reciprocal"),
        (aten.floor.default, "Floor"), (aten.ceil.default, "Ceil")]},
    aten.rsqrt.default: _rsqrt, aten.silu.default: _silu,
    aten.gelu.default: _gelu,
    aten.to.dtype: _cast, aten.to.dtype_layout: _cast, aten.to.device: _cast, aten._to_copy.default: _cast,
    **{op: _logical(t) for op, t in [
        (aten.logical_and.default, "And"), (aten.bitwise_and.Tensor, "And"), (aten.__and__.Tensor, "And"),
        (aten.logical_or.default, "Or"), (aten.bitwise_or.Tensor, "Or"), (aten.__or__.Tensor, "Or"),
        (aten.logical_not.default, "Not"), (aten.bitwise_not.default, "Not")]},
    aten.arange.default: _arange, aten.arange.start: _arange, aten.arange.start_step: _arange,
    aten.where.self: _where, aten.masked_fill.Scalar: _masked_fill, aten.masked_fill.Tensor: _masked_fill,
    aten.softmax.int: _softmax("Softmax"), aten._softmax.default: _softmax("Softmax"),
    aten.log_softmax.int: _softmax("LogSoftmax"), aten._log_softmax.default: _softmax("LogSoftmax"),
    aten.mean.dim: _reduce("ReduceMean"), aten.sum.dim_IntList: _reduce("ReduceSum"),
    aten.sum.default: _reduce("ReduceSum"), aten.amax.default: _reduce("ReduceMax"),
    aten.amin.default: _reduce("ReduceMin"),
    aten.layer_norm.default: _layer_norm, aten.linear.default: _linear, aten.addmm.default: _addmm,
    aten.matmul.default: _matmul, aten.mm.default: _matmul, aten.bmm.default: _matmul,
    **SHAPE_OPS,
}


def _python_arith(op_type: str):
    """Symbolic-int arithmetic (``s0 * s1``) as int64 (or double) scalar ops."""
    def handler(g, n):
        dtype = dtype_of(n)
        if dtype not in (torch.int64, torch.float64) or n.kwargs:
            return False
        g.emit(n, op_type, [g.operand(n, x, dtype) for x in n.args], [g.out(n)])
        return True
    return handler


PYTHON = {operator.add: _python_arith("Add"), operator.sub: _python_arith("Sub"),
          operator.mul: _python_arith("Mul"), operator.neg: _python_arith("Neg")}
