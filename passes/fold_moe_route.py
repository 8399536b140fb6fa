"""`ic::moe_route` read only by one `ic::moe_experts`  ->  `ic::moe_route_experts` (one launch fewer).

After lower_moe_router and lower_moe_experts a decode step's MoE layer runs the router's logits GEMV,
the route kernel (~1.8 us on an H100 for 64 values a token, plus its gap in the CUDA graph) and the
experts' two kernels. The experts' gate/up kernel can route for itself: each of its programs needs
one expert id of its token, and computing the token's routing from the [E] logits is the route
kernel's own code (kernels/moe_router.route_row), so ids and weights are the same values; the
row-block-0 program of each pair writes them out for the down kernel.

Taken: a lowered experts call whose ids and weights are the two outputs of one lowered route call,
read through the casts lower_moe_router leaves (ids to an integer dtype, weights to fp32: both keep
the values) and by nothing else. A cast of the weights to another dtype (a model that rounds them to
bf16 before the experts) or a second reader (an auxiliary loss, a logged routing) leaves both calls
as they are.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from .graph_ops import module_path, op_name, take_location
from .lower_moe_experts import lowered_moe_experts
from .lower_moe_router import lowered_moe_route

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

_FOLDS = True  # private switch for A/B runs (bench/e2e.py --without route_in_experts)
_INT_DTYPES = (torch.int32, torch.int64)


def fold_moe_route(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each lowered experts call fed by one lowered route call alone -> `lowered_moe_route_experts`
    (ctx.report.moe_route_folded: the experts calls' module paths)."""
    if not _FOLDS:
        return gm
    for experts in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is lowered_moe_experts]:
        bound = inspect.signature(lowered_moe_experts).bind(*experts.args, **experts.kwargs).arguments
        route = _sole_route(bound["ids"], bound["weights"], experts)
        if route is None:
            continue
        _replace(gm, experts, route, bound)
        ctx.report.moe_route_folded.append(module_path(experts) or experts.name)
        ctx.counters["fold_moe_route.folded"] += 1
        log.info("fold_moe_route: %s routes in its experts call", module_path(experts) or experts.name)
    return gm


def lowered_moe_route_experts(hidden, logits, bias, top_k, n_group, topk_group, renormalize, scale, gate_up, down,
                              swiglu_limit=None, shared_gate=None, shared_up=None, shared_down=None):
    """hidden [.., H] with T*H elements, logits [.., E] with T*E -> [T,H] in hidden's dtype."""
    return torch.ops.ic.moe_route_experts(hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1]),
                                          bias, top_k, n_group, topk_group, renormalize, scale, gate_up, down,
                                          swiglu_limit, shared_gate, shared_up, shared_down)


def _sole_route(ids: fx.Node, weights: fx.Node, experts: fx.Node) -> fx.Node | None:
    """The lowered route call whose outputs 1 and 0 reach `experts` as ids and weights through
    value-keeping casts read by nothing else, else None."""
    ids_out, weights_out = _through_cast(ids, _INT_DTYPES, experts), _through_cast(weights, (torch.float32,), experts)
    if ids_out is None or weights_out is None:
        return None
    outputs = (weights_out, ids_out)
    for index, out in enumerate(outputs):
        if out.op != "call_function" or out.target is not operator.getitem or out.args[1] != index:
            return None
    route = ids_out.args[0]
    if not isinstance(route, fx.Node) or route.target is not lowered_moe_route or weights_out.args[0] is not route:
        return None
    return route if set(route.users) == set(outputs) else None


def _through_cast(node, dtypes: tuple, reader: fx.Node) -> fx.Node | None:
    """The node behind `node`, a `.to(dtype)` with dtype in dtypes read by `reader` alone (or `node`
    itself when it is no cast), when what it reaches is read by nothing else; else None."""
    if not isinstance(node, fx.Node) or set(node.users) != {reader}:
        return None
    if op_name(node) != "to":
        return node
    source = node.args[0]
    dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
    if dtype not in dtypes or len(node.args) > 2 or set(node.kwargs) - {"dtype"} or not isinstance(source, fx.Node):
        return None
    return source if set(source.users) == {node} else None


def _replace(gm: fx.GraphModule, experts: fx.Node, route: fx.Node, bound: dict) -> None:
    ids, weights = bound["ids"], bound["weights"]
    rest = {name: value for name, value in bound.items() if name not in ("hidden", "ids", "weights")}
    with gm.graph.inserting_before(experts):
        fused = gm.graph.call_function(lowered_moe_route_experts, (bound["hidden"], *route.args), rest)
    take_location(fused, experts)
    experts.replace_all_uses_with(fused)
    gm.graph.erase_node(experts)
    for node in (ids, weights):  # each chain back to the route (cast, getitem), then the route
        while node is not route and not node.users:
            node, dead = node.args[0], node
            gm.graph.erase_node(dead)
    gm.graph.erase_node(route)


__all__ = ["fold_moe_route", "lowered_moe_route_experts"]
