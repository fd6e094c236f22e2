"""Progress bars for the long steps of the CLI (compile, write and verify artifacts)."""

from __future__ import annotations


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
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
