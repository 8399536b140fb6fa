"""Dead-code elimination that keeps in-place writes (static KV caches mutate buffers in place),
except writes into a tensor the graph allocated itself and never reads."""

from __future__ import annotations

from torch import fx

from .graph_ops import IN_PLACE_WRITES, op_name, writes_in_place

LOCAL_ALLOCATIONS = {"new_empty", "new_zeros", "new_full", "empty", "zeros", "full", "empty_like", "zeros_like"}


def is_impure(node: fx.Node) -> bool:
    if node.is_impure():
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    return writes_in_place(node)


def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    while _erase_unread_local_writes(gm.graph):
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    return gm


def _erase_unread_local_writes(graph: fx.Graph) -> bool:
    """Erase the writes (and the views they write through) into graph-allocated tensors nothing reads,
    e.g. a key buffer filled by copy_ whose attention was lowered to another form."""
    erased = False
    for buffer in [n for n in graph.nodes if op_name(n) in LOCAL_ALLOCATIONS]:
        writes = _unread_writes(buffer)
        for node in writes or ():
            graph.erase_node(node)
        erased |= bool(writes)
    return erased


def _unread_writes(buffer: fx.Node) -> list[fx.Node] | None:
    """Every user of `buffer`, in erasable order, when all of them only write into it (directly or
    through a getitem view); None as soon as one reads it."""
    found = []
    for user in buffer.users:
        if _is_unread_write(user, buffer):
            found.append(user)
        elif op_name(user) == "getitem" and user.args[0] is buffer and all(
                _is_unread_write(write, user) for write in user.users):
            found += [*user.users, user]
        else:
            return None
    return found


def _is_unread_write(node: fx.Node, destination: fx.Node) -> bool:
    return op_name(node) in IN_PLACE_WRITES and node.args[0] is destination and not node.users
