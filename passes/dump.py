"""Per-pass dumps: ``00_capture.py``, ``01_<pass>.py``, ... (the graph's code after each
step, with shapes) and ``summary.txt`` / ``summary.json`` (node counts per op per step,
rewrite counters, seconds per step)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import fx

from fusegen.passes.infra import PROVENANCE, op_name

DUMP_ENV = "FUSEGEN_DUMP_DIR"


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    stats: dict = field(default_factory=dict)
    node_counts: Counter = field(default_factory=Counter)
    nodes_made: int = 0  # nodes stamped with this pass's provenance
    snapshot: list[dict] = field(default_factory=list, repr=False)  # graph_snapshot() after it

    @property
    def total_nodes(self) -> int:
        return sum(self.node_counts.values())


def resolve_dump_dir(dump_dir) -> Path | None:
    chosen = dump_dir if dump_dir is not None else os.environ.get(DUMP_ENV) or None
    return Path(chosen) if chosen else None


class DumpWriter:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in [*self.directory.glob("[0-9][0-9]_*.py"), *self.directory.glob("kernels/*.py")]:
            old.unlink()  # a dump describes one compile: nothing of an older one stays

    def graph(self, index: int, record: PassRecord, gm: fx.GraphModule) -> Path:
        path = self.directory / f"{index:02d}_{record.name}.py"
        header = [
            f"# fusegen graph after step {index:02d}: {record.name}",
            f"# changed: {record.changed}   nodes: {record.total_nodes}   "
            f"made by this step: {record.nodes_made}   seconds: {record.seconds:.3f}",
        ]
        if record.stats:
            header.append("# counters: " + ", ".join(f"{k}={v}" for k, v in sorted(record.stats.items())))
        made = [n.name for n in gm.graph.nodes if n.meta.get("fusegen_pass") == record.name]
        if made and index > 0:
            header.append("# nodes made by this step: " + ", ".join(made[:200])
                          + (" ..." if len(made) > 200 else ""))
        body = gm.print_readable(print_output=False, include_stride=False, include_device=False)
        path.write_text("\n".join(header) + "\n\n" + body + "\n")
        return path

    def summary(self, records: list[PassRecord]) -> None:
        data = [dict(asdict(r), node_counts=dict(r.node_counts)) for r in records]
        for entry in data:
            del entry["snapshot"]
        (self.directory / "summary.json").write_text(json.dumps(data, indent=2, sort_keys=True))
        (self.directory / "summary.txt").write_text(summary_table(records) + "\n\n" + op_table(records) + "\n")


def graph_snapshot(gm: fx.GraphModule) -> list[dict]:
    """A light copy of the graph for reports, one dict per node: name, op (fx opcode),
    target (op name), inputs (node names), made_by (the pass that made it), shape."""
    return [{"name": n.name, "op": n.op,
             "target": op_name(n) if n.op == "call_function" else str(n.target),
             "inputs": [a.name for a in n.all_input_nodes],
             "made_by": n.meta.get(PROVENANCE), "shape": _shape_text(n.meta.get("val"))}
            for n in gm.graph.nodes]


def _shape_text(val) -> str:
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_shape_text(v) for v in val) + ")"
    if hasattr(val, "shape") and hasattr(val, "dtype"):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{str(val.dtype).replace('torch.', '')}[{dims}]"
    return "" if val is None else str(val)


def summary_table(records: list[PassRecord]) -> str:
    rows = [("step", "pass", "changed", "nodes", "made", "ms", "counters")]
    for i, r in enumerate(records):
        counters = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
        rows.append((f"{i:02d}", r.name, "yes" if r.changed else "no", str(r.total_nodes),
                     str(r.nodes_made), f"{r.seconds * 1e3:.0f}", counters))
    return _format_rows(rows)


def op_table(records: list[PassRecord]) -> str:
    """Node count of every op type (rows) after every step (columns)."""
    ops = sorted(set().union(*(r.node_counts for r in records)))
    rows = [("op",) + tuple(f"{i:02d}" for i in range(len(records)))]
    for op in ops:
        rows.append((op,) + tuple(str(r.node_counts.get(op, 0)) for r in records))
    return _format_rows(rows)


def _format_rows(rows) -> str:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
