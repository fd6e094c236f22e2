"""Pass machinery: the result type, the decorator that declares a pass's contract, node
provenance, the verifier run after every pass, and symbolic shape propagation.

A pass is ``fn(gm, ctx) -> PassResult``. It rewrites ``gm`` in place: the pipeline owns the
graph it hands to passes (capture made it fresh), so no caller holds a copy that could be
surprised. ``ctx`` carries the CompileConfig and the data some passes need (calibration
tokens). ``ensures`` checks the invariants the pass promises, after it ran.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import fx
from torch._guards import detect_fake_mode

from fusegen.config import CompileConfig
from fusegen.errors import GraphRefusedError, VerificationError
from fusegen.fused_group import FusedGroup

if TYPE_CHECKING:
    from fusegen.distributed import TPGroup

PROVENANCE = "fusegen_pass"  # node.meta key: which pass (or "capture") made the node


@dataclass
class PassContext:
    config: CompileConfig = field(default_factory=CompileConfig)
    # [N, S] int64 token ids some passes calibrate on (e.g. convert_mha_to_gqa).
    calibration_ids: Optional[torch.Tensor] = None
    # This process's rank among config.tp (shard_tensor_parallel); None when tp=1.
    tp_group: Optional["TPGroup"] = None
    # Free-form facts passes hand to later passes and to the runtime (e.g. model geometry).
    facts: dict = field(default_factory=dict)
    # What a lossy pass changed that the compile-time check's reference must change too, by
    # parameter name of the user's model (quantize_weights: a weight's AWQ input scale). Not
    # part of the compiled model.
    reference_changes: dict = field(default_factory=dict)


@dataclass
class PassResult:
    gm: fx.GraphModule
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphPass:
    name: str
    fn: Callable[[fx.GraphModule, PassContext], PassResult]
    ensures: Optional[Callable[[fx.GraphModule, PassContext], list[str]]] = None

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.fn(gm, ctx)


def graph_pass(name: str, ensures=None):
    """Declare a pass. ``ensures(gm, ctx)`` returns a list of violated invariants."""

    def wrap(fn):
        return dataclasses.replace(GraphPass(name, fn), ensures=ensures)

    return wrap


# --- provenance -----------------------------------------------------------------------------

def mark_provenance(gm: fx.GraphModule, name: str, before: set[fx.Node] | None = None) -> int:
    """Stamp every node not in ``before`` as made by ``name``; returns how many."""
    made = 0
    for node in gm.graph.nodes:
        if (before is None or node not in before) and PROVENANCE not in node.meta:
            node.meta[PROVENANCE] = name
            made += 1
    return made


# --- refusals -------------------------------------------------------------------------------

def module_path(node: fx.Node | None) -> str:
    """The innermost module of the user's model that made ``node``: "module 'model.layers.0.self_attn'
    (LlamaAttention)"; the capture wrapper's own prefix is dropped."""
    stack = node.meta.get("nn_module_stack") if isinstance(node, fx.Node) else None
    if not stack:
        return f"node {node.name}" if isinstance(node, fx.Node) else "the graph"
    path, cls = list(stack.values())[-1]
    path = path[2:] if path.startswith("m.") else "<root>" if path in ("", "m") else path
    name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f"module '{path}' ({name})"


def refusal(pass_name: str, reason: str, at: fx.Node | fx.GraphModule,
            works: str = "preset=stateless") -> GraphRefusedError:
    """The error a pass raises when it cannot rewrite the model's graph: it names the model
    class (recorded by capture), where in the model the refused node ``at`` comes from, and a
    config that works for this model."""
    gm = at.graph.owning_module if isinstance(at, fx.Node) else at
    model_class = (gm.meta.get("fusegen_model_class") if gm is not None else None) or "the model"
    return GraphRefusedError(pass_name, model_class, module_path(at if isinstance(at, fx.Node) else None),
                             reason, works)


# --- shapes ---------------------------------------------------------------------------------

def fake_mode_of(gm: fx.GraphModule):
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def propagate_shapes(gm: fx.GraphModule, reuse: bool = False) -> None:
    """Re-derive every node's FakeTensor ``val`` from the placeholders' (symbolic) ones.

    This is also the strongest check the verifier has: an op called with arguments of the
    wrong shape or dtype fails here, symbolically, before anything runs. With ``reuse``, an
    op called again with arguments of the same shapes, strides and dtypes (the same op of
    the next decoder layer) shares the value it computed the first time instead of running
    again: a 30-layer graph costs about one layer's fake dispatches (fusegen.load)."""
    mode = fake_mode_of(gm)
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    with mode:
        _FakeProp(gm, mode, {} if reuse else None).run(*inputs)


class _FakeProp(fx.Interpreter):
    """Runs the graph on FakeTensors, recording each node's result as ``meta["val"]`` (in
    FusedGroups' graphs too). Attributes (weights) are converted to FakeTensors once.
    ``reused``: results by (op, arguments' metadata), shared with the groups' graphs."""

    def __init__(self, gm: fx.GraphModule, mode, reused: dict | None = None):
        super().__init__(gm)
        self.mode = mode
        self.fakes: dict = {}
        self.reused = reused

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            # Reusing, weights of one shape, stride and dtype share one FakeTensor.
            key = id(value) if self.reused is None else _meta_key(value)
            if key not in self.fakes:
                self.fakes[key] = self.mode.from_tensor(value, static_shapes=True)
            value = self.fakes[key]
        return value

    def call_function(self, target, args, kwargs):
        key = _reuse_key(target, args, kwargs) if self.reused is not None else None
        if key is not None and key in self.reused:
            return self.reused[key]
        symbols = len(self.mode.shape_env.var_to_range) if self.mode.shape_env else 0
        result = super().call_function(target, args, kwargs)
        # An op that made a new (unbacked) size symbol makes another one each call.
        if key is not None and symbols == (len(self.mode.shape_env.var_to_range) if self.mode.shape_env else 0):
            self.reused[key] = result
        return result

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, FusedGroup):
            # The group's own nodes get their values too: codegen reads them.
            return _FakeProp(module.reference, self.mode, self.reused).run(*args)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.op != "output":
            n.meta["val"] = result
        return result


def _reuse_key(target, args, kwargs):
    """What a fake op's result depends on: the op, and its arguments with tensors and sizes
    as their metadata; None where an argument has no such key."""
    try:
        key = (target, _meta_key(args), _meta_key(tuple(kwargs.items())))
        hash(key)
    except TypeError:
        return None
    return key


def _meta_key(value):
    if isinstance(value, torch.Tensor):
        return (torch.Tensor, value.dtype, value.device, _meta_key(tuple(value.shape)),
                _meta_key(value.stride()), _meta_key(value.storage_offset()))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_meta_key(v) for v in value))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return (type(value), value.node.expr)
    return (type(value), value)   # 1, 1.0 and True are one dict key otherwise


def val(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


# --- verification ---------------------------------------------------------------------------

def verify(gm: fx.GraphModule, graph_pass: GraphPass, ctx: PassContext) -> None:
    """Lint, every value-producing node carries a ``val``, the pass's own ``ensures``; with
    ``config.verify_shapes`` also a full symbolic re-run of the graph (slow on big graphs)."""
    try:
        gm.graph.lint()
    except Exception as exc:
        raise VerificationError(graph_pass.name, f"graph lint failed: {exc}") from exc
    missing = [n.name for n in gm.graph.nodes
               if n.op in ("placeholder", "call_function") and "val" not in n.meta and n.users]
    if missing:
        raise VerificationError(graph_pass.name, f"nodes without shape metadata: {missing[:10]}")
    if ctx.config.verify_shapes:
        try:
            propagate_shapes(gm)
        except Exception as exc:
            raise VerificationError(graph_pass.name, f"shape propagation failed: {exc}") from exc
    problems = graph_pass.ensures(gm, ctx) if graph_pass.ensures else []
    if problems:
        raise VerificationError(graph_pass.name, "; ".join(problems))


# --- counting -------------------------------------------------------------------------------

def op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
        return getattr(target, "__name__", str(target))
    return node.op


def node_counts(gm: fx.GraphModule) -> Counter:
    return Counter(op_name(n) for n in gm.graph.nodes)


def call_nodes(gm: fx.GraphModule, *targets) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def add_buffer(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as buffer ``name`` of ``gm`` and read it with a get_attr node placed
    before ``before``, its ``val`` a static-shape FakeTensor of the graph's fake mode."""
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode_of(gm).from_tensor(value, static_shapes=True)
    return node


def erase_unused(gm: fx.GraphModule) -> int:
    """Dead-code elimination that also drops unused get_attr nodes and submodules."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    return before - len(gm.graph.nodes)


# --- graph inputs ---------------------------------------------------------------------------

def placeholders(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}


def fresh_val(gm: fx.GraphModule, shape, dtype: torch.dtype) -> torch.Tensor:
    """A FakeTensor for the graph. ``shape`` entries are ints, SymInts of the graph, or None
    for a fresh symbolic size."""
    mode = fake_mode_of(gm)
    sizes = [mode.shape_env.create_unbacked_symint() if s is None else s for s in shape]
    with mode:
        return torch.empty(sizes, dtype=dtype)


def add_input(gm: fx.GraphModule, name: str, shape, dtype: torch.dtype) -> fx.Node:
    """Append a graph input with a FakeTensor ``val`` (see fresh_val)."""
    fake = fresh_val(gm, shape, dtype)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.meta["val"] = fake
    return node


def refresh_vals(gm: fx.GraphModule, nodes) -> None:
    """Recompute ``meta["val"]`` of ``nodes`` (in graph order) from their inputs' vals: the
    cheap, local alternative to propagate_shapes after a rewrite that changed a few shapes."""
    mode = fake_mode_of(gm)
    wanted = set(nodes)
    fakes: dict[int, torch.Tensor] = {}

    def fake(arg):
        if arg.op == "get_attr":
            value = getattr_path(gm, arg.target)
            if id(value) not in fakes:
                fakes[id(value)] = mode.from_tensor(value, static_shapes=True)
            return fakes[id(value)]
        return arg.meta["val"]

    with mode:
        for node in gm.graph.nodes:
            if node in wanted and node.op == "call_function":
                args = fx.map_arg(node.args, fake)
                kwargs = fx.map_arg(node.kwargs, fake)
                rule = _SHAPE_RULES.get(node.target, node.target)
                node.meta["val"] = rule(*args, **kwargs)


def _linear_shape(x, weight, bias=None):
    # aten.linear's composite decomposition asks for numel() of symbolic tensors on some
    # torch versions; its output shape needs no decomposition.
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_SHAPE_RULES = {torch.ops.aten.linear.default: _linear_shape}


def getattr_path(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
