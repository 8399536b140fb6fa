"""A group-limited sigmoid MoE router's tail  ->  `ic::moe_route` (one launch per MoE layer).

DeepSeek-V3-style routers (DeepSeek-V3/V3.2, GLM-4.5+ and GLM-DSA, Kimi-K2) turn the router GEMV's
logits into (routing weights, expert ids) with a sigmoid, a bias, a group pick and a top-k, a
gather and a normalisation: at decode a handful of small kernels per MoE layer, two of them
torch.topk's (kernels/moe_router.py). The GEMV stays; the rest becomes the op.

Matched by what it computes: a router module is the nodes Dynamo traced under one module that read
a 2-D parameter [E, H] through a linear (the logits) and hold a topk. Its tail is the module's nodes
downstream of the logits; it must take only the logits and at most one [E] tensor (the bias) from
outside and give back two [T, k] tensors, float weights and integer ids. The settings are read from
the tail (k from the ids, groups from a [T, G, E/G] view and the group top-k, constant factors as
candidate scales) and then checked: the tail and the op run on the same random logits with the
bias's real value, for each candidate (renormalised or not, each scale), and only a candidate that
gives the same (id, weight) pairs per token is used. The op returns the ids by descending score
where the model's torch.topk(sorted=False) leaves them in no order: pairs are compared per token
as sets, and the experts that read them sum over them. Anything else (softmax routers, another
group score, a bias read twice) is left as written, the reason in ctx.report.moe_router_skipped.
"""

from __future__ import annotations

import itertools
import logging
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ic_compile.kernels.moe_router import check_route_config

from .graph_ops import (example_value, is_parameter, is_real_tensor, op_name, shape_of, stack_path, subgraph_module,
                        take_location, tensor_args, writes_in_place)

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")
_CHECK_SEED = 0
# logit scales: ordinary, and sigmoids near 1 where the bias decides; not so large that fp32 sigmoids
# reach exactly 1.0, whose ties the model's topk and the op may break differently
_CHECK_SCALES = (1.0, 3.0)
_CASTS = {"to", "type", "float", "contiguous"}


@dataclass
class RouterTail:
    module: str
    nodes: list[fx.Node]  # the module's nodes downstream of the logits, in graph order
    logits: fx.Node  # [T, E], stays
    bias: fx.Node | None  # [E]
    weights: fx.Node  # [T, k] float
    ids: fx.Node  # [T, k] integer
    n_group: int = 1
    topk_group: int = 1
    scales: tuple = (1.0,)


def lower_moe_router(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each router tail that computes the routing above -> `lowered_moe_route`."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
    for key, nodes in _router_modules(gm).items():
        module = stack_path(nodes[0].meta["nn_module_stack"][key][0])
        tail = _tail(module, nodes)
        settings = tail if isinstance(tail, str) else _settings(tail, ctx.input_values)
        if isinstance(settings, str):
            ctx.report.moe_router_skipped[module] = settings
            ctx.counters["lower_moe_router.skipped"] += 1
            log.info("lower_moe_router: %s left as it is: %s", module, settings)
            continue
        _replace(gm, tail, *settings)
        ctx.report.moe_router_lowered.append(module)
        ctx.counters["lower_moe_router.lowered"] += 1
    return gm


def lowered_moe_route(logits, bias, top_k, n_group, topk_group, renormalize, scale):
    """logits [.., E] -> (weights fp32 [T, k], ids int64 [T, k])."""
    return torch.ops.ic.moe_route(logits.reshape(-1, logits.shape[-1]), bias, top_k, n_group, topk_group,
                                  renormalize, scale)


def _router_modules(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module key -> its call nodes, for modules that hold a topk and a linear over a 2-D parameter."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                found.setdefault(list(stack)[-1], []).append(node)
    return {key: nodes for key, nodes in found.items()
            if any(op_name(n) == "topk" for n in nodes) and any(_router_weight(n) is not None for n in nodes)}


def _router_weight(node: fx.Node) -> fx.Node | None:
    """The 2-D parameter a linear node multiplies by (through casts), else None."""
    if op_name(node) != "linear" or len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
        return None
    weight = node.args[1]
    while op_name(weight) in _CASTS and weight.args and isinstance(weight.args[0], fx.Node):
        weight = weight.args[0]
    shape = shape_of(weight)
    return weight if is_parameter(weight) and shape is not None and len(shape) == 2 else None


def _tail(module: str, nodes: list[fx.Node]) -> RouterTail | str:
    logits = next(n for n in nodes if _router_weight(n) is not None)
    inside, tail = {logits}, []
    for node in nodes:
        if node is not logits and any(a in inside for a in tensor_args(node)):
            inside.add(node)
            tail.append(node)
    inside.discard(logits)
    if any(writes_in_place(n) and n.args and n.args[0] not in inside for n in tail):
        return "the tail writes into a tensor from outside it (the logits, in place)"
    outside = list(dict.fromkeys(a for n in tail for a in tensor_args(n) if a not in inside))
    others = [a for a in outside if a is not logits]
    E = (shape_of(logits) or (0,))[-1]
    if len(others) > 1 or any(shape_of(a) != (E,) for a in others):
        return f"the tail reads {len(others)} tensors besides the logits (want at most one [E] bias)"
    outputs = [n for n in tail if any(u not in inside for u in n.users)]
    values = [example_value(n) for n in outputs]
    if len(outputs) != 2 or not all(isinstance(v, torch.Tensor) and v.dim() == 2 for v in values):
        return f"the tail gives {len(outputs)} tensors back (want weights and ids, [T, k] each)"
    if shape_of(logits) is None or len(shape_of(logits)) != 2:
        return "the logits are not [T, E]"
    ids, weights = sorted(outputs, key=lambda n: example_value(n).is_floating_point())
    if example_value(ids).is_floating_point() or not example_value(weights).is_floating_point():
        return "the tail's outputs are not (float weights, integer ids)"
    n_group, topk_group = _groups(tail, E)
    scales = tuple(dict.fromkeys([1.0, *(float(a) for n in tail if op_name(n) in ("mul", "mul_")
                                         for a in n.args if isinstance(a, float))]))
    return RouterTail(module, tail, logits, others[0] if others else None, weights, ids, n_group, topk_group, scales)


def _groups(tail: list[fx.Node], E: int) -> tuple[int, int]:
    """(n_group, topk_group) from a [T, G, E/G] view of the scores and the top-k over [T, G]."""
    for node in tail:
        shape = shape_of(node)
        if op_name(node) in ("view", "reshape") and shape is not None and len(shape) == 3 and \
                isinstance(shape[1], int) and shape[1] * shape[2] == E:
            groups = shape[1]
            for topk in (n for n in tail if op_name(n) == "topk"):
                source = shape_of(topk.args[0]) if topk.args and isinstance(topk.args[0], fx.Node) else None
                k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
                if source is not None and len(source) == 2 and source[-1] == groups and isinstance(k, int):
                    return groups, k
            return groups, groups
    return 1, 1


def _settings(tail: RouterTail, input_values: dict[str, Any] | None) -> tuple | str:
    """(renormalize, scale) under which the op gives the tail's answer, or why there is none."""
    k, E = shape_of(tail.ids)[-1], shape_of(tail.logits)[-1]
    why = check_route_config(E, k, tail.n_group, tail.topk_group)
    if why:
        return why
    bias = None
    if tail.bias is not None:
        bias = (input_values or {}).get(tail.bias.name)
        if not is_real_tensor(bias):
            return "the bias's value is not known at compile time: the tail cannot be checked"
    try:
        module = subgraph_module([tail.logits, *([tail.bias] if tail.bias is not None else [])], tail.nodes,
                                 (tail.weights, tail.ids))
    except KeyError:  # a node argument from outside that is not a tensor: a symbolic size, an attribute
        return "the tail reads sizes or values from the rest of the graph (dynamic shapes): not checked"
    device = bias.device if bias is not None else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(_CHECK_SEED)
    for renormalize, scale in itertools.product((True, False), tail.scales):
        if all(_agrees(module, tail, bias, renormalize, scale, E, k, s, generator, device) for s in _CHECK_SCALES):
            return renormalize, scale
    return "computes another routing (no renormalisation / scale of the op gives its (id, weight) pairs)"


def _agrees(module, tail, bias, renormalize, scale, E, k, logit_scale, generator, device) -> bool:
    """On 3 tokens of random logits at logit_scale: the same (id, weight) pairs per token?"""
    logits = (logit_scale * torch.randn((3, E), generator=generator, device=device)).to(example_value(tail.logits).dtype)
    try:
        with torch.no_grad():
            want_w, want_ids = module(logits, *([bias] if bias is not None else []))
            got_w, got_ids = lowered_moe_route(logits, bias, k, tail.n_group, tail.topk_group, renormalize, scale)
    except Exception:  # the tail ran fine in the model; on other data it may not
        return False
    want_ids, order = want_ids.long().sort(-1)
    got_ids, got_order = got_ids.sort(-1)
    if not torch.equal(want_ids, got_ids):
        return False
    want_w, got_w = want_w.float().gather(-1, order), got_w.gather(-1, got_order)
    return torch.allclose(want_w, got_w.to(example_value(tail.weights).dtype).float(), rtol=1e-5, atol=1e-6)


def _replace(gm: fx.GraphModule, tail: RouterTail, renormalize: bool, scale: float) -> None:
    k = shape_of(tail.ids)[-1]
    first = tail.nodes[0]
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(lowered_moe_route, (tail.logits, tail.bias, k, tail.n_group,
                                                           tail.topk_group, renormalize, scale))
        weights = gm.graph.call_function(operator.getitem, (fused, 0))
        ids = gm.graph.call_function(operator.getitem, (fused, 1))
        weights_typed = gm.graph.call_method("to", (weights, example_value(tail.weights).dtype))
        ids_typed = gm.graph.call_method("to", (ids, example_value(tail.ids).dtype))
    for new in (fused, weights, ids, weights_typed, ids_typed):
        take_location(new, first)
    tail.weights.replace_all_uses_with(weights_typed)
    tail.ids.replace_all_uses_with(ids_typed)
    for node in reversed(tail.nodes):
        gm.graph.erase_node(node)


__all__ = ["lower_moe_router", "lowered_moe_route"]
