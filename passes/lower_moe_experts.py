"""A few-token routed-MoE experts region  ->  `ic::moe_experts` (batch-1 decode).

At one token, HF's experts (`@use_experts_implementation`: grouped_mm, batched_mm) spend most of their
time around the two expert GEMMs: an argsort of the routing, a histogram and cumsum of tokens per
expert, the grouped GEMM's setup, an inverse permutation. The op reads the k active experts' weights
once each and nothing else (kernels/moe_experts.py).

Matched by what a module computes, not how it is written: an experts module is the nodes Dynamo
traced under one module (nn_module_stack) that read two 3-D parameters gate_up [E,2I,H] and down
[E,H,I], take three tensors from outside -- hidden [T,H], expert ids [T,k] (integer), routing weights
[T,k] -- and give one [T,H] tensor back. Before it is replaced, the region runs on random tokens and
routings with the module's real weights next to the op: only a region that computes
    out[t] = sum_j w[t,j] * down[e] @ (silu(g) * u),   (g, u) = (gate_up[e] @ x[t]).chunk(2),  e = ids[t,j]
(g capped at L and u clamped to [-L, L] first when the module's clamps all use one bound L:
DeepSeek-V4's swiglu_limit) is replaced. The tokens are drawn at an ordinary and at a large scale, so
that a cap on the gate or up values shows. A region that does not (another activation, interleaved
gate/up rows, a transposed layout, another cap, a bias), a symbolic token count, or more than
_MAX_TOKENS tokens is left as it is, with the reason in ctx.report.moe_skipped: the answer is the
model's either way. Only graphs the rewrite runs on (those holding indexers) are searched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .graph_ops import (example_value, is_parameter, is_real_tensor, op_name, shape_of, stack_path, subgraph_module,
                        take_location, tensor_args, writes_in_place)

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

# Above this many tokens the op reads an expert's weights once per (token, slot) that routes to it;
# the grouped GEMM reads each once: the op wins only where tokens are few (decode).
_MAX_TOKENS = 4
_CHECK_SEED = 0
# Token scales of the check: ordinary activations, and large ones, at which a cap on the gate or up
# values (DeepSeek-V4's swiglu_limit, gpt-oss's clamp) takes effect and tells the region from the op.
_CHECK_SCALES = (1.0, 1000.0)
_CLAMPS = {"clamp", "clamp_min", "clamp_max"}


@dataclass
class ExpertsRegion:
    module: str  # module path, e.g. "model.layers.1.mlp.experts"
    nodes: list[fx.Node]  # the module's call nodes, in graph order
    hidden: fx.Node  # [T,H] (or any shape with T*H elements and H last)
    ids: fx.Node  # [T,k] integer
    weights: fx.Node  # [T,k]
    gate_up: fx.Node  # [E,2I,H] parameter
    down: fx.Node  # [E,H,I] parameter
    output: fx.Node  # the one node read outside the module, T*H elements
    swiglu_limit: float | None = None  # the one constant the module clamps with (DeepSeek-V4), if any
    shares_sizes: bool = False  # reads or gives sizes (SymInts) across its boundary: dynamic shapes


def lower_moe_experts(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each experts module that computes the routed MoE above, at a static T <= _MAX_TOKENS,
    -> `lowered_moe_experts` (counted in ctx.report.moe_lowered; the others in ctx.report.moe_skipped)."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
    for key, nodes in _modules_with_expert_weights(gm).items():
        module = stack_path(nodes[0].meta["nn_module_stack"][key][0])
        region = _region(module, nodes)
        why = region if isinstance(region, str) else _unsupported(region) or _differs(region, ctx.input_values)
        if why:
            ctx.report.moe_skipped[module] = why
            ctx.counters["lower_moe_experts.skipped"] += 1
            log.info("lower_moe_experts: %s left as it is: %s", module, why)
            continue
        _replace(gm, region)
        ctx.report.moe_lowered.append(module)
        ctx.counters["lower_moe_experts.lowered"] += 1
    return gm


def lowered_moe_experts(hidden, ids, weights, gate_up, down, swiglu_limit=None, shared_gate=None, shared_up=None,
                        shared_down=None):
    """hidden [.., H] with T*H elements, ids / weights [.., k] with T*k -> [T,H] in hidden's dtype
    (shared_*: a shared expert folded in by passes/fold_shared_expert.py)."""
    H, k = hidden.shape[-1], ids.shape[-1]
    return torch.ops.ic.moe_experts(hidden.reshape(-1, H), ids.reshape(-1, k), weights.reshape(-1, k), gate_up, down,
                                    swiglu_limit, shared_gate, shared_up, shared_down)


def _modules_with_expert_weights(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module key (nn_module_stack) -> its call nodes, for modules whose nodes read a 3-D parameter."""
    owners = set()
    for node in gm.graph.nodes:
        shape = shape_of(node)
        if is_parameter(node) and shape is not None and len(shape) == 3:
            owners.update(_innermost_key(user) for user in node.users)
    regions: dict[str, list[fx.Node]] = {}  # in graph order
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            for key in (node.meta.get("nn_module_stack") or {}):
                if key in owners:
                    regions.setdefault(key, []).append(node)
    return regions


def _innermost_key(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else None


def _region(module: str, nodes: list[fx.Node]) -> ExpertsRegion | str:
    """The module's inputs and output, or why it is not an experts module of the form above."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in tensor_args(n) if a not in inside))
    params = [a for a in inputs if is_parameter(a)]
    activations = [a for a in inputs if not is_parameter(a) and _is_tensor(a)]
    outputs = [n for n in nodes if any(user not in inside for user in n.users)]
    tensor_outputs = [n for n in outputs if _is_tensor(n)]
    if len(params) != 2 or len(activations) != 3 or len(tensor_outputs) != 1:
        return (f"not an experts module: {len(params)} parameters, {len(activations)} tensor inputs and "
                f"{len(tensor_outputs)} tensor outputs (want 2, 3 and 1)")
    if any(writes_in_place(n) and n.args and n.args[0] not in inside for n in nodes):
        return "writes into a tensor from outside the module"
    roles = _roles(params, activations)
    if isinstance(roles, str):
        return roles
    shares_sizes = len(inputs) > len(params) + len(activations) or len(outputs) > 1
    return ExpertsRegion(module, nodes, *roles, output=tensor_outputs[0],
                         swiglu_limit=_clamp_bound(nodes), shares_sizes=shares_sizes)


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def _clamp_bound(nodes: list[fx.Node]) -> float | None:
    """The one bound the module's clamps use, up to sign (DeepSeek-V4: gate.clamp(max=L), up.clamp(-L, L)),
    as the op's swiglu_limit; None without clamps or with several bounds (the check then decides)."""
    bounds = {abs(float(value)) for node in nodes if op_name(node) in _CLAMPS
              for value in (*node.args[1:], *node.kwargs.values())
              if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return bounds.pop() if len(bounds) == 1 else None


def _roles(params: list[fx.Node], activations: list[fx.Node]) -> tuple | str:
    """(hidden, ids, weights, gate_up, down) by shape and dtype."""
    values = [example_value(a) for a in activations]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return "an input is not a tensor"
    ids = [a for a, v in zip(activations, values) if not v.is_floating_point()]
    floats = sorted((a for a, v in zip(activations, values) if v.is_floating_point()),
                    key=lambda a: example_value(a).shape[-1])  # weights [..,k] before hidden [..,H]
    if len(ids) != 1 or len(floats) != 2:
        return "inputs are not (hidden, expert ids, routing weights)"
    weights, hidden = floats
    H = shape_of(hidden)[-1]
    for gate_up, down in (params, params[::-1]):
        E, two_i, h = shape_of(gate_up)
        if h == H and two_i % 2 == 0 and shape_of(down) == (E, H, two_i // 2):
            return hidden, ids[0], weights, gate_up, down
    return f"expert weights {[shape_of(p) for p in params]} are not gate_up [E,2I,{H}] and down [E,{H},I]"


def _unsupported(region: ExpertsRegion) -> str:
    hidden, ids = example_value(region.hidden), example_value(region.ids)
    if not all(isinstance(d, int) for d in (*hidden.shape, *ids.shape)):
        return "symbolic token count (the op is for a static few-token decode graph)"
    tokens = hidden.numel() // hidden.shape[-1]
    if tokens > _MAX_TOKENS:
        return f"{tokens} tokens (the op is for at most {_MAX_TOKENS}: the grouped GEMM wins above)"
    if ids.numel() != tokens * ids.shape[-1] or example_value(region.weights).numel() != ids.numel():
        return f"expert ids {tuple(ids.shape)} do not match {tokens} tokens"
    if example_value(region.output).numel() != hidden.numel():
        return f"output {shape_of(region.output)} is not one row per token"
    if region.shares_sizes:
        return "shares symbolic sizes with the rest of the graph (dynamic shapes)"
    return ""


def _differs(region: ExpertsRegion, input_values: dict[str, Any] | None) -> str:
    """Run the region and the op on the same random tokens and routings, with the real weights, at
    each of _CHECK_SCALES: '' when they agree, else why not."""
    values = input_values or {}
    gate_up, down = values.get(region.gate_up.name), values.get(region.down.name)
    if not is_real_tensor(gate_up) or not is_real_tensor(down):
        return "the expert weights' values are not known at compile time: the region cannot be checked"
    generator = torch.Generator(device=gate_up.device).manual_seed(_CHECK_SEED)
    module = subgraph_module([region.hidden, region.ids, region.weights, region.gate_up, region.down],
                             region.nodes, region.output)
    for scale in _CHECK_SCALES:
        hidden, ids, weights = _random_inputs(region, gate_up, generator, scale)
        try:
            with torch.no_grad():
                expected = module(hidden, ids, weights, gate_up, down)
                actual = lowered_moe_experts(hidden, ids, weights, gate_up, down, region.swiglu_limit)
        except Exception as error:  # the region ran fine in the model; here it met other data
            return f"the region could not be checked ({type(error).__name__}: {error})"
        why = _mismatch(expected.reshape(actual.shape), actual, hidden.dtype)
        if why:
            return f"computes another function ({why} with tokens of scale {scale:g})"
    return ""


def _mismatch(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> str:
    tolerance = 1e-4 if dtype == torch.float32 and expected.dtype == torch.float32 else 2e-2
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    if error <= tolerance * max(scale, 1e-6):
        return ""
    return f"max |difference| {error:.3g} vs output scale {scale:.3g}"


def _random_inputs(region: ExpertsRegion, gate_up: torch.Tensor, generator: torch.Generator, scale: float):
    """Tokens ~ N(0, scale²), each routed to k distinct experts with positive weights, shaped as traced."""
    hidden, ids, weights = (example_value(n) for n in (region.hidden, region.ids, region.weights))
    device, experts, k = gate_up.device, gate_up.shape[0], ids.shape[-1]
    tokens = hidden.numel() // hidden.shape[-1]
    x = (scale * torch.randn(hidden.shape, generator=generator, device=device)).to(hidden.dtype)
    order = torch.rand((tokens, experts), generator=generator, device=device).argsort(-1)[:, :k]
    w = torch.rand((tokens, k), generator=generator, device=device) + 0.1
    return x, order.to(ids.dtype).reshape(ids.shape), w.to(weights.dtype).reshape(weights.shape)


def _replace(gm: fx.GraphModule, region: ExpertsRegion) -> None:
    out = region.output
    with gm.graph.inserting_before(out):
        fused = gm.graph.call_function(lowered_moe_experts, (region.hidden, region.ids, region.weights,
                                                              region.gate_up, region.down, region.swiglu_limit))
        shaped = gm.graph.call_method("view", (fused, tuple(example_value(out).shape)))
        typed = gm.graph.call_method("to", (shaped, example_value(out).dtype))
    for new in (fused, shaped, typed):
        take_location(new, out)
    typed.meta.update({key: val for key, val in out.meta.items() if key in ("example_value", "val")})
    out.replace_all_uses_with(typed)
    for node in reversed(region.nodes):  # in-place writes inside the region keep their nodes alive in DCE
        gm.graph.erase_node(node)
