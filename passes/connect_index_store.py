"""A graph fragment's S layers read their F source's top-k from the index store; its F layers that
S layers in later fragments read write theirs there (`ic_compile/index_store.py` moves the tensors).

S layers reading the store: their topk's uses become new graph inputs `ic_index_store_<S>_from_<F>_<item>`
(item 0 values, 1 indices), so their indexer dies with DCE. F layers writing it: (values, indices)
become extra graph outputs, after the model's own. Nothing to do for a whole-model graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from .graph_ops import add_inputs, add_outputs, shape_of, topk_item_users

if TYPE_CHECKING:
    from .manager import PassContext


def connect_index_store(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: ctx.fragment's reads become inputs (each read records which items and the shapes
    the graph was traced with, which the store checks), its writes extra outputs."""
    if ctx.fragment is None:
        return gm
    for read in ctx.fragment.reads:
        users = topk_item_users(read.match.topk)
        read.items = tuple(sorted(users))
        read.shapes = tuple(shape_of(users[item][0]) for item in read.items)
        placeholders = add_inputs(gm, [(f"ic_index_store_{read.layer}_from_{read.source}_{item}", users[item][0])
                                       for item in read.items])
        for item, placeholder in zip(read.items, placeholders):
            _mark_store_input(placeholder)
            for user in users[item]:
                user.replace_all_uses_with(placeholder)
                gm.graph.erase_node(user)
            ctx.counters["connect_index_store.inputs"] += 1
    if ctx.fragment.writes:
        add_outputs(gm, [(w.match.topk, item) for w in ctx.fragment.writes for item in (0, 1)])
        ctx.counters["connect_index_store.outputs"] += 2 * len(ctx.fragment.writes)
    return gm


def _mark_store_input(placeholder: fx.Node) -> None:
    """AOTAutograd maps every input of a Dynamo graph to its source (for aliasing guards and to find
    static inputs); the store's inputs are not in the frame, so they get a local of their own name,
    which nothing reads (they never alias another input: they are fresh topk outputs)."""
    from torch._dynamo.source import LocalSource
    placeholder._dynamo_source = LocalSource(placeholder.name)
