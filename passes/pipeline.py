"""The pass order, as one list. Optional passes sit inline behind their flag."""

from __future__ import annotations

import time

from torch import fx

from fusegen.config import CompileConfig
from fusegen.passes.cleanup_graph import cleanup_graph
from fusegen.passes.convert_mha_to_gqa import convert_mha_to_gqa
from fusegen.passes.dump import DumpWriter, PassRecord, graph_snapshot
from fusegen.passes.fuse_attention import fuse_attention
from fusegen.passes.fuse_pointwise import fuse_pointwise
from fusegen.passes.fuse_projections import fuse_projections
from fusegen.passes.infra import GraphPass, PassContext, mark_provenance, node_counts, verify
from fusegen.passes.insert_kv_cache import insert_kv_cache
from fusegen.passes.insert_paged_blocks import insert_paged_blocks
from fusegen.passes.normalize_graph import normalize_graph
from fusegen.passes.quantize_kv_cache import quantize_kv_cache
from fusegen.passes.quantize_weights import quantize_weights
from fusegen.passes.shard_tensor_parallel import shard_tensor_parallel


def build_pipeline(cfg: CompileConfig) -> list[GraphPass]:
    passes = [
        # Phase 1 - clean up what capture left and put the graph in canonical form.
        cleanup_graph if cfg.cleanup else None,
        normalize_graph,
        # Phase 2 - attention: one fused op per site, then (opt-in, lossy) fewer KV heads.
        fuse_attention if cfg.fuse_attention else None,
        convert_mha_to_gqa if cfg.gqa_kv_heads else None,
        # Projections of one input become one GEMM (after GQA, which needs separate K/V linears).
        fuse_projections if cfg.fuse_projections else None,
        # Opt-in, lossy: linear weights stored in 8 or 4 bits (after fusion: one fused weight each).
        quantize_weights if cfg.weights != "none" else None,
        # Phase 3 - state: K/V written to a cache, then the cache becomes a paged pool.
        insert_kv_cache if cfg.insert_kv_cache else None,
        insert_paged_blocks if cfg.paged_kv else None,
        # Tensor parallelism: this rank's heads and columns, collectives between the ranks
        # (after the KV passes: the cache becomes the rank's heads).
        shard_tensor_parallel if cfg.tp > 1 else None,
        # Opt-in, lossy: the paged pool stored as fp8 with per-head scales.
        quantize_kv_cache if cfg.kv_dtype == "fp8" else None,
        # Phase 4 - kernels: small ops grouped for generated Triton kernels.
        fuse_pointwise if cfg.fuse_pointwise else None,
    ]
    return [p for p in passes if p is not None]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, dump: DumpWriter | None = None,
                 capture_seconds: float = 0.0, on_pass=None) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run every pass of ``build_pipeline(ctx.config)`` on ``gm`` (which the pipeline owns),
    verifying and (optionally) dumping after each one; ``on_pass(name)`` is called as each
    pass starts."""
    made = mark_provenance(gm, "capture")
    counts = {k: v for k, v in gm.meta.get("fusegen_capture", {}).items() if isinstance(v, int)}
    records = [PassRecord("capture", True, capture_seconds, counts, node_counts(gm), made, graph_snapshot(gm))]
    if dump:
        dump.graph(0, records[0], gm)
    for index, graph_pass in enumerate(build_pipeline(ctx.config), start=1):
        if on_pass is not None:
            on_pass(graph_pass.name)
        before = set(gm.graph.nodes)
        start = time.perf_counter()
        result = graph_pass(gm, ctx)
        gm = result.gm
        gm.recompile()
        if result.changed:
            verify(gm, graph_pass, ctx)
        seconds = time.perf_counter() - start
        made = mark_provenance(gm, graph_pass.name, before)
        record = PassRecord(graph_pass.name, result.changed, seconds, dict(result.stats),
                            node_counts(gm), made, graph_snapshot(gm))
        records.append(record)
        if dump:
            dump.graph(index, record, gm)
    if dump:
        dump.summary(records)
    return gm, records
