"""The weight read right after a sparse MLA call -> asked of L2 while the attention runs (decode).

At a decode step the absorbed sparse-MLA kernel is latency-bound: one query's 2048 selected latent
rows (2.4 MB) in 64 short programs, on half the SMs, with HBM nearly idle. The kernels after it read
their weights cold: MLA's value up-projection (kv_b_proj's value half, 2.6 MB at GLM-4.7-Flash's
shape) and o_proj (21 MB), each a GEMV that pays HBM's latency before it streams. Here the lowered
call gets the parameter(s) of the first call its output reaches (through layout ops alone: o_proj,
a plain linear or an ic::multi_linear), and `lowered_absorbed_mla` hands them with the value half to
ic::sparse_mla, whose extra programs, on the SMs the attention leaves idle, ask L2 for their lines
and exit (kernels/sparse_attention.py). No value changes; where no SM is idle (prefill) the kernel
adds no program.

Off (`_PREFETCHES`): a chain of decode layers with the attention ran 2 % slower with it
(bench/decode_chain.py --attention; docs/benchmarks.md, "tried"); kept for the A/B
(`bench/e2e.py --with l2_prefetch`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import fx

from .graph_ops import LAYOUT_OPS, is_parameter, op_name
from .lower_sparse_attention import lowered_absorbed_mla

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

_PREFETCHES = False  # private switch (bench/e2e.py --with l2_prefetch); off: measured slower


def prefetch_weights(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each lowered absorbed-MLA call -> the same call told the weight its output meets next
    (ctx.counters["prefetch_weights.calls"])."""
    if not _PREFETCHES:
        return gm
    for call in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is lowered_absorbed_mla]:
        weights = _next_weights(call)
        if weights:
            call.kwargs = {**call.kwargs, "prefetch": tuple(weights)}
            ctx.counters["prefetch_weights.calls"] += 1
            log.info("prefetch_weights: %s asks L2 for %s", call.name, [w.name for w in weights])
    return gm


def _next_weights(call: fx.Node) -> list[fx.Node]:
    """The parameters of the one call that `call`'s output reaches through layout ops, else []."""
    node = call
    while len(node.users) == 1:
        (node,) = node.users
        if op_name(node) not in LAYOUT_OPS:
            return [a for a in node.args if isinstance(a, fx.Node) and is_parameter(a)][:1]
    return []


__all__ = ["prefetch_weights"]
