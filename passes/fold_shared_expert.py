"""A shared expert added to a lowered experts op's output  ->  the same `ic::moe_experts` call.

DeepSeek-V3-style MoE layers (DeepSeek-V3/V3.2/V4, GLM-4.5+, GLM-DSA, Kimi-K2) add a shared expert,
an ordinary SwiGLU MLP, to the routed experts' output: `experts(x, ids, w) + shared_experts(x)`. At
one decode token that MLP is three GEMVs, a silu * mul and the add: five launches per layer for
~19 MB of weights (GLM-4.7-Flash). The experts op reads it in its own two launches instead
(kernels/moe_experts.py, `shared`), so the shared expert costs its weight reads and no launch.

Matched by what the graph computes: after lower_moe_experts, an `add` whose one operand is the op's
output (through views) and whose other operand is computed only from parameters and the op's own
tokens (the same tensor, through views). That subgraph reads two or three 2-D parameters shaped like
a SwiGLU MLP's weights (gate [IS,H] and up [IS,H], or both stacked [2IS,H]; down [H,IS]). Before it is
folded, the subgraph runs on random tokens with the real weights next to the op with only the shared
expert: it is folded only when some assignment of the weights to gate / up / down gives the same
values at an ordinary and a large token scale (another activation, a clamp, a bias or a scale
factor shows there). The op caps the shared expert with the routed experts' swiglu_limit (DeepSeek-V4
clamps both alike), so a shared expert capped otherwise is not folded either. What is not folded
stays as written, with the reason in ctx.report.moe_shared_skipped.
"""

from __future__ import annotations

import itertools
import logging
import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .graph_ops import example_value, is_parameter, is_real_tensor, module_path, op_name, shape_of, subgraph_module
from .lower_moe_experts import _CHECK_SCALES, _CHECK_SEED, _mismatch, lowered_moe_experts

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

_SAME_DATA = {"view", "reshape", "flatten", "unflatten", "contiguous", "clone", "to", "type_as"}
_MAX_MLP_NODES = 64  # a SwiGLU MLP is ~10 nodes; a walk that grows past this left the MLP


def fold_shared_expert(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each lowered experts call whose output is added to a shared SwiGLU MLP of the same
    tokens -> that call with the MLP's weights (ctx.report.moe_shared_folded / moe_shared_skipped)."""
    for fused in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is lowered_moe_experts]:
        add = _add_after(fused)
        if add is None:
            continue  # no shared expert (or its sum is not a plain add): nothing to fold
        module = module_path(fused)
        why = _fold(gm, fused, add, ctx.input_values)
        if why:
            ctx.report.moe_shared_skipped[module] = why
            ctx.counters["fold_shared_expert.skipped"] += 1
            log.info("fold_shared_expert: %s keeps its shared expert as written: %s", module, why)
        else:
            ctx.report.moe_shared_folded.append(module)
            ctx.counters["fold_shared_expert.folded"] += 1
    return gm


def _add_after(fused: fx.Node) -> fx.Node | None:
    """The add the op's output flows into through single-use, dtype-keeping views, if any."""
    node, dtype = fused, _dtype(fused.args[0])  # the op's output dtype is its tokens'
    while len(node.users) == 1:
        user = next(iter(node.users))
        if op_name(user) == "add":
            return user
        if op_name(user) not in _SAME_DATA or user.args[0] is not node or _dtype(user, dtype) != dtype:
            return None
        node = user
    return None


def _fold(gm: fx.GraphModule, fused: fx.Node, add: fx.Node, input_values: dict[str, Any] | None) -> str:
    """Fold the add's other operand into `fused` ('' on success), or why not."""
    routed, other = _operands(add, fused)
    if other is None:
        return f"the add {add.format_node()} is not routed + shared (no alpha, no scalar, no broadcast)"
    if not (shape_of(routed) == shape_of(other) == shape_of(add)) or len({_dtype(n) for n in (routed, other, add)}) != 1:
        return f"the sum broadcasts or changes dtype: {shape_of(routed)} + {shape_of(other)} -> {shape_of(add)}"
    mlp = _mlp_nodes(other, _same_data_as(fused.args[0]))
    if isinstance(mlp, str):
        return mlp
    nodes, tokens, params = mlp
    if any(user not in nodes for n in nodes if n is not other for user in n.users) or len(other.users) != 1:
        return "the shared expert's intermediate values are used elsewhere"
    weights = _weight_roles(params, fused, input_values)
    if isinstance(weights, str):
        return weights
    roles = next((c for c in weights if not _differs(nodes, other, tokens, params, c, fused, input_values)), None)
    if roles is None:
        return ("computes another function than down @ (silu(gate @ x) * (up @ x)) for every assignment of its "
                f"weights {[shape_of(p) for p in params]} (an activation, clamp, bias or scale the op does not have)")
    _rewrite(gm, fused, add, routed, nodes, params, roles)
    return ""


def _operands(add: fx.Node, fused: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the operand carrying the op's output, the other) of a plain two-tensor add."""
    args = [a for a in add.args if isinstance(a, fx.Node)]
    if len(add.args) != 2 or len(args) != 2 or add.kwargs:
        return args[0] if args else add, None
    first, second = args
    return (first, second) if _reaches(fused, first) else (second, first)


def _reaches(source: fx.Node, node: fx.Node) -> bool:
    while node is not source:
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return True


def _same_data_as(hidden: fx.Node) -> set[fx.Node]:
    """The op's token tensor and the tensors it is a dtype-keeping view of (HF: the MoE input, of
    which the experts read `.view(-1, H)`)."""
    found, dtype = {hidden}, _dtype(hidden)
    node = hidden
    while op_name(node) in _SAME_DATA and isinstance(node.args[0], fx.Node) and _dtype(node.args[0]) == dtype:
        node = node.args[0]
        found.add(node)
    return found


def _mlp_nodes(output: fx.Node, tokens: set[fx.Node]) -> tuple[list[fx.Node], fx.Node, list[fx.Node]] | str:
    """(the nodes computing `output`, in graph order; the token tensor they read; the parameters)
    when `output` is computed from parameters and the op's tokens alone, else why not."""
    nodes, params, read, stack = set(), [], set(), [output]
    while stack:
        node = stack.pop()
        if node in nodes or node in read or node in params:
            continue
        if node in tokens:
            read.add(node)
        elif is_parameter(node):
            params.append(node)
        elif node.op not in ("call_function", "call_method"):
            return f"the added tensor reads {node.op} {node.name}, not only the experts' tokens and parameters"
        else:
            nodes.add(node)
            if len(nodes) > _MAX_MLP_NODES:
                return f"the added tensor is not a small MLP of the experts' tokens ({_MAX_MLP_NODES}+ nodes)"
            stack += [arg for arg in node.all_input_nodes]
    if len(read) != 1:
        return f"the added tensor reads {len(read)} views of the experts' tokens (want exactly 1)"
    order = {n: i for i, n in enumerate(output.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), read.pop(), params


def _weight_roles(params: list[fx.Node], fused: fx.Node, input_values) -> list[tuple] | str:
    """Candidate (gate, up, down) tensors, by shape, from the parameters' real values: three nn.Linear
    weights [IS,H], [IS,H], [H,IS], or a stacked gate_up [2IS,H] (either half first) and down [H,IS]."""
    values = [(input_values or {}).get(p.name) for p in params]
    if not all(is_real_tensor(v) for v in values):
        return "the shared expert's weights are not known at compile time: it cannot be checked"
    H, dtype = shape_of(fused.args[0])[-1], _dtype(fused.args[0])
    if any(v.dim() != 2 or v.dtype != dtype for v in values):
        return f"the shared expert's parameters {[tuple(v.shape) for v in values]} are not 2-D {dtype} weights"
    roles = []
    if len(values) == 3:
        for gate, up, down in itertools.permutations(range(3)):
            IS = values[gate].shape[0]
            if values[gate].shape == values[up].shape == (IS, H) and values[down].shape == (H, IS):
                roles.append((gate, up, down))
    elif len(values) == 2:
        for stacked, down in itertools.permutations(range(2)):
            two_is = values[stacked].shape[0]
            if two_is % 2 == 0 and values[stacked].shape == (two_is, H) and values[down].shape == (H, two_is // 2):
                half = two_is // 2
                roles += [((stacked, slice(0, half)), (stacked, slice(half, two_is)), down),
                          ((stacked, slice(half, two_is)), (stacked, slice(0, half)), down)]
    return roles or f"the shared expert's weights {[tuple(v.shape) for v in values]} are not a SwiGLU MLP's of width {H}"


def _tensor(values: list[torch.Tensor], role) -> torch.Tensor:
    if isinstance(role, tuple):
        index, rows = role
        return values[index][rows]
    return values[role]


def _differs(nodes, output, tokens, params, roles, fused, input_values) -> str:
    """'' when the subgraph equals the op with only this shared expert (no routed slot) on random tokens."""
    values = [input_values[p.name] for p in params]
    gate, up, down = (_tensor(values, r) for r in roles)
    module = subgraph_module([tokens, *params], nodes, output)
    x_like = example_value(tokens)
    generator = torch.Generator(device=down.device).manual_seed(_CHECK_SEED)
    H = down.shape[0]
    for scale in _CHECK_SCALES:
        x = (scale * torch.randn(x_like.shape, generator=generator, device=down.device)).to(x_like.dtype)
        rows = x.reshape(-1, H)
        no_slot = torch.zeros((rows.shape[0], 0), dtype=torch.int64, device=down.device)
        gate_up, experts_down = (input_values[n.name] for n in fused.args[3:5])
        try:
            with torch.no_grad():
                expected = module(x, *values)
                actual = torch.ops.ic.moe_experts(rows, no_slot, no_slot.float(), gate_up, experts_down,
                                                  fused.args[5], gate, up, down)
        except Exception as error:  # the MLP ran fine in the model; here it met other data
            return f"could not be checked ({type(error).__name__}: {error})"
        why = _mismatch(expected.reshape(actual.shape), actual, x.dtype)
        if why:
            return why
    return ""


def _rewrite(gm: fx.GraphModule, fused: fx.Node, add: fx.Node, routed: fx.Node, nodes: list[fx.Node],
             params: list[fx.Node], roles: tuple) -> None:
    """fused gets the weights (a stacked gate_up as two row slices); the add's users read the op's output."""
    with gm.graph.inserting_before(fused):
        weights = [gm.graph.call_function(operator.getitem, (params[r[0]], r[1])) if isinstance(r, tuple)
                   else params[r] for r in roles]
    fused.args = (*fused.args[:6], *weights)  # lowered_moe_experts(hidden, ids, w, gate_up, down, limit, ...)
    add.replace_all_uses_with(routed)
    gm.graph.erase_node(add)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def _dtype(node: fx.Node, unknown: torch.dtype | None = None) -> torch.dtype | None:
    """The node's dtype from its example value; for the nodes lower_moe_experts added (no example
    value): a `.to(dtype)`'s dtype, else `unknown`."""
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return value.dtype
    casts = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.dtype)]
    return casts[0] if casts else unknown
