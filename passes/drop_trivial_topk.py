"""A top-1 over a dimension of size 1  ->  its input (values) and zeros (indices).

Group-limited MoE routers (DeepSeek-V3, GLM-4.x, DSA models) pick `topk_group` of `n_group` expert
groups per token: with `n_group = topk_group = 1`, as GLM-4.7-Flash is configured, that is a top-1 of
one group. The answer is known without looking (the group itself), but a decode step still launches
the group top-1 and the top-2 per group that feeds its scores, each a small CUDA kernel per MoE layer.
Replaced by what they compute, the group mask becomes all ones and the top-2 dies with its only reader.
Exact for any graph: a top-1 along a static size-1 dim returns the input and index 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from .graph_ops import op_name, shape_of, take_location, topk_args, topk_item_users

if TYPE_CHECKING:
    from .manager import PassContext


def drop_trivial_topk(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each trivial top-1 (a static size-1 dim, k = 1) -> (input, zeros)."""
    for node in list(gm.graph.nodes):
        if op_name(node) == "topk" and _trivial(node):
            _replace(gm, node)
            ctx.counters["drop_trivial_topk.replaced"] += 1
    return gm


def _trivial(topk: fx.Node) -> bool:
    x, k, dim = topk_args(topk)
    shape = shape_of(x) if isinstance(x, fx.Node) else None
    if shape is None or not isinstance(k, int) or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        return False
    try:
        topk_item_users(topk)
    except ValueError:
        return False  # the result is used whole (a tuple passed on): left alone
    size = shape[dim]  # a SymInt is never compared: no guard, no data-dependent error on an unbacked size
    return k == 1 and isinstance(size, int) and size == 1


def _replace(gm: fx.GraphModule, topk: fx.Node) -> None:
    x = topk_args(topk)[0]
    users = topk_item_users(topk)
    replacements = {}
    with gm.graph.inserting_before(topk):
        if users.get(0):
            replacements[0] = gm.graph.call_method("clone", (x,))  # a new tensor, as topk's values are
        if users.get(1):
            replacements[1] = gm.graph.call_function(torch.zeros_like, (x,), {"dtype": torch.int64})
    for item, replacement in replacements.items():
        take_location(replacement, topk)
        for user in users[item]:
            user.replace_all_uses_with(replacement)
            gm.graph.erase_node(user)
    gm.graph.erase_node(topk)
