"""Bundled English text: ``calibration_text()`` calibrates lossy conversions (MHA->GQA) and
``heldout_text()`` measures their perplexity cost on different prose. Both files are
original writing (science explanations, stories, history-like narration, how-to, dialogue)
of about 1,800 words each."""

from __future__ import annotations

from importlib import resources


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def calibration_text() -> str:
    """Text for calibrating lossy conversions; never used to measure them."""
    return _read("calibration.txt")


def heldout_text() -> str:
    """Text for measuring quality (perplexity); disjoint from ``calibration_text()``."""
    return _read("heldout.txt")
