r"""The graph after one pass, drawn as an inline SVG for the HTML report.

Layered layout (rows top to bottom, every edge points down):

    row 0    input_ids   weight          a node sits one row above its first user (a
               \           /              weight next to its linear, a shared value next
    row 1      embedding                  to where the first layer reads it); a node
                  |                       without users one row below its deepest input
    row 2      pow  ...                   within a row: ordered by where the inputs are

Every node of the snapshot is drawn, with every edge; nothing is merged or left out. Nodes
that the pass made get the ``made`` class, edges that touch them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

import networkx as nx

BOX_H = 30
ROW_PITCH = 48        # BOX_H + the gap the edges run through
COL_GAP = 14
MARGIN = 12
CHAR_W = 6.4          # one character of the 10.5px monospace labels
MAX_CHARS = 40        # longer labels are cut in the middle; the tooltip has them whole
OPCODES = ("placeholder", "get_attr", "call_function", "call_module", "output")


@dataclass
class Box:
    node: dict
    row: int
    width: float
    x: float = 0.0

    @property
    def center(self) -> float:
        return self.x + self.width / 2

    @property
    def y(self) -> float:
        return MARGIN + self.row * ROW_PITCH


def snapshot_graph(snapshot: list[dict]) -> nx.DiGraph:
    """One graph node per snapshot node, one edge per (input, user) pair."""
    graph = nx.DiGraph()
    graph.add_nodes_from((n["name"], {"node": n}) for n in snapshot)
    graph.add_edges_from((i, n["name"]) for n in snapshot for i in n["inputs"] if i in graph)
    return graph


def layout(snapshot: list[dict]) -> tuple[nx.DiGraph, dict[str, Box], float, float]:
    """Boxes with rows and x positions, and the drawing's width and height."""
    graph = snapshot_graph(snapshot)
    rows = _rows(graph)
    boxes = {name: Box(graph.nodes[name]["node"], row, _width(graph.nodes[name]["node"]))
             for name, row in rows.items()}
    by_row: dict[int, list[Box]] = {}
    for name in graph:  # snapshot order: ties keep the graph's own order
        by_row.setdefault(boxes[name].row, []).append(boxes[name])
    width = max((_row_width(r) for r in by_row.values()), default=0.0) + 2 * MARGIN
    for row in sorted(by_row):  # down: by the inputs' positions
        _place(by_row[row], lambda b: _mean(boxes[p].center for p in graph.predecessors(b.node["name"])), width)
    for row in sorted(by_row, reverse=True):  # up: sources by their users' positions
        _place(by_row[row], lambda b: b.center if graph.in_degree(b.node["name"])
               else _mean(boxes[s].center for s in graph.successors(b.node["name"])), width)
    height = len(by_row) * ROW_PITCH - (ROW_PITCH - BOX_H) + 2 * MARGIN
    return graph, boxes, width, max(height, 0.0)


def _rows(graph: nx.DiGraph) -> dict[str, int]:
    """Longest path from the sources, then every node that has users moved down to just
    above its first user (in reverse topological order, so the users' rows are final)."""
    order = list(nx.topological_sort(graph))
    row: dict[str, int] = {}
    for name in order:
        row[name] = 1 + max((row[p] for p in graph.predecessors(name)), default=-1)
    for name in reversed(order):
        if graph.out_degree(name):
            row[name] = min(row[s] for s in graph.successors(name)) - 1
    used = {r: i for i, r in enumerate(sorted(set(row.values())))}  # no empty rows
    return {name: used[r] for name, r in row.items()}


def _place(boxes: list[Box], key, width: float) -> None:
    """Order one row by ``key`` (nodes without one keep their place) and centre it."""
    keys = [key(b) for b in boxes]
    order = sorted(range(len(boxes)), key=lambda i: (keys[i] if keys[i] is not None else boxes[i].center, i))
    boxes[:] = [boxes[i] for i in order]
    x = (width - _row_width(boxes)) / 2
    for box in boxes:
        box.x = x
        x += box.width + COL_GAP


def _row_width(boxes: list[Box]) -> float:
    return sum(b.width for b in boxes) + COL_GAP * (len(boxes) - 1)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def labels(node: dict) -> tuple[str, str]:
    """The two lines of a box: the node's name, then its op (or opcode and target)."""
    if node["op"] == "call_function":
        second = node["target"]
    elif node["target"] and node["target"] != node["name"]:
        second = f"{node['op']}: {node['target']}"
    else:
        second = node["op"]
    return _cut(node["name"]), _cut(second)


def _cut(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    keep = (MAX_CHARS - 1) // 2
    return text[:keep] + "\u2026" + text[-keep:]


def _width(node: dict) -> float:
    return max(len(line) for line in labels(node)) * CHAR_W + 12


def draw_svg(snapshot: list[dict], made_by: str, marker_id: str) -> str:
    """The SVG text: edges first (under the boxes), then one ``<g class="node ...">`` per
    node. ``made_by`` picks the highlighted nodes; ``marker_id`` must be unique in the page."""
    graph, boxes, width, height = layout(snapshot)
    made = {n["name"] for n in snapshot if n["made_by"] == made_by}
    parts = [f'<svg class="graph" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
             f'aria-label="graph after {escape(made_by)}: {len(boxes)} nodes">',
             f'<defs><marker id="{escape(marker_id)}" viewBox="0 0 6 6" refX="6" refY="3" '
             'markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L6,3 L0,6 z"/></marker></defs>']
    for src, dst in graph.edges:
        parts.append(_edge(boxes[src], boxes[dst], src in made or dst in made, marker_id))
    for name, box in boxes.items():
        parts.append(_box(box, name in made))
    parts.append("</svg>")
    return "\n".join(parts)


def _edge(src: Box, dst: Box, made: bool, marker_id: str) -> str:
    x1, y1, x2, y2 = src.center, src.y + BOX_H, dst.center, dst.y
    bend = min(ROW_PITCH - BOX_H, (y2 - y1) / 2)
    cls = "edge made" if made else "edge"
    return (f'<path class="{cls}" data-from="{escape(src.node["name"])}" data-to="{escape(dst.node["name"])}" '
            f'd="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}" '
            f'marker-end="url(#{escape(marker_id)})"/>')


def _box(box: Box, made: bool) -> str:
    node = box.node
    opcode = node["op"] if node["op"] in OPCODES else "other"
    first, second = labels(node)
    tip = (f"{node['name']}\n{node['op']}: {node['target']}\nshape: {node['shape'] or '?'}\n"
           f"made by: {node['made_by']}\ninputs: {', '.join(node['inputs']) or '-'}")
    return (f'<g class="node {opcode}{" made" if made else ""}" data-name="{escape(node["name"])}">'
            f"<title>{escape(tip)}</title>"
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{BOX_H}" rx="4"/>'
            f'<text x="{box.x + 6:.1f}" y="{box.y + 13:.1f}" class="name">{escape(first)}</text>'
            f'<text x="{box.x + 6:.1f}" y="{box.y + 25:.1f}">{escape(second)}</text></g>')
