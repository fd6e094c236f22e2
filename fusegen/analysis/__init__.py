"""A roofline cost model of an optimized graph.

Every costed node gets three sympy expressions in the symbols ``B`` (sequences) and ``T``
(tokens per sequence), with the model's sizes as numbers: FLOPs, bytes read, bytes written.
They are evaluated for two phases of serving:

    prefill  B sequences of T new tokens each, each attending causally over its own T tokens
    decode   B sequences with one new token each, each attending over a context of T tokens
             (the T-th being the new one)

and compared with a GPU's datasheet roof (Williams, Waterman, Patterson, "Roofline", CACM
2009): a node's time floor is ``max(FLOPs / peak, bytes / bandwidth)``; it is compute-bound
when its intensity ``FLOPs / (bytes read + written)`` reaches the ridge point
``peak / bandwidth``. A phase's floor is the sum of its nodes' floors (no overlap between
kernels). What each node kind moves::

    linear / lm_head  2*M*K*N FLOPs; reads x [M,K] and the weight [N,K] (+ bias); writes [M,N]
    attention         4*D*Hq per (query, key attended) pair -- only unmasked pairs, so causal
                      prefill counts T(T+1)/2 keys per head and sequence; reads q, the K and V
                      of the keys it attends (Hkv heads, once each); writes the output
    kv_write          reads this step's k, v and the slots; writes them into the cache
    fused             one generated kernel: reads each input once, writes each output once;
                      FLOPs = sum over its ops of the op's largest operand's element count
    embedding         reads one table row per token (and the ids); writes them
    index_select      reads the selected rows (and the indices); writes them
    other             views, reshapes, getitem are free; anything else reads its inputs and
                      writes its outputs (matmuls 2*M*K*N FLOPs, copies 0, else 1 per element)

Element sizes come from the graph's dtypes; ``dtype`` replaces the size of every floating
tensor (an fp32 CPU graph analysed for a bf16 GPU run). Metadata reads of attention (block
tables, sequence lengths) are left out: they are a few bytes per block.

Operand intensity (the convention of published decoding-efficiency analyses) is computed next
to the true FLOP/byte intensity: for one matrix product [M,K] x [K,N] it is the number of
multiply-accumulates per element of the two operands read,

    M*K*N / (M*K + K*N)

which equals FLOP per byte for 16-bit operands when only the operand reads are counted (the
output write is not). A linear is one such product with M = tokens. Attention is two per
head and sequence over the dense (unmasked) square: QK^T with (M, K, N) = (Tq, D, Tkv) and
PV with (Tq, Tkv, D), where Tq = new tokens and Tkv = context of the sequence.

Modules::

    target   GPU datasheet roofs and dtype names
    phases   the symbols B, T, the prefill and decode phases, binding a graph's sizes to them
    costs    symbolic per-node costs, one rule per node kind
    summary  evaluation at (batch, seq) on a GPU; text table, summary rows, JSON dict
    plot     the roofline PNG
    cli      ``fusegen-cli analyze``
"""

from fusegen.analysis.cli import run_cli
from fusegen.analysis.costs import (KIND_ORDER, NodeCost, Product, graph_costs, is_free,
                                    keys_attended, node_cost)
from fusegen.analysis.phases import (B, DECODE, PREFILL, T, Phase, bind_symbols, graph_kind,
                                     phases_for)
from fusegen.analysis.summary import Analysis, PhaseCost, Row, analyze, analyze_graph
from fusegen.analysis.target import DTYPES, GPU, GPUS, gpu_spec, parse_dtype

__all__ = [
    "B", "T", "Phase", "PREFILL", "DECODE", "graph_kind", "phases_for", "bind_symbols",
    "GPU", "GPUS", "gpu_spec", "DTYPES", "parse_dtype",
    "Product", "NodeCost", "KIND_ORDER", "is_free", "keys_attended", "node_cost", "graph_costs",
    "Row", "PhaseCost", "Analysis", "analyze_graph", "analyze",
    "run_cli",
]
