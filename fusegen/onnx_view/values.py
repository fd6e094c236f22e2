"""Values of the ONNX graph: opset and domains, element types, (symbolic) shapes, value_info,
raw tensor bytes and node attributes."""

from __future__ import annotations

import onnx
import torch
from onnx import AttributeProto, TensorProto, helper
from torch import fx

OPSET = 20  # Gelu needs 20; every onnx the project allows (>= 1.15) knows it
FUSEGEN_DOMAIN = "fusegen"
ATEN_DOMAIN = "aten"

DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.int16: TensorProto.INT16,
    torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8, torch.bool: TensorProto.BOOL,
    torch.complex64: TensorProto.COMPLEX64, torch.complex128: TensorProto.COMPLEX128,
    torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN, torch.float8_e5m2: TensorProto.FLOAT8E5M2,
}


def onnx_dtype(dtype: torch.dtype, what: str = "a value") -> int:
    if dtype not in DTYPES:
        raise ValueError(f"to_onnx: {what} has dtype {dtype}, which has no ONNX element type")
    return DTYPES[dtype]


def onnx_dim(d):
    """A dim as an int, or a symbolic one as its expression's string (an ONNX dim_param)."""
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if expr.is_number else str(expr)
    return int(d)


def value_info(name: str, v) -> onnx.ValueInfoProto | None:
    """Type of one value: a tensor, or a scalar for a symbolic int / float / bool."""
    if isinstance(v, torch.Tensor):
        if v.dtype not in DTYPES:
            return None
        return helper.make_tensor_value_info(name, DTYPES[v.dtype], [onnx_dim(d) for d in v.shape])
    scalar = scalar_dtype(v)
    return helper.make_tensor_value_info(name, DTYPES[scalar], []) if scalar else None


def tensor_info(name: str, t: torch.Tensor) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(t.dtype, name), list(t.shape))


def scalar_dtype(v) -> torch.dtype | None:
    if isinstance(v, (bool, torch.SymBool)):
        return torch.bool
    if isinstance(v, (int, torch.SymInt)):
        return torch.int64
    if isinstance(v, (float, torch.SymFloat)):
        return torch.float64
    return None


def meta_val(arg):
    """A node's ``meta["val"]``; any other argument as it is."""
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def dtype_of(arg) -> torch.dtype | None:
    v = meta_val(arg)
    return v.dtype if isinstance(v, torch.Tensor) else scalar_dtype(v)


def tensor_bytes(t: torch.Tensor):
    """The tensor's bytes in ONNX raw layout (row-major, little-endian), as a numpy uint8 array."""
    if t.device.type == "meta":
        raise ValueError("to_onnx: a get_attr tensor is on the meta device (no data); use weights=False")
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def to_attribute(key: str, value) -> AttributeProto | None:
    """A node attribute (bools as 0/1, lists as INTS / FLOATS / STRINGS); None for None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return helper.make_attribute(key, int(value))
    if isinstance(value, (int, float, str, onnx.GraphProto, TensorProto)):
        return helper.make_attribute(key, value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (bool, int)) for v in value):
            return helper.make_attribute(key, [int(v) for v in value], attr_type=AttributeProto.INTS)
        if all(isinstance(v, (bool, int, float)) for v in value):
            return helper.make_attribute(key, [float(v) for v in value], attr_type=AttributeProto.FLOATS)
        return helper.make_attribute(key, [str(v) for v in value], attr_type=AttributeProto.STRINGS)
    return helper.make_attribute(key, str(value))
