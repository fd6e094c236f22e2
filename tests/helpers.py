"""Shared test helpers. Import as ``from helpers import ...`` (pytest puts tests/ on sys.path).

Tolerances per dtype for comparing a kernel or op against its reference:

    ATOL_RTOL[torch.float16] == (atol, rtol)
"""

from __future__ import annotations

import torch

ATOL_RTOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def max_error_report(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> str:
    """One paragraph saying where ``got`` is furthest from ``want`` (index, values, error),
    how many elements are outside ``atol + rtol * |want|`` and whether NaNs disagree."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    err = (g - w).abs()
    nan_mismatch = g.isnan() != w.isnan()
    both_nan = g.isnan() & w.isnan()
    err = torch.where(both_nan, torch.zeros_like(err), err)
    err = torch.where(nan_mismatch, torch.full_like(err, float("inf")), err)
    bad = err > atol + rtol * w.abs().nan_to_num(0.0)
    lines = [f"shape {tuple(got.shape)}, got dtype {got.dtype}, want dtype {want.dtype}, "
             f"atol {atol:g}, rtol {rtol:g}"]
    if err.numel() == 0:
        return lines[0] + "\n(empty tensors)"
    flat = int(err.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    lines.append(f"max abs error {err.reshape(-1)[flat].item():.6g} at index {index}: "
                 f"got {g.reshape(-1)[flat].item():.8g}, want {w.reshape(-1)[flat].item():.8g}")
    lines.append(f"{int(bad.sum())} of {bad.numel()} elements out of tolerance"
                 + (f", {int(nan_mismatch.sum())} NaN mismatches" if nan_mismatch.any() else ""))
    return "\n".join(lines)


def assert_close_report(got: torch.Tensor, want: torch.Tensor, atol: float | None = None,
                        rtol: float | None = None, msg: str = "") -> None:
    """``torch.testing.assert_close`` (dtype not checked) whose failure message names the
    index of the largest error and the two values there. Tolerances default per dtype."""
    __tracebackhide__ = True
    if got.shape != want.shape:
        raise AssertionError(f"{msg}shape mismatch: got {tuple(got.shape)}, want {tuple(want.shape)}")
    default_atol, default_rtol = ATOL_RTOL.get(want.dtype, (1e-5, 1e-5))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, check_dtype=False,
                                   check_device=False, equal_nan=True)
    except AssertionError:
        prefix = f"{msg}\n" if msg else ""
        raise AssertionError(prefix + max_error_report(got, want, atol, rtol)) from None
