"""Progress for the long steps: a line as each step starts, and bars for steps that count.

``stage(what)`` logs ``what ...`` on the ``fusegen.progress`` logger (INFO) when a step
starts and its seconds when it ends, if that took a second or more. The CLI shows fusegen's
INFO messages on stderr, so no command sits silent; a library user sees them by
configuring logging. ``Bar`` is a tqdm bar on stderr over counted work (compile steps,
bytes written or read); it shows each step's name as the step starts.
"""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("fusegen.progress")

QUIET_BELOW_S = 1.0   # a step that ends sooner gets no closing line


@contextlib.contextmanager
def stage(what: str):
    """Announce ``what`` now; say how long it took when it ends (when that was noticeable)."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if seconds >= QUIET_BELOW_S:
        log.info("%s: done in %.1f s", what, seconds)


class Bar:
    """A tqdm bar on stderr when ``enabled``, else nothing. ``unit="B"`` counts bytes."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "B"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            scaled = unit == "B"
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled,
                            unit_divisor=1024 if scaled else 1000, leave=False)

    def update(self, n: int, note: str | None = None) -> None:
        """Count ``n`` more done; ``note`` names what runs now and is shown at once."""
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
            if note is not None:
                self.bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


class TokenClock:
    """Times a stream of generated tokens: the wait for the first (the prompt's prefill) and
    the steady rate after it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def ticks(self, tokens):
        """Yield ``tokens``, noting when each arrives."""
        for token in tokens:
            self.stamps.append(time.perf_counter())
            yield token

    def summary(self) -> str:
        """``N tokens in S s (R tok/s; first after F s, then D tok/s)``."""
        n = len(self.stamps)
        if n == 0:
            return "no tokens generated"
        total, first = self.stamps[-1] - self.start, self.stamps[0] - self.start
        text = f"{n} tokens in {total:.2f} s ({n / max(total, 1e-9):.1f} tok/s; first after {first:.2f} s"
        if n > 1:
            text += f", then {(n - 1) / max(self.stamps[-1] - self.stamps[0], 1e-9):.1f} tok/s"
        return text + ")"
