"""S layers read the top-k of their F source; their own topk is left without users (DCE removes it)."""

from __future__ import annotations

from torch import fx

from .bind_plan import LayerBinding


def forward_indices(gm: fx.GraphModule, bindings: list[LayerBinding]) -> fx.GraphModule:
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for b in bindings:
        if b.role == "F":
            continue
        own, source = b.match.topk, b.source.topk
        if order[source] > order[own]:
            raise RuntimeError(f"layer {b.match.layer}'s source topk comes after it in the graph")
        own.replace_all_uses_with(source)  # getitem(own, i) -> getitem(source, i): values and indices
    return gm
