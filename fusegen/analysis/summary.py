"""Evaluation of the symbolic costs at one (batch, seq) on one GPU: rows per phase and node
kind, and the reports of them (text table, summary rows, JSON-ready dict)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from fusegen.analysis.costs import KIND_ORDER, NodeCost, graph_costs
from fusegen.analysis.phases import B, T, Phase, graph_kind, phases_for
from fusegen.analysis.plot import plot_roofline
from fusegen.analysis.target import GPU, gpu_spec


@dataclass
class Row:
    """Numbers of a group of nodes (one kind, or all) in one phase."""
    kind: str
    count: int
    flops: float
    bytes_read: float
    bytes_written: float
    floor_s: float
    operand: dict[str, float]  # product name -> MAC per operand element
    ridge: float

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def bound(self) -> str:
        return "compute" if self.intensity >= self.ridge else "memory"


def _evaluate(cost: NodeCost, at: dict, gpu: GPU) -> None:
    v = {key: float(getattr(cost, key).xreplace(at)) for key in ("flops", "bytes_read", "bytes_written")}
    v["bytes"] = v["bytes_read"] + v["bytes_written"]
    v["intensity"] = v["flops"] / v["bytes"] if v["bytes"] else math.inf
    v["floor_s"] = max(v["flops"] / gpu.peak_flops, v["bytes"] / gpu.bandwidth)
    for name, p in cost.products.items():
        v[f"macs.{name}"] = float((p.macs * p.count).xreplace(at))
        v[f"operands.{name}"] = float((p.operands * p.count).xreplace(at))
    cost.values = v


def _row(kind: str, costs: list[NodeCost], gpu: GPU) -> Row:
    total = defaultdict(float)
    for c in costs:
        for key, value in c.values.items():
            total[key] += value
    # One kind's products share a meaning; over all kinds they do not.
    names = sorted({name for c in costs for name in c.products}) if kind != "total" else []
    operand = {n: total[f"macs.{n}"] / total[f"operands.{n}"] for n in names}
    return Row(kind, len(costs), total["flops"], total["bytes_read"], total["bytes_written"],
               total["floor_s"], operand, gpu.ridge)


@dataclass
class PhaseCost:
    phase: Phase
    nodes: list[NodeCost]
    batch: int
    seq: int
    gpu: GPU

    def __post_init__(self):
        at = {B: self.batch, T: self.seq}
        for cost in self.nodes:
            _evaluate(cost, at, self.gpu)

    def value(self, expr: sympy.Expr) -> float:
        return float(sympy.sympify(expr).xreplace({B: self.batch, T: self.seq}))

    def bound(self, cost: NodeCost) -> str:
        return "compute" if cost.values["intensity"] >= self.gpu.ridge else "memory"

    def by_kind(self) -> list[Row]:
        groups = defaultdict(list)
        for c in self.nodes:
            groups[c.kind].append(c)
        return [_row(k, groups[k], self.gpu) for k in sorted(groups, key=KIND_ORDER.index)]

    def total(self) -> Row:
        return _row("total", self.nodes, self.gpu)

    @property
    def floor_s(self) -> float:
        return self.total().floor_s

    @property
    def generated(self) -> int:
        """Tokens the step generates: one per sequence."""
        return int(self.value(self.phase.sequences))

    def describe(self) -> str:
        p = self.phase
        seqs, q, ctx = (int(self.value(e)) for e in (p.sequences, p.queries, p.context))
        if p.note:
            return f"{seqs} sequences of {ctx} tokens; {p.note}"
        if p.name == "prefill":
            return f"{seqs} sequences x {q} tokens, causal ({seqs * q} tokens in the step)"
        return f"{seqs} sequences x {q} new token over a context of {ctx}"

def _fmt_intensity(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


@dataclass
class Analysis:
    """Both phases of one graph at one (batch, seq) on one GPU."""
    model: str
    gpu: GPU
    dtype: torch.dtype
    batch: int
    seq: int
    phases: dict[str, PhaseCost]

    def table(self) -> str:
        """Fixed-width text: per phase, one line per node kind, the total, operand intensities."""
        g = self.gpu
        lines = [f"roofline: {self.model}, {str(self.dtype).removeprefix('torch.')} on {g.name} "
                 f"({g.peak_flops / 1e12:.0f} TFLOP/s dense 16-bit, {g.bandwidth / 1e12:.2f} TB/s, "
                 f"ridge {g.ridge:.1f} FLOP/B)"]
        for pc in self.phases.values():
            lines += ["", f"{pc.phase.name}: {pc.describe()}", _table_head()]
            lines += [_table_line(r) for r in pc.by_kind()]
            lines += [_table_line(pc.total())]
            lines += _operand_lines(pc)
            if pc.phase.name == "decode":
                lines.append(f"  floor per step {pc.floor_s * 1e6:.1f} µs (one token of each "
                             f"sequence), per generated token {pc.floor_s / pc.generated * 1e6:.2f} µs")
        return "\n".join(lines)

    def summary_rows(self) -> list[dict]:
        """Flat rows, one per (phase, kind) and one per phase total. ``operand_intensity`` is
        None for kinds without matrix products; for attention it is the lower of QK^T and PV."""
        rows = []
        for pc in self.phases.values():
            for r in [*pc.by_kind(), pc.total()]:
                rows.append({"phase": pc.phase.name, "kind": r.kind, "count": r.count,
                             "gflop": r.flops / 1e9, "mb": r.bytes / 1e6,
                             "intensity": None if math.isinf(r.intensity) else r.intensity,
                             "operand_intensity": min(r.operand.values()) if r.operand else None,
                             "bound": r.bound, "floor_us": r.floor_s * 1e6})
        return rows

    def to_dict(self) -> dict:
        """Everything, JSON-serialisable: kinds, totals and every node with its expressions."""
        return {"model": self.model, "dtype": str(self.dtype).removeprefix("torch."),
                "batch": self.batch, "seq": self.seq,
                "gpu": {"name": self.gpu.name, "peak_flops": self.gpu.peak_flops,
                        "bandwidth": self.gpu.bandwidth, "ridge": self.gpu.ridge},
                "phases": {name: _phase_dict(pc) for name, pc in self.phases.items()}}

    def plot(self, path) -> None:
        """Write a log-log roofline PNG: the roof, the ridge, one point per (phase, kind) at its
        intensity and the FLOP/s it reaches at its floor. Kinds without FLOPs are left out
        (they sit at intensity 0)."""
        plot_roofline(self, path)


def _table_head() -> str:
    return (f"  {'kind':<13}{'count':>6}{'GFLOP':>12}{'MB':>12}{'FLOP/B':>10}  "
            f"{'bound':<8}{'floor µs':>11}")


def _table_line(r: Row) -> str:
    return (f"  {r.kind:<13}{r.count:>6}{r.flops / 1e9:>12.3f}{r.bytes / 1e6:>12.3f}"
            f"{_fmt_intensity(r.intensity):>10}  {r.bound:<8}{r.floor_s * 1e6:>11.2f}")


def _operand_lines(pc: PhaseCost) -> list[str]:
    rows = {r.kind: r for r in pc.by_kind()}
    parts = []
    if "linear" in rows:
        parts.append(f"linear {rows['linear'].operand['gemm']:.1f}")
    if "attention" in rows:
        op = rows["attention"].operand
        parts.append(f"attention QK^T {op['qk']:.1f}, PV {op['pv']:.1f}")
    if not parts:
        return []
    return ["  operand intensity (MAC per operand element read): " + "; ".join(parts)]


def _phase_dict(pc: PhaseCost) -> dict:
    def row(r: Row) -> dict:
        return {"kind": r.kind, "count": r.count, "flops": r.flops, "bytes_read": r.bytes_read,
                "bytes_written": r.bytes_written,
                "intensity": None if math.isinf(r.intensity) else r.intensity, "bound": r.bound,
                "floor_us": r.floor_s * 1e6, "operand_intensity": r.operand}

    def node(c: NodeCost) -> dict:
        v = c.values
        return {"name": c.name, "kind": c.kind, "target": c.target, "flops": v["flops"],
                "bytes_read": v["bytes_read"], "bytes_written": v["bytes_written"],
                "floor_us": v["floor_s"] * 1e6, "flops_expr": str(c.flops),
                "bytes_expr": str(sympy.simplify(c.bytes)),
                "operand_intensity": {n: {"expr": str(e), "value": pc.value(e)}
                                      for n, e in c.operand_intensity.items()}}

    p = pc.phase
    return {"sequences": str(p.sequences), "queries": str(p.queries), "context": str(p.context),
            "note": p.note, "floor_us": pc.floor_s * 1e6, "kinds": [row(r) for r in pc.by_kind()],
            "total": row(pc.total()), "nodes": [node(c) for c in pc.nodes]}


def analyze_graph(gm: fx.GraphModule, facts: dict, batch: int, seq: int, gpu: str | GPU = "h100",
                  dtype: torch.dtype | None = None) -> Analysis:
    """Both phases of ``gm`` at ``batch`` sequences of ``seq`` tokens on ``gpu``."""
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    if any("val" not in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        raise ValueError("the cost model needs the graph's symbolic shapes, which a model loaded "
                         "from an artifact does not carry; analyze the model itself")
    spec = gpu_spec(gpu)
    block_size = getattr(facts.get("kv"), "block_size", 0) or 16
    phases = {}
    for phase in phases_for(graph_kind(gm)):
        phases[phase.name] = PhaseCost(phase, graph_costs(gm, phase, block_size, dtype), batch, seq, spec)
    return Analysis(facts.get("model_class", type(gm).__name__), spec,
                    dtype or facts.get("dtype") or _graph_dtype(gm), batch, seq, phases)


def _graph_dtype(gm: fx.GraphModule) -> torch.dtype:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr" and isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
            return val.dtype
    return torch.float32


def analyze(compiled, batch: int, seq: int, gpu: str | GPU = "h100",
            dtype: torch.dtype | None = None) -> Analysis:
    """Roofline analysis of a ``CompiledModel`` (see the ``fusegen.analysis`` docstring)."""
    return analyze_graph(compiled.graph_module, compiled.facts, batch, seq, gpu, dtype)
