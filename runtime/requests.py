"""Checks a request before the engine queues it: everything a step could trip over later is
refused at the door with a ``ValueError`` that names the argument and the value."""

from __future__ import annotations

import operator

import torch


def token_list(prompt, vocab_size: int | None, name: str = "prompt") -> list[int]:
    """``prompt`` (a sequence of ints or a 1-D integer tensor) as a list of Python ints, each
    in [0, vocab_size)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex \
                or prompt.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {prompt.dtype} of shape "
                             f"{tuple(prompt.shape)}")
        tokens = prompt.tolist()
    elif isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
        raise ValueError(f"{name} must be a list of token ids, got {type(prompt).__name__}")
    else:
        tokens = list(prompt)
    if not tokens:
        raise ValueError(f"{name} needs at least one token")
    out = []
    for i, t in enumerate(tokens):
        if isinstance(t, bool):
            raise ValueError(f"{name}[{i}] must be an integer token id, got {t!r}")
        try:
            out.append(operator.index(t))
        except TypeError:
            raise ValueError(f"{name}[{i}] must be an integer token id, got {t!r}") from None
    low, high = min(out), max(out)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = next(i for i, t in enumerate(out) if t < 0 or (vocab_size is not None and t >= vocab_size))
        raise ValueError(f"{name}[{bad}] = {out[bad]} is not a token id of this model "
                         f"(vocabulary of {vocab_size})" if vocab_size is not None else
                         f"{name}[{bad}] = {out[bad]} is negative")
    return out


def count(value, name: str, minimum: int = 1) -> int:
    """An integer argument (not a bool, not a float) that is at least ``minimum``."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def token_ids(values, vocab_size: int | None, name: str) -> list[int]:
    """A possibly empty collection of integer ids (e.g. eos ids). An id outside the
    vocabulary is allowed, as HF allows it: it can never be sampled, so it never matches."""
    values = list(values)
    return token_list(values, None, name) if values else []
