"""Graph passes: one pass per file, their order in ``pipeline.py``, and the machinery that
runs them (``infra.py``: results, provenance, verification; ``dump.py``: per-pass dumps)."""

from fusegen.passes.infra import PassContext, PassResult, graph_pass
from fusegen.passes.pipeline import build_pipeline, run_pipeline

__all__ = ["PassContext", "PassResult", "graph_pass", "build_pipeline", "run_pipeline"]
