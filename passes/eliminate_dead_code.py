"""Dead-code elimination that keeps in-place writes (static KV caches mutate buffers in place)."""

from __future__ import annotations

from torch import fx

from .graph_ops import IN_PLACE_WRITES, op_name


def is_impure(node: fx.Node) -> bool:
    if node.is_impure():
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    name = op_name(node)
    return name in IN_PLACE_WRITES or (name.endswith("_") and not name.startswith("_"))


def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    return gm
