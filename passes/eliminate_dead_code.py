"""Dead-code elimination that keeps in-place writes (static KV caches mutate buffers in place),
except in-place ops on a tensor the graph allocated itself and nothing reads: writes into a local
buffer, `torch.full(...).triu_(1)` masks whose reader was removed."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

from torch import fx

from .graph_ops import LAYOUT_OPS, op_name, writes_in_place

if TYPE_CHECKING:
    from .manager import PassContext

# ops that always return a new tensor (never an alias of an input): an in-place op on their result
# writes memory only this graph can see
FRESH = {"new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "empty", "zeros", "ones", "full",
         "empty_like", "zeros_like", "ones_like", "full_like", "arange", "tensor", "clone", "eye", "rand",
         "randn", "rand_like", "randn_like"}
# ops whose result may share memory with their first argument: a view of the temporary is the temporary
VIEWS = LAYOUT_OPS | {"split", "chunk", "unbind", "select", "slice", "t", "detach", "view_as", "as_strided",
                      "diagonal", "unfold", "tensor_split", "split_with_sizes"}
# Python's augmented assignment on a tensor (x += y) traces as these and writes into x
IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor}


def is_impure(node: fx.Node) -> bool:
    if node.is_impure():
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    return writes_in_place(node)


def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass (the runner counts the nodes it removes)."""
    ctx.counters["eliminate_dead_code.dead_temporaries"] += remove_dead_code(gm.graph)
    return gm


def remove_dead_code(graph: fx.Graph) -> int:
    """Dead nodes out of `graph`, in-place writes kept unless into a dead temporary; returns how many
    dead temporaries went (each with its views and the in-place ops on it)."""
    total = 0
    graph.eliminate_dead_code(is_impure_node=is_impure)
    while erased := _erase_dead_temporaries(graph):  # their inputs may be dead now
        total += erased
        graph.eliminate_dead_code(is_impure_node=is_impure)
    return total


def _erase_dead_temporaries(graph: fx.Graph) -> int:
    """Erase every graph-allocated tensor that nothing reads, with its views and the in-place ops on
    it (e.g. a key buffer filled by copy_ whose attention was lowered to another form, or a causal
    mask built with triu_ whose indexer was removed). Plain DCE keeps them: in-place ops are impure.
    Returns how many such temporaries it erased."""
    erased = 0
    for fresh in [n for n in graph.nodes if op_name(n) in FRESH]:
        group = _dead_alias_group(fresh)
        for node in reversed(group or ()):
            graph.erase_node(node)
        erased += bool(group)
    return erased


def _dead_alias_group(fresh: fx.Node) -> list[fx.Node] | None:
    """`fresh`, its views and the in-place ops on them (which return the same memory), in graph
    order, when nothing else reads any of them; None as soon as one is read (or leaves the graph)."""
    group, frontier = {fresh}, [fresh]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in group:
                continue
            if not _aliases_first_argument(user, node):
                return None  # read by an op that is not a view of it or an in-place op on it
            group.add(user)
            frontier.append(user)
    return [n for n in fresh.graph.nodes if n in group]


def _aliases_first_argument(user: fx.Node, node: fx.Node) -> bool:
    """Is `user` a view of `node` or an in-place op writing into it (its result is `node`'s memory)?"""
    if user.op not in ("call_function", "call_method") or not user.args or user.args[0] is not node:
        return False
    if any(arg is node for arg in user.args[1:]) or node in user.kwargs.values():
        return False  # x.copy_(x[::-1])-like ops also read it as a value
    return op_name(user) in VIEWS or writes_in_place(user) or user.target in IN_PLACE_OPERATORS
