"""Capture: an unmodified decoder model -> a torch.fx GraphModule with symbolic sizes.

The forward pass is traced by ``torch.export`` (non-strict) with dynamic batch and
sequence dims, through a wrapper whose signature is fixed:

    graph(input_ids [B,S] int64, attention_mask [B,S] int64, position_ids [B,S] int64)
        -> logits [B,S,V]

Explicit ``position_ids`` make positions a graph input from the start, which is what the
KV-cache passes need. Capture leaves the user's model as it was: training flag and attention
implementation are restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import traceback

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from fusegen.capture_layers import StampError, canonical_names, cut_to, find_layer_stack, stamp
from fusegen.errors import UnsupportedModelError

log = logging.getLogger("fusegen.capture")

GRAPH_INPUTS = ("input_ids", "attention_mask", "position_ids")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class _LogitsOnly(nn.Module):
    """Fixed signature for export; forwards only the inputs the model accepts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model
        params = inspect.signature(model.forward).parameters
        self._takes = {name for name in GRAPH_INPUTS[1:] if name in params}
        self._hf = hasattr(model, "config") and "use_cache" in params

    def forward(self, input_ids, attention_mask, position_ids):
        kwargs = {}
        if "attention_mask" in self._takes:
            kwargs["attention_mask"] = attention_mask
        if "position_ids" in self._takes:
            kwargs["position_ids"] = position_ids
        if self._hf:
            kwargs["use_cache"] = False
        out = self.m(input_ids, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits


def model_class_name(model: nn.Module) -> str:
    return type(model).__name__


def _check_decoder(model: nn.Module) -> None:
    name = model_class_name(model)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(type(model).__name__, "<model>", "not a torch.nn.Module")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(name, f"{name}.config", "encoder-decoder models are not decoder-only causal LMs")
    if "input_ids" not in inspect.signature(model.forward).parameters and not _first_param_ok(model):
        raise UnsupportedModelError(name, f"{name}.forward", "forward takes no token ids")


def _first_param_ok(model: nn.Module) -> bool:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return bool(params)


@contextlib.contextmanager
def _temporarily(model: nn.Module, attn_implementation: str | None):
    """Eval mode and the requested attention implementation, undone on exit."""
    was_training = model.training
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None) if config is not None else None
    switch = attn_implementation is not None and config is not None and previous != attn_implementation
    model.eval()
    try:
        if switch:
            model.set_attn_implementation(attn_implementation)
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)
        model.train(was_training)


def evaluating(model: nn.Module):
    """Eval mode (no dropout) while the block runs, the training flag restored after."""
    return _temporarily(model, None)


def takes_attention_mask(model: nn.Module) -> bool:
    return "attention_mask" in _LogitsOnly(model)._takes


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise UnsupportedModelError(model_class_name(model), "<model>", "no token embedding found")
    return int(emb.num_embeddings)


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab_size(model), (batch, seq), generator=g).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    pos = torch.arange(seq, device=device).expand(batch, seq).contiguous()
    return ids, mask, pos


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the real tokens of left-padded rows (0 on padding), as HF's
    generate and mask-deriving families (OPT) compute them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def position_convention(model: nn.Module) -> str:
    """How the model's own forward numbers positions when it is given none: ``"arange"``
    (0..S-1 in every row, padding included: Llama, GPT-2, ...) or ``"mask"`` (counted over
    the real tokens, from the attention mask: OPT). Found by running a left-padded batch
    both ways against the model's own default; UnsupportedModelError when neither matches."""
    wrapper = _LogitsOnly(model)
    if "position_ids" not in wrapper._takes or "attention_mask" not in wrapper._takes:
        return "arange"   # positions are not an input the model lets us set
    ids, mask, pos = example_inputs(model, batch=2, seq=8)
    mask[0, :3] = 0
    real = mask.bool()
    own = own_logits(model, ids, mask)[real]
    for name, candidate in (("arange", pos), ("mask", mask_positions(mask))):
        got = wrapper(ids, mask, candidate)[real]
        if torch.allclose(got.float(), own.float(), atol=1e-3, rtol=1e-3, equal_nan=True):
            return name
    raise UnsupportedModelError(model_class_name(model), "position_ids",
                                "its forward numbers positions of a left-padded batch neither 0..S-1 "
                                "nor from the attention mask, so fusegen cannot reproduce them")


def own_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The model's forward as a user calls it, positions left to the model; the mask only if
    it takes one (a model that takes none gets no padded batches from fusegen's checks)."""
    wrapper = _LogitsOnly(model)
    kwargs = {"use_cache": False} if wrapper._hf else {}
    if attention_mask is not None and "attention_mask" in wrapper._takes:
        kwargs["attention_mask"] = attention_mask
    out = model(input_ids, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def capture(model: nn.Module, *, attn_implementation: str | None = None,
            verify: bool = True, by_layer: bool = True) -> torch.fx.GraphModule:
    """Trace ``model`` into an fx GraphModule ``(input_ids, attention_mask, position_ids) -> logits``.

    ``attn_implementation`` selects the HF attention code path traced ("sdpa" or "eager";
    None keeps the model's own). With ``verify`` the graph is run at several batch sizes and
    lengths, dense and left-padded (CHECK_ROWS), and compared with the model. Raises
    UnsupportedModelError naming the class and the module/op that failed: export errors, a
    dimension the capture fixed, a guard that fails at another size, a difference.
    ``by_layer`` exports only the first few decoder layers and stamps the rest from them
    (``capture_layers``); ``gm.meta["fusegen_capture"]`` says how many were stamped, or why
    the whole model was exported."""
    name = model_class_name(model)
    _check_decoder(model)
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    if getattr(model, "config", None) is None:
        attn_implementation = None  # a plain module has one attention code path
    own = getattr(getattr(model, "config", None), "_attn_implementation", None)
    first = attn_implementation or own
    # HF's sdpa mask code specialises on the sequence length on CUDA (alignment padding),
    # which a dynamic capture cannot express; its eager path computes the same thing.
    attempts = [first, "eager"] if attn_implementation is None and first == "sdpa" else [first]
    for i, impl in enumerate(attempts):
        try:
            gm = _export(model, impl if impl != own else None, verify, name, by_layer)
        except UnsupportedModelError:
            if i + 1 == len(attempts):
                raise
            continue
        gm.meta["fusegen_model_class"] = name
        gm.meta["fusegen_attn_implementation"] = impl or "plain"
        return gm


def _export(model, attn_implementation, verify: bool, name: str, by_layer: bool) -> torch.fx.GraphModule:
    wrapper = _LogitsOnly(model)
    args = example_inputs(model)
    with _temporarily(model, attn_implementation), torch.no_grad():
        gm, how = _export_by_layer(model, wrapper, args, name, verify) if by_layer else (None, "not asked")
        if gm is None:
            gm = _export_graph(wrapper, args, name, model)
            _check_dynamic(gm, name)
            if verify:
                _verify_all(gm, model, wrapper, args, name)
            how = {"layers_stamped": 0, "whole_model": how}
    gm = canonical_names(gm)
    gm.meta["fusegen_capture"] = how
    return gm


def _export_graph(wrapper, args, name: str, model) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=1 << 20)
    named = {name_: {0: batch, 1: seq} for name_ in GRAPH_INPUTS}
    # Some kernels' shape logic (CUDA alignment, stride comparisons) emits guards that hold
    # for every size >= 1 but that export cannot prove for a named Dim; AUTO dims accept them.
    auto = {name_: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for name_ in GRAPH_INPUTS}
    for dims in (named, auto):
        try:
            return torch.export.export(wrapper, args, dynamic_shapes=dims, strict=False).module()
        except Exception as exc:  # export raises many types; all mean "cannot capture"
            error = exc
    raise UnsupportedModelError(name, _where(error, model), _reason(error)) from error


def _export_by_layer(model, wrapper, args, name: str, verify: bool):
    """(graph, counts) of the first layers exported and the rest stamped, checked against the
    full model; (None, reason) when the model does not stack its layers that way or the
    stamped graph disagrees with the model, and the whole model is exported instead. The cut
    model's own graph is checked against the cut model first: what fails there (an export
    error, a fixed dimension, a guard, a difference) is raised, since the whole model runs the
    same code (on CUDA, HF's sdpa path fails this way, and the eager one is tried next)."""
    stack = find_layer_stack(model)
    length = stack.export_length() if stack is not None else None
    if length is None:
        return None, "no stack of repeated decoder layers" if stack is None else "no layer to stamp"
    with cut_to(stack, length):
        gm = _export_graph(wrapper, args, name, model)
        _check_dynamic(gm, name)
        if verify:
            _verify_all(gm, model, wrapper, args, name)
    try:
        gm = stamp(gm, stack, length)
        if verify:
            _verify_all(gm, model, wrapper, args, name)
    except (StampError, UnsupportedModelError) as exc:
        log.info("%s: exporting the whole model, not by layer: %s", name, exc)
        return None, str(exc)
    return gm, {"layers_exported": length, "layers_stamped": len(stack.layers) - length,
                "layer_kinds": len(set(stack.kinds))}


def _verify_all(gm, model, wrapper, args, name: str) -> None:
    for example in [args] + check_inputs(model, wrapper):
        _verify(gm, wrapper, example, name)


# Row lengths of the batches a captured graph runs at before it is trusted, each row left-padded
# to the longest: other batch sizes and lengths than the traced example (2 x 8), the decode
# shape 1 x 1, and padded rows. Tiny, so that checking costs milliseconds.
CHECK_ROWS = ((1,), (5, 5, 5), (6, 2, 4), (1, 9))


def check_inputs(model: nn.Module, wrapper: "_LogitsOnly") -> list[tuple[torch.Tensor, ...]]:
    """(input_ids, attention_mask, position_ids) for every CHECK_ROWS batch; padded rows count
    positions over their real tokens, as generate does. A model that takes no attention mask
    gets the same sizes unpadded."""
    batches = []
    for rows in CHECK_ROWS:
        ids, mask, pos = example_inputs(model, batch=len(rows), seq=max(rows))
        if "attention_mask" in wrapper._takes:
            for b, n in enumerate(rows):
                mask[b, :max(rows) - n] = 0
            pos = mask_positions(mask)
        batches.append((ids, mask, pos))
    return batches


def _size(args) -> str:
    ids, mask = args[0], args[1]
    padded = ", left-padded" if not bool(mask.all()) else ""
    return f"batch {ids.shape[0]}, sequence {ids.shape[1]}{padded}"


def _check_dynamic(gm, name: str) -> None:
    """The graph must take any batch and sequence size: a dimension the capture fixed
    (the model's code branches on it) is refused here, not when the first other size comes."""
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.target not in GRAPH_INPUTS or "val" not in node.meta:
            continue
        for dim, label in zip(node.meta["val"].shape, ("batch size", "sequence length")):
            if is_concrete_int(dim):
                raise UnsupportedModelError(name, "<captured graph>",
                                            f"the capture fixed the {label} of {node.target} to {int(dim)} "
                                            f"(the model's code depends on it), so the graph would serve no other")


def _verify(gm, wrapper, args, name) -> None:
    """The graph against the model's forward on the same inputs, on the real (unpadded) tokens;
    a guard that fails (the graph does not take these sizes) or a difference is refused."""
    expected = wrapper(*args)
    try:
        got = gm(*args)
    except Exception as exc:  # a guard of the captured graph: it does not take these sizes
        raise UnsupportedModelError(name, "<captured graph>",
                                    f"the captured graph does not run at {_size(args)} ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    tol = 1e-4 if expected.dtype == torch.float32 else 2e-2
    real = args[1].bool()
    err = max_error(got[real], expected[real], tol)
    if err is not None:
        raise UnsupportedModelError(name, "<captured graph>",
                                    f"captured graph disagrees with eager forward at {_size(args)} "
                                    f"(max abs error {err:.3g})")


def max_error(got: torch.Tensor, want: torch.Tensor, tol: float) -> float | None:
    """The largest absolute difference when it exceeds ``tol`` times the larger of 1 and the
    largest ``|want|`` (or NaNs disagree), else None. NaN where both are NaN counts as equal."""
    got, want = got.float(), want.float()
    if not torch.equal(got.isnan(), want.isnan()):
        return float("nan")
    err = (got - want).nan_to_num(0.0).abs().max().item() if got.numel() else 0.0
    scale = want.nan_to_num(0.0).abs().max().item() if want.numel() else 0.0
    return err if err > tol * max(1.0, scale) else None


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"torch.export failed with {type(exc).__name__}: {first[:300]}"


def _where(exc: BaseException, model: nn.Module) -> str:
    """The innermost module of ``model`` on the failing stack, as 'path (Class.forward, file:line)'."""
    paths = {id(m): p or "<root>" for p, m in model.named_modules()}
    frames = traceback.extract_tb(exc.__traceback__)
    tb = exc.__traceback__
    found = None
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if isinstance(module, nn.Module) and id(module) in paths:
            found = (paths[id(module)], type(module).__name__, tb.tb_frame.f_code.co_name,
                     tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        last = frames[-1] if frames else None
        return f"{last.filename}:{last.lineno}" if last else "<unknown>"
    path, cls, fn, filename, line = found
    return f"module '{path}' ({cls}.{fn}, {filename.rsplit('/', 1)[-1]}:{line})"
