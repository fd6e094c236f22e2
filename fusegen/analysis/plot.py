"""The log-log roofline PNG of an analysis (matplotlib, imported when a plot is asked for)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fusegen.analysis.costs import KIND_ORDER
from fusegen.errors import MissingDependencyError

if TYPE_CHECKING:
    from fusegen.analysis.summary import Analysis
    from fusegen.analysis.target import GPU


_MARKERS = {"prefill": "o", "decode": "s"}


def plot_roofline(analysis: Analysis, path) -> None:
    """Write ``analysis`` as a log-log roofline PNG to ``path``: the roof, the ridge, one point
    per (phase, kind) that has FLOPs."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingDependencyError("the roofline plot needs matplotlib: pip install matplotlib "
                                     "(or the project's [plot] extra)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, points = analysis.gpu, _plot_points(analysis)
    xs = [p[0] for p in points] + [g.ridge]
    x = [min(xs) / 10, max(xs) * 4]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    _draw_roof(ax, g, x)
    _draw_points(ax, points, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    ax.set(xscale="log", yscale="log", xlim=x, ylim=(None, g.peak_flops * 3),
           xlabel="arithmetic intensity (FLOP/byte)",
           ylabel="FLOP/s at the time floor",
           title=f"{analysis.model} on {g.name}: B={analysis.batch}, T={analysis.seq}, "
                 f"{str(analysis.dtype).removeprefix('torch.')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_roof(ax, g: GPU, x: list[float]) -> None:
    """The roof over the intensity range ``x`` and the ridge line."""
    grid = [x[0] * (x[1] / x[0]) ** (i / 200) for i in range(201)]
    roof = [min(g.peak_flops, g.bandwidth * i) for i in grid]
    ax.plot(grid, roof, color="black", lw=2,
            label=f"roof: {g.bandwidth / 1e12:.2f} TB/s, {g.peak_flops / 1e12:.0f} TFLOP/s")
    ax.axvline(g.ridge, color="gray", ls="--", lw=1)
    ax.text(g.ridge, roof[0], f" ridge {g.ridge:.0f} FLOP/B", rotation=90, va="bottom",
            fontsize=8, color="gray")


def _draw_points(ax, points: list[tuple[float, float, str, str]], colors: list[str]) -> None:
    """One marker per point (colour by kind, shape by phase), their labels, the phase legend."""
    for px, py, phase, kind in points:
        ax.scatter(px, py, color=colors[KIND_ORDER.index(kind) % len(colors)], zorder=3,
                   marker=_MARKERS[phase], edgecolors="black", linewidths=0.5)
    for i, (px, py, label) in enumerate(_labels(points)):
        above = i % 2 == 0  # alternate sides of the roof so neighbours do not overlap
        ax.annotate(label, (px, py), textcoords="offset points", fontsize=8,
                    xytext=(-6, 6) if above else (6, -12), ha="right" if above else "left")
    for phase, marker in _MARKERS.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=phase)


def _plot_points(analysis: Analysis) -> list[tuple[float, float, str, str]]:
    """(intensity, FLOP/s at the floor, phase, kind) of every kind that has FLOPs."""
    return [(r.intensity, r.flops / r.floor_s, pc.phase.name, r.kind)
            for pc in analysis.phases.values() for r in pc.by_kind() if r.flops > 0 and r.bytes > 0]


def _labels(points) -> list[tuple[float, float, str]]:
    """One label per cluster of points that would print on top of each other, by intensity."""
    clusters: list[list] = []
    for px, py, phase, kind in sorted(points):
        last = clusters[-1] if clusters else None
        if last and abs(math.log10(px / last[0][0])) < 0.03 and abs(math.log10(py / last[0][1])) < 0.03:
            last.append((px, py, f"{phase} {kind}"))
        else:
            clusters.append([(px, py, f"{phase} {kind}")])
    return [(c[0][0], c[0][1], ", ".join(p[2] for p in c)) for c in clusters]

