"""Lowering: give every FusedGroup of an optimized graph its generated Triton kernel, and
write the sources where the dumps go."""

from __future__ import annotations

from pathlib import Path

from torch import fx

from fusegen.codegen import cache
from fusegen.codegen.pointwise import generate_source, source_key
from fusegen.fused_group import FusedGroup


def group_source(group: FusedGroup) -> str:
    """The generated source of ``group``'s kernel, named by its content (cache.name_by_content)."""
    return cache.name_by_content(generate_source(group, cache.PLACEHOLDER), "fused")[1]


def lower(gm: fx.GraphModule, dump_dir: Path | None = None) -> list[dict]:
    """Attach kernels to the graph's FusedGroups; returns one record per kernel."""
    records = []
    for name, module in gm.named_children():
        if not isinstance(module, FusedGroup):
            continue
        source = group_source(module)
        module.source = source
        module.kernel = cache.load(source).launch
        records.append({"group": name, "schedule": module.schedule, "source_hash": source_key(source),
                        "ops": module.extra_repr()})
        if dump_dir is not None:
            kernels = Path(dump_dir) / "kernels"
            kernels.mkdir(parents=True, exist_ok=True)
            (kernels / f"{name}.py").write_text(source)
    return records
