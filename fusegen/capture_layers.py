"""Capture by layer: export the first few decoder layers, stamp the others from them.

``torch.export`` spends almost all of a compile tracing decoder layers that are the same
code over weights of the same shapes. When a model keeps its layers in one ``ModuleList``,
capture exports the model cut down to its first ``P`` layers and copies ("stamps") a
template layer's nodes for every further layer, reading that layer's own weights:

    exported   embed -> L0 -> L1 -> L2 -> norm -> lm_head            kinds   A B A B A B
    stamped    embed -> L0 -> L1 -> L2 -> L3 -> L4 -> L5 -> norm -> lm_head
                                         =L1   =L2   =L1   (templates: A = L2, B = L1)

Layers are of one kind when their module classes, parameter and buffer shapes and dtypes,
and plain attributes (``sliding_window``, ``attention_type``, ... everything but
``layer_idx``) are equal; Gemma-2's sliding and global layers are two kinds. A template sits
at an index >= 1, so the one value it takes from the layer before (the hidden state) is
known; the other values it reads (rotary tables, masks, sizes) are computed before the first
layer and shared. ``P`` is the fewest layers that give every kind such a template.

Anything that does not have this shape (a layer that reads two values of the layer before,
a node after the layers that reads more than the last layer's output, a layer list that is
not the model's only stack) is refused with ``StampError`` and the whole model is exported
instead; the capture then checks the stamped graph against the full model as it checks any
graph. ``canonical_names`` numbers nodes in graph order, so a stamped graph and the whole
model's graph print the same code.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import fx, nn

# The attribute of the export wrapper (capture._LogitsOnly) that holds the user's model.
WRAPPED = "m"


class StampError(Exception):
    """The captured graph does not have the layer structure stamping needs."""


@dataclass(frozen=True)
class LayerStack:
    """The model's decoder layers: ``parent.<attr>`` is their ModuleList, at ``path``."""
    parent: nn.Module
    attr: str
    path: str
    kinds: tuple[int, ...]      # kinds[i]: the kind of layer i (0, 1, ... in order of first use)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def export_length(self) -> int | None:
        """P: the fewest leading layers in which every kind occurs at an index >= 1 (None when
        that is all of them: nothing to stamp)."""
        need = set(self.kinds)
        for i, kind in enumerate(self.kinds[1:], start=1):
            need.discard(kind)
            if not need:
                return i + 1 if i + 1 < len(self.kinds) else None
        return None

    def template(self, layer: int, exported: int) -> int:
        """The exported layer (index >= 1) layer ``layer`` is stamped from."""
        return max(j for j in range(1, exported) if self.kinds[j] == self.kinds[layer])


def find_layer_stack(model: nn.Module) -> LayerStack | None:
    """The one ModuleList of same-class blocks (at least 3) that holds the model's layers,
    with the count in ``config.num_hidden_layers`` where there is one; None otherwise."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 3:
            continue
        if len({type(m) for m in module}) != 1 or (expected is not None and len(module) != expected):
            continue
        found.append((path, module))
    if len(found) != 1:
        return None
    path, _ = found[0]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    return LayerStack(parent, attr, path, _kinds(getattr(parent, attr)))


def _kinds(layers: nn.ModuleList) -> tuple[int, ...]:
    keys: dict = {}
    return tuple(keys.setdefault(_kind_key(layer), len(keys)) for layer in layers)


def _kind_key(layer: nn.Module) -> tuple:
    """What decides the code a layer traces to: classes, tensor shapes, plain attributes."""
    parts = []
    for name, module in layer.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                             if not k.startswith("_") and k != "layer_idx" and _plain(v)))
        parts.append((name, type(module).__qualname__, attrs))
    tensors = [(n, tuple(t.shape), t.dtype, t.requires_grad)
               for n, t in list(layer.named_parameters()) + list(layer.named_buffers())]
    return tuple(parts), tuple(tensors)


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@contextlib.contextmanager
def cut_to(stack: LayerStack, length: int):
    """The model with only its first ``length`` layers (the same modules), restored on exit.
    A ``config.num_hidden_layers`` the forward slices the list by is cut too."""
    full = stack.layers
    config = getattr(stack.parent, "config", None)
    if getattr(config, "num_hidden_layers", None) != len(full):
        config = None
    setattr(stack.parent, stack.attr, nn.ModuleList(list(full)[:length]))
    if config is not None:
        config.num_hidden_layers = length
    try:
        yield
    finally:
        setattr(stack.parent, stack.attr, full)
        if config is not None:
            config.num_hidden_layers = len(full)


def stamp(gm: fx.GraphModule, stack: LayerStack, exported: int) -> fx.GraphModule:
    """Append layers ``exported .. len(stack.layers)-1`` to ``gm`` (captured with the first
    ``exported``), each a copy of its kind's template over its own weights, and register
    those weights on ``gm``. Raises StampError when the graph is not a chain of layers."""
    prefix = f"{WRAPPED}.{stack.path}."
    owner = {n: _layer_of(n, prefix) for n in gm.graph.nodes}
    members = [[n for n in gm.graph.nodes if owner[n] == i] for i in range(exported)]
    if any(not nodes for nodes in members):
        raise StampError("a layer has no nodes of its own in the captured graph")
    outputs = [_single_output(nodes, owner, i) for i, nodes in enumerate(members)]
    for i in range(1, exported):
        _check_inputs(members[i], owner, i, outputs[i - 1])
    last = outputs[-1]
    after = [u for u in last.users if owner[u] is None]
    if not after:
        raise StampError("nothing after the last layer reads its output")
    _check_tail(gm, owner, exported, last)

    attrs_after = _last_layer_attr(gm, owner, exported - 1)
    body_after = members[-1][-1]
    hidden = last
    layers = stack.layers
    for layer in range(exported, len(layers)):
        j = stack.template(layer, exported)
        hidden, attrs_after, body_after = _copy_layer(gm, members[j], owner, j, layer, outputs[j - 1], hidden,
                                                      layers[layer], prefix, attrs_after, body_after)
    for user in after:
        user.replace_input_with(last, hidden)
    gm.graph.lint()
    gm.recompile()
    return gm


def _layer_of(node: fx.Node, prefix: str) -> int | None:
    """The layer a node belongs to, from its module stack (or, for a weight, its target)."""
    if node.op == "get_attr":
        path = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
    if not path.startswith(prefix):
        return None
    index = path[len(prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _single_output(nodes: list[fx.Node], owner: dict, layer: int) -> fx.Node:
    out = [n for n in nodes if any(owner[u] != layer for u in n.users)]
    if len(out) != 1:
        raise StampError(f"layer {layer} hands {len(out)} values to the rest of the graph, not one")
    return out[0]


def _check_inputs(nodes: list[fx.Node], owner: dict, layer: int, previous: fx.Node) -> None:
    """A layer reads, of the layers before it, only the previous layer's output."""
    for n in nodes:
        for arg in n.all_input_nodes:
            if owner[arg] is not None and owner[arg] != layer and arg is not previous:
                raise StampError(f"layer {layer} reads {arg.name} of layer {owner[arg]}, "
                                 f"not only the previous layer's output")


def _check_tail(gm: fx.GraphModule, owner: dict, exported: int, last: fx.Node) -> None:
    """Nodes outside the layers read no layer value but the last layer's output, and those
    that come after the layers are not read by any layer."""
    seen_last = False
    for n in gm.graph.nodes:
        if n is last:
            seen_last = True
        if owner[n] is not None:
            if seen_last and n is not last:
                raise StampError(f"{n.name} of layer {owner[n]} comes after the last layer's output")
            continue
        for arg in n.all_input_nodes:
            if owner[arg] is not None and arg is not last:
                raise StampError(f"{n.name} outside the layers reads {arg.name} of layer {owner[arg]}")


def _last_layer_attr(gm: fx.GraphModule, owner: dict, layer: int) -> fx.Node:
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr" and owner[n] == layer]
    if not attrs:
        raise StampError(f"layer {layer} reads no weights")
    return attrs[-1]


def _copy_layer(gm, template: list[fx.Node], owner: dict, j: int, layer: int, template_input: fx.Node,
                hidden: fx.Node, module: nn.Module, prefix: str, attrs_after: fx.Node, body_after: fx.Node):
    """Copy layer ``j``'s nodes as layer ``layer``: its input becomes ``hidden``, its weights
    ``layer``'s. Weights go after ``attrs_after``, the body after ``body_after``; returns the
    copy's output and the new insertion points."""
    graph = gm.graph
    env: dict[fx.Node, fx.Node] = {template_input: hidden}
    src, dst = f"{prefix}{j}.", f"{prefix}{layer}."
    for n in template:
        if n.op != "get_attr":
            continue
        rel = str(n.target)[len(src):]
        target = dst + rel
        _register(gm, target, _tensor(module, rel))
        with graph.inserting_after(attrs_after):
            attrs_after = env[n] = graph.get_attr(target)
        attrs_after.meta.update(n.meta)
    rename = _stack_renamer(src, dst)
    for n in template:
        if n.op == "get_attr":
            continue
        with graph.inserting_after(body_after):
            body_after = env[n] = graph.node_copy(n, lambda a: env.get(a, a))
        body_after.meta = dict(n.meta)
        if "nn_module_stack" in n.meta:
            body_after.meta["nn_module_stack"] = rename(n.meta["nn_module_stack"])
    output = next(n for n in template if any(owner[u] != j for u in n.users))
    return env[output], attrs_after, body_after


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner_path, _, attr = name.rpartition(".")
    sub = module.get_submodule(owner_path) if owner_path else module
    value = getattr(sub, attr)
    if not isinstance(value, torch.Tensor):
        raise StampError(f"{name} is not a tensor of the layer")
    return value


def _register(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, attr = target.rpartition(".")
    parent = gm
    for part in owner_path.split("."):
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    if isinstance(value, nn.Parameter):
        parent.register_parameter(attr, value)
    else:
        parent.register_buffer(attr, value)


def _stack_renamer(src: str, dst: str):
    """Module-stack metadata of a copied node: layer ``src``'s paths, in the keys and the
    values alike (``L__self__m.model.layers.1.mlp``), become layer ``dst``'s."""
    layer = re.compile(re.escape(src.rstrip(".")) + r"(?=\.|$)")
    dst = dst.rstrip(".")

    def rename(stack: dict) -> dict:
        return {layer.sub(dst, k): (layer.sub(dst, path), cls) for k, (path, cls) in stack.items()}
    return rename


_SUFFIX = re.compile(r"_\d+$")
_COMPUTED = ("call_function", "call_method", "call_module")


def canonical_names(gm: fx.GraphModule) -> fx.GraphModule:
    """Name the computed nodes ``<op>``, ``<op>_1``, ... in graph order (placeholders and
    weights keep their names), so two graphs with the same nodes in the same order print the
    same code."""
    old = gm.graph
    new = fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    new._codegen = old._codegen
    env: dict[fx.Node, fx.Node] = {}
    for n in old.nodes:
        if n.op in _COMPUTED:
            args = fx.map_arg(n.args, env.__getitem__)
            kwargs = fx.map_arg(n.kwargs, env.__getitem__)
            env[n] = new.create_node(n.op, n.target, args, kwargs, name=_SUFFIX.sub("", n.name), type_expr=n.type)
            env[n].meta = dict(n.meta)
        else:
            env[n] = new.node_copy(n, env.__getitem__)
    gm.graph = new
    gm.recompile()
    return gm
