"""fusegen's JSON IR: an optimized fx graph as plain data, and back.

An artifact stores its graph in this form so that loading it runs no stored Python and no
pickle. Every node is one JSON object::

    {"name": "linear_3", "op": "call_function", "target": {"op": "aten::linear.default"},
     "args": [{"node": "reshape_2"}, {"node": "m_model_layers_0_self_attn_o_proj_weight"}],
     "kwargs": {}, "shape": {"dtype": "float32", "shape": ["s43", "s53", 64]},
     "made_by": "capture"}

Targets are resolved against allow-lists only: registered operator overloads of the
``aten``, ``prims`` and ``fusegen`` namespaces (and the collectives of ``COLLECTIVES``), the
pure functions of ``operator`` and ``math`` and torch's symbolic-int helpers, and
``FusedGroup`` submodules (whose graphs are
stored the same way, nested). ``get_attr`` targets name tensors, which travel separately
(safetensors). Argument values are JSON scalars, lists, and tagged objects for tuples,
dicts, dtypes, devices, memory formats, layouts, slices and non-finite floats. Anything
else is refused when the graph is written, not discovered when it is read.
"""

from __future__ import annotations

import keyword
import math
import operator
from typing import Any, Callable

import torch
from torch import fx

from fusegen.errors import ArtifactFormatError
from fusegen.fused_group import FusedGroup
from fusegen.passes.infra import PROVENANCE

IR_VERSION = 1
SHAPE = "fusegen_shape"   # node.meta key of a rebuilt node: its recorded dtype and shape (text)
OP_NAMESPACES = ("aten", "prims", "fusegen")
# Ops that reach outside the tensors they are given (files, printing, the process): a graph
# never needs them, and a stored graph must not be able to name them.
DENIED_OPS = {"from_file", "save", "_print", "_async_error", "_assert_async", "_assert_scalar",
              "_functional_assert_async", "_functional_assert_scalar", "_functional_sym_constrain_range"}
# String arguments an allowed op may take (a mode, never a path).
STRING_ARGS = {"approximate", "rounding_mode", "reduce", "side", "indexing", "interpolation",
               "padding_mode", "mode", "ord", "equation", "weight_format"}
# The collectives of a tensor-parallel rank's graph (passes/shard_tensor_parallel.py), and the
# strings they take: a reduction and the name of a process group (fusegen.load names its own).
COLLECTIVES = {"_c10d_functional": {"all_reduce", "all_gather_into_tensor", "wait_tensor"}}
COLLECTIVE_STRING_ARGS = {"reduce_op", "group_name"}

_FUNCTIONS: dict[str, Callable] = {
    **{f"operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos",
        "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert",
        "lshift", "rshift")},
    **{f"math.{name}": getattr(math, name) for name in ("ceil", "floor", "sqrt", "trunc")},
    **{f"torch.{name}": getattr(torch, name) for name in (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite")
       if hasattr(torch, name)},
}
_FUNCTION_NAMES = {fn: name for name, fn in _FUNCTIONS.items()}
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_MEMORY_FORMATS = {name: getattr(torch, name) for name in (
    "contiguous_format", "channels_last", "channels_last_3d", "preserve_format")}
_LAYOUTS = {name: getattr(torch, name) for name in ("strided", "sparse_coo")}


# --- writing ----------------------------------------------------------------------------------

def graph_to_ir(gm: fx.GraphModule) -> dict:
    """The graph of ``gm`` (and of its FusedGroups, nested) as JSON-ready data."""
    modules = {}
    nodes = []
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "target": _target_to_ir(gm, node, modules),
                 "args": [_value_to_ir(a, node) for a in node.args], "kwargs": _value_to_ir(dict(node.kwargs), node)}
        shape = shape_record(node.meta.get("val")) if "val" in node.meta else node.meta.get(SHAPE)
        if shape is not None:
            entry["shape"] = shape
        if node.meta.get(PROVENANCE):
            entry["made_by"] = node.meta[PROVENANCE]
        nodes.append(entry)
    return {"ir_version": IR_VERSION, "nodes": nodes, "modules": modules}


def graph_tensors(gm: fx.GraphModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor a get_attr of ``gm`` (or of its FusedGroups) reads, by qualified name."""
    tensors = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise ArtifactFormatError("graph", f"get_attr {node.target!r} is a "
                                          f"{type(value).__name__}, not a tensor")
            tensors[prefix + node.target] = value
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, FusedGroup):
                tensors.update(graph_tensors(module.reference, f"{prefix}{node.target}.reference."))
    return tensors


def _get_attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _target_to_ir(gm: fx.GraphModule, node: fx.Node, modules: dict):
    if node.op in ("placeholder", "get_attr", "output"):
        return node.target
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, FusedGroup):
            raise ArtifactFormatError("graph", f"node {node.name!r} calls a {type(module).__name__} "
                                      f"submodule; only FusedGroup submodules can be stored")
        modules[node.target] = {"kind": "FusedGroup", "name": module.name, "schedule": module.schedule,
                                "graph": graph_to_ir(module.reference)}
        if hasattr(module, "frame"):   # what codegen needs to generate the group's kernel again
            lead, n = module.frame
            modules[node.target].update(frame=[[str(d) for d in lead], int(n)],
                                        input_layouts=list(module.input_layouts),
                                        output_layouts=list(module.output_layouts))
        return {"module": node.target}
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target.namespace not in OP_NAMESPACES and target._opname not in COLLECTIVES.get(target.namespace, ()):
                raise ArtifactFormatError("graph", f"node {node.name!r}: op namespace "
                                          f"{target.namespace!r} cannot be stored")
            return {"op": f"{target.namespace}::{target._opname}.{target._overloadname}"}
        if target in _FUNCTION_NAMES:
            return {"fn": _FUNCTION_NAMES[target]}
    raise ArtifactFormatError("graph", f"node {node.name!r} ({node.op} {node.target!r}) cannot be stored")


def value_to_json(value):
    """A plain value (no graph nodes: e.g. compile facts) as JSON-ready data."""
    return _value_to_ir(value, None)


def value_from_json(value, where: str):
    """Inverse of ``value_to_json``; malformed data raises ArtifactFormatError naming ``where``."""
    return _value_from_ir(value, {}, None, where, "-")


def _value_to_ir(value, node: fx.Node | None):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [_value_to_ir(v, node) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_value_to_ir(v, node) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): _value_to_ir(v, node) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_value_to_ir(v, node) for v in (value.start, value.stop, value.step)]}
    where = f"node {node.name!r}: argument" if node is not None else "value"
    raise ArtifactFormatError("graph", f"{where} of type {type(value).__name__} cannot be stored")


def shape_record(val):
    """Shape and dtype of a node's value (dims as ints or their symbolic expression's text)."""
    if isinstance(val, torch.Tensor):
        return {"dtype": str(val.dtype).removeprefix("torch."),
                "shape": [d if isinstance(d, int) else str(d) for d in val.shape]}
    if isinstance(val, (list, tuple)):
        return {"items": [shape_record(v) for v in val]}
    if isinstance(val, torch.SymInt):
        return {"symint": str(val)}
    if isinstance(val, int) and not isinstance(val, bool):
        return {"int": val}
    return None


# --- reading ----------------------------------------------------------------------------------

def ir_to_graph_module(ir: dict, tensors: dict[str, torch.Tensor], device: torch.device | None = None,
                       where: str = "graph.json", prefix: str = "") -> fx.GraphModule:
    """Rebuild the GraphModule from ``graph_to_ir`` data and its get_attr tensors. ``device``
    rewrites device arguments (factory ops) when the graph is loaded onto another device.
    A FusedGroup's tensors are named ``<group>.reference.<target>`` (see ``graph_tensors``)."""
    if not isinstance(ir, dict) or ir.get("ir_version") != IR_VERSION:
        found = ir.get("ir_version") if isinstance(ir, dict) else type(ir).__name__
        raise ArtifactFormatError(where, f"IR version {found!r}, this fusegen reads {IR_VERSION}")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    for entry in _field(ir, "nodes", list, where):
        name, op = _field(entry, "name", str, where), _field(entry, "op", str, where)
        args = _value_from_ir(entry.get("args", []), env, device, where, name)
        kwargs = _value_from_ir(entry.get("kwargs", {}), env, device, where, name)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ArtifactFormatError(where, f"node {name!r}: malformed args or kwargs")
        # fx turns names into Python source it executes: only plain identifiers get there.
        if not all(_identifier(k) for k in kwargs):
            raise ArtifactFormatError(where, f"node {name!r}: keyword names {sorted(map(str, kwargs))!r} "
                                      f"are not all identifiers")
        target = entry.get("target")
        if op in ("placeholder", "get_attr", "output"):
            if not _identifier(target, dotted=op == "get_attr"):
                raise ArtifactFormatError(where, f"node {name!r}: malformed target {target!r}")
            if op == "get_attr":
                if prefix + target not in tensors:
                    raise ArtifactFormatError(where, f"node {name!r} reads tensor {prefix + target!r}, "
                                              f"which the weights do not hold")
                root[target] = tensors[prefix + target]
                _check_tensor(root[target], entry.get("shape"), prefix + target, where)
        elif op == "call_function":
            target = _resolve_function(target, where, name)
        elif op == "call_module":
            key = _field(target, "module", str, where)
            if not _identifier(key):
                raise ArtifactFormatError(where, f"node {name!r}: module name {key!r} is not an identifier")
            spec = _field(ir.get("modules", {}), key, dict, where)
            if spec.get("kind") != "FusedGroup":
                raise ArtifactFormatError(where, f"module {key!r} of kind {spec.get('kind')!r} is unknown")
            reference = ir_to_graph_module(spec.get("graph"), tensors, device, where, f"{prefix}{key}.reference.")
            root[key] = _fused_group(spec, reference, where)
            target = key
        else:
            raise ArtifactFormatError(where, f"node {name!r} has unknown opcode {op!r}")
        node = graph.create_node(op, target, tuple(args), kwargs, name=name)
        if node.name != name:
            raise ArtifactFormatError(where, f"node name {name!r} is repeated or not an identifier")
        if entry.get("made_by"):
            node.meta[PROVENANCE] = entry["made_by"]
        if "shape" in entry:
            node.meta[SHAPE] = entry["shape"]
        env[name] = node
    if sum(n.op == "output" for n in graph.nodes) != 1:
        raise ArtifactFormatError(where, "the graph needs exactly one output node")
    try:
        graph.lint()
    except Exception as e:  # a dangling or reordered reference: the IR was edited
        raise ArtifactFormatError(where, f"the graph does not verify: {e}") from None
    try:
        return fx.GraphModule(root, graph)
    except Exception as e:  # fx cannot write its code: e.g. an operator node lost its operands
        raise ArtifactFormatError(where, f"the graph does not build ({type(e).__name__}: {e})") from None


def _identifier(name, dotted: bool = False) -> bool:
    """A Python identifier (or, ``dotted``, a path of them: an attribute target)."""
    parts = name.split(".") if isinstance(name, str) and dotted else [name]
    return all(isinstance(p, str) and ((p.isidentifier() and not keyword.iskeyword(p))
                                       or (dotted and p.isdigit())) for p in parts)


def _check_tensor(tensor: torch.Tensor, shape, name: str, where: str) -> None:
    """A weight must have the dtype and static shape the graph was traced with."""
    if not isinstance(shape, dict) or not isinstance(tensor, torch.Tensor):
        return
    dtype = str(tensor.dtype).removeprefix("torch.")
    dims = shape.get("shape")
    if shape.get("dtype") != dtype or (isinstance(dims, list) and all(isinstance(d, int) for d in dims)
                                       and list(tensor.shape) != dims):
        raise ArtifactFormatError(where, f"tensor {name!r} is {dtype} {list(tensor.shape)}, the graph "
                                  f"reads {shape.get('dtype')} {dims}")


def _fused_group(spec: dict, reference: fx.GraphModule, where: str) -> FusedGroup:
    schedule = _field(spec, "schedule", str, where)
    if schedule not in ("pointwise", "row"):
        raise ArtifactFormatError(where, f"fused group schedule {schedule!r} is unknown")
    group = FusedGroup(_field(spec, "name", str, where), reference, schedule)
    if "frame" in spec:
        frame = spec["frame"]
        ok = (isinstance(frame, list) and len(frame) == 2 and isinstance(frame[0], list)
              and all(isinstance(d, str) for d in frame[0]) and isinstance(frame[1], int) and frame[1] > 0)
        layouts = [spec.get("input_layouts"), spec.get("output_layouts")]
        ok = ok and all(isinstance(l, list) and all(x in ("row", "col", "broadcast") for x in l)
                        for l in layouts)
        if not ok:
            raise ArtifactFormatError(where, f"fused group {group.name!r}: malformed frame or layouts")
        group.frame = (tuple(frame[0]), frame[1])
        group.input_layouts, group.output_layouts = layouts
    return group


def _field(obj, key, kind, where):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise ArtifactFormatError(where, f"missing or malformed field {key!r}")
    return value


def _resolve_function(target, where: str, node: str) -> Callable:
    if isinstance(target, dict) and isinstance(target.get("fn"), str):
        fn = _FUNCTIONS.get(target["fn"])
        if fn is None:
            raise ArtifactFormatError(where, f"node {node!r}: function {target['fn']!r} is not allowed")
        return fn
    if isinstance(target, dict) and isinstance(target.get("op"), str):
        qualified = target["op"]
        namespace, _, rest = qualified.partition("::")
        opname, _, overload = rest.rpartition(".")
        collective = opname in COLLECTIVES.get(namespace, ())
        if (namespace not in OP_NAMESPACES and not collective) or not opname or not overload:
            raise ArtifactFormatError(where, f"node {node!r}: op {qualified!r} is not allowed")
        try:
            op = getattr(getattr(getattr(torch.ops, namespace), opname), overload)
        except (AttributeError, RuntimeError):
            raise ArtifactFormatError(where, f"node {node!r}: op {qualified!r} does not exist in "
                                      f"torch {torch.__version__}") from None
        strings = {a.name for a in op._schema.arguments if str(a.type) in ("str", "Optional[str]")}
        if opname in DENIED_OPS or strings - STRING_ARGS - (COLLECTIVE_STRING_ARGS if collective else set()):
            raise ArtifactFormatError(where, f"node {node!r}: op {qualified!r} is not allowed in a "
                                      f"stored graph")
        return op
    raise ArtifactFormatError(where, f"node {node!r}: malformed call target {target!r}")


def _value_from_ir(value, env: dict, device, where: str, node: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_value_from_ir(v, env, device, where, node) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag in ("node", "float", "dtype", "device", "memory_format", "layout") and not isinstance(body, str):
            raise ArtifactFormatError(where, f"node {node!r}: malformed argument {value!r}")
        if tag == "device" and device is None:
            try:
                return torch.device(body)
            except RuntimeError:
                raise ArtifactFormatError(where, f"node {node!r}: {body!r} is not a device") from None
        if tag == "node":
            if body not in env:
                raise ArtifactFormatError(where, f"node {node!r} uses {body!r} before it is defined")
            return env[body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(_value_from_ir(v, env, device, where, node) for v in body)
        if tag == "dict" and isinstance(body, dict):
            return {k: _value_from_ir(v, env, device, where, node) for k, v in body.items()}
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag == "dtype" and body in _DTYPES:
            return _DTYPES[body]
        if tag == "device" and isinstance(body, str):
            return device if device is not None else torch.device(body)
        if tag == "memory_format" and body in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[body]
        if tag == "layout" and body in _LAYOUTS:
            return _LAYOUTS[body]
        if tag == "slice" and isinstance(body, list) and len(body) == 3:
            return slice(*(_value_from_ir(v, env, device, where, node) for v in body))
    raise ArtifactFormatError(where, f"node {node!r}: malformed argument {value!r}")
