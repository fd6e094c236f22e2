"""One self-contained HTML page that shows what every pass of a compile did.

``write_html_report(compiled, path)`` writes a single file that needs nothing else: inline
CSS, a few lines of inline JS, inline SVG pictures, and a Content-Security-Policy that
forbids loading anything from elsewhere. Its sections (``<section id=...>``):

    summary    model class, config, total compile time, node counts before and after
    passes     one row per pass: changed, nodes, nodes made, milliseconds, rewrite counters
    ops        node count of every op after every pass (``CompileReport.op_table``)
    graphs     the graph after every pass (``fusegen.graph_svg``); nodes it made highlighted
    kernels    every generated Triton kernel: group, schedule, ops, source hash, source
    analysis   a table of caller-supplied rows (columns: the dicts' keys)

Everything taken from the model, the graph or the rows is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fusegen.graph_svg import OPCODES, draw_svg

SECTIONS = ("summary", "passes", "ops", "graphs", "kernels", "analysis")

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:")

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1e293b; background: #f8fafc; }
header { background: #0f172a; color: #f8fafc; padding: 10px 24px; }
header h1 { font-size: 20px; margin: 0 0 4px; }
nav a { color: #93c5fd; margin-right: 14px; }
main { padding: 0 24px 40px; }
section { background: #fff; border: 1px solid #e2e8f0; border-radius: 6px; margin: 16px 0;
          padding: 4px 16px 12px; }
h2 { font-size: 17px; border-bottom: 1px solid #e2e8f0; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #e2e8f0; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f1f5f9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.zero { color: #cbd5e1; }
td.delta { background: #ffedd5; font-weight: 600; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 0; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; font-family: ui-monospace, monospace; }
code, pre { font-family: ui-monospace, monospace; font-size: 12px; }
details { border: 1px solid #e2e8f0; border-radius: 4px; margin: 6px 0; }
summary { cursor: pointer; padding: 4px 8px; background: #f1f5f9; }
.legend { padding: 4px 8px; font-size: 12px; }
.sw { display: inline-block; width: 12px; height: 12px; border: 1px solid #64748b;
      vertical-align: middle; margin: 0 4px 0 10px; }
.scroll { overflow: auto; max-height: min(75vh, 900px); border-top: 1px solid #e2e8f0; }
svg.graph { display: block; font: 10.5px ui-monospace, monospace; }
svg.graph .node rect { fill: #fff; stroke: #64748b; }
svg.graph .node.placeholder rect, .sw.placeholder { fill: #dbeafe; background: #dbeafe; }
svg.graph .node.get_attr rect, .sw.get_attr { fill: #e2e8f0; background: #e2e8f0; }
svg.graph .node.call_module rect, .sw.call_module { fill: #ede9fe; background: #ede9fe; }
svg.graph .node.output rect, .sw.output { fill: #dcfce7; background: #dcfce7; }
svg.graph .node.made rect, .sw.made { fill: #fb923c; background: #fb923c; stroke: #9a3412; stroke-width: 2; }
svg.graph .node text.name { font-weight: 700; }
svg.graph .edge { fill: none; stroke: #94a3b8; }
svg.graph .edge.made { stroke: #ea580c; stroke-width: 1.5; }
svg.graph marker path { fill: #64748b; }
.kernels { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 0 16px; }
article.kernel { border-top: 1px solid #e2e8f0; margin-top: 8px; min-width: 0; }
article.kernel pre { background: #0f172a; color: #e2e8f0; padding: 8px; max-height: 15em; overflow: auto; }
"""

_JS = """
document.querySelectorAll("button[data-details]").forEach(function (button) {
  button.addEventListener("click", function () {
    var open = button.dataset.details === "open";
    document.querySelectorAll("#graphs details").forEach(function (d) { d.open = open; });
  });
});
"""


def write_html_report(compiled, path, analysis_rows: list[dict] | None = None,
                      title: str | None = None) -> Path:
    """Write the report of ``compiled`` (a ``CompiledModel``) to ``path``; returns the path.
    ``analysis_rows``: one dict per row of the analysis table, or None (not run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(compiled, analysis_rows, title), encoding="utf-8")
    return path


def render_html(compiled, analysis_rows: list[dict] | None = None, title: str | None = None) -> str:
    """The page's text; ``write_html_report`` takes the same arguments."""
    report = compiled.report
    title = title or f"fusegen report: {report.model_class}"
    body = [_summary(compiled), _passes(report.records), _ops(report.records), _graphs(report.records),
            _kernels(compiled), _analysis(analysis_rows)]
    nav = "".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title><style>{_CSS}</style></head>\n'
            f"<body><header><h1>{escape(title)}</h1><nav>{nav}</nav></header>\n<main>\n"
            + "\n".join(body) + f"\n</main><script>{_JS}</script></body></html>\n")


def _section(name: str, heading: str, content: str) -> str:
    return f'<section id="{name}"><h2>{escape(heading)}</h2>\n{content}\n</section>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """``header`` is escaped here; ``rows`` hold ready-made ``<td>`` cells."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "\n".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _td(value, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{escape(str(value))}</td>"


def _summary(compiled) -> str:
    report = compiled.report
    records = report.records
    facts = [("model class", report.model_class), ("config", str(report.config)),
             ("graph kind", getattr(compiled, "kind", "?")),
             ("total compile time", f"{report.seconds:.2f} s (capture and {len(records) - 1} passes)"),
             ("nodes after capture", records[0].total_nodes if records else "?"),
             ("nodes after the last pass", records[-1].total_nodes if records else "?"),
             ("generated kernels", len(compiled.facts.get("kernels", []))),
             ("dump directory", report.dump_dir or "none")]
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in facts)
    return _section("summary", "Summary", f'<dl class="facts">{items}</dl>')


def _passes(records) -> str:
    rows = []
    for i, r in enumerate(records):
        counters = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
        rows.append([_td(f"{i:02d}"), f'<td><a href="#graph-{i:02d}">{escape(r.name)}</a></td>',
                     _td("yes" if r.changed else "no"), _td(r.total_nodes, "num"), _td(r.nodes_made, "num"),
                     _td(f"{r.seconds * 1e3:.0f}", "num"), _td(counters)])
    header = ["step", "pass", "changed", "nodes", "made", "ms", "counters"]
    return _section("passes", "Passes", _table(header, rows, "passes"))


def _ops(records) -> str:
    """Cells where a count differs from the step before are marked ``delta``."""
    ops = sorted(set().union(*(r.node_counts for r in records)))
    rows = []
    for op in ops:
        counts = [r.node_counts.get(op, 0) for r in records]
        cells = [_td(op)]
        for i, n in enumerate(counts):
            cls = "num delta" if i and n != counts[i - 1] else "num zero" if n == 0 else "num"
            cells.append(_td(n, cls))
        rows.append(cells)
    header = ["op"] + [f"{i:02d} {r.name}" for i, r in enumerate(records)]
    note = "<p>Node count of every op after every step; a highlighted cell changed in that step.</p>"
    return _section("ops", "Ops after every pass", note + _table(header, rows, "ops"))


def _graphs(records) -> str:
    parts = ["<p>The graph after every step, every node and edge: inputs above, users below; "
             "hover a box for its shape, provenance and inputs. "
             '<button data-details="open">open all</button> '
             '<button data-details="close">close all</button></p>']
    for i, r in enumerate(records):
        made = sum(1 for n in r.snapshot if n["made_by"] == r.name)
        opened = " open" if i == len(records) - 1 else ""
        legend = (f'<span class="sw made"></span>made by {escape(r.name)} ({made})'
                  + "".join(f'<span class="sw {op}"></span>{op}'
                            for op in OPCODES))
        parts.append(f'<details id="graph-{i:02d}" data-pass="{escape(r.name)}"{opened}>'
                     f"<summary>{i:02d} {escape(r.name)}: {len(r.snapshot)} nodes, {made} made</summary>"
                     f'<div class="legend">{legend}</div>'
                     f'<div class="scroll">{draw_svg(r.snapshot, r.name, f"arrow-{i:02d}")}</div></details>')
    return _section("graphs", "Graphs", "\n".join(parts))


def _kernels(compiled) -> str:
    kernels = compiled.facts.get("kernels", [])
    if not kernels:
        return _section("kernels", "Generated kernels", "<p>No kernels were generated for this graph.</p>")
    parts = []
    for k in kernels:
        module = getattr(compiled.graph_module, k["group"], None)
        source = getattr(module, "source", None) or "(source not available)"
        facts = "".join(f"<dt>{name}</dt><dd>{escape(str(k.get(name, '')))}</dd>"
                        for name in ("schedule", "ops", "source_hash"))
        parts.append(f'<article class="kernel" id="kernel-{escape(k["group"])}"><h3>{escape(k["group"])}</h3>'
                     f'<dl class="facts">{facts}</dl><pre><code>{escape(source)}</code></pre></article>')
    return _section("kernels", "Generated kernels", '<div class="kernels">' + "\n".join(parts) + "</div>")


def _analysis(rows: list[dict] | None) -> str:
    if rows is None:
        return _section("analysis", "Analysis", "<p>The analysis was not run.</p>")
    if not rows:
        return _section("analysis", "Analysis", "<p>The analysis gave no rows.</p>")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_td(_cell(row.get(c, ""))) for c in columns] for row in rows]
    return _section("analysis", "Analysis", _table(columns, cells, "analysis"))


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.6g}" if isinstance(value, float) else str(value)
