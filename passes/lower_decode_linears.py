"""Decode linears -> `ic::multi_linear`: siblings of one few-token input in one launch, a lone
one-token GEMV too.

At one decode token each projection is a GEMV whose launch costs more than its weight reads (kernels/
multi_linear.py). In a DSA layer several read the same tensor: the normed hidden state feeds q_a,
kv_a and, in F layers, the indexer's wk; the normed q_a feeds q_b and the indexer's wq_b. Each group
of bias-free `linear(x, W)` calls on the same node x becomes one op call; each linear's users read
its output from the op's list (a fresh [T,N] tensor, viewed to the linear's shape).

What is taken: 2-D parameter weights of x's dtype (unit stride along K), or - x in fp32 - a bf16/fp16
parameter upcast to fp32 in the graph (`linear(x.float(), W.float())`, how HF's MoE routers compute
their logits; the op reads W and upcasts it itself, which is exact); x with at most
kernels.multi_linear.MAX_TOKENS static rows, never written in place in the graph (the op reads it
once, at the first linear). Linears are grouped by input and weight dtype (one launch reads one
dtype). A linear with no sibling is taken alone when x has one row and its weight is at most
_LONE_MAX_BYTES: there the op's one launch replaces cuBLAS's GEMV (and its split-K reduce: o_proj,
K = 5120); a larger weight (the lm_head, 634 MB) is streamed by cuBLAS at copy speed and its launch
is noise. A linear is a linear: no check run is needed beyond these structural ones. Prefill graphs
(more rows) keep cuBLAS's GEMMs.
"""

from __future__ import annotations

import logging
import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from ic_compile.kernels.multi_linear import MAX_TOKENS

from .graph_ops import example_value, is_parameter, module_path, op_name, take_location, writers_of

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_UPCASTS = {"to", "type", "float"}  # W.float(), W.to(torch.float32), W.type(torch.float32)
_LONE_MAX_BYTES = 64 << 20


def lower_decode_linears(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each group of mergeable linears of one input (>= 2, or a lone one-row GEMV up to
    _LONE_MAX_BYTES) -> `lowered_multi_linear` (ctx.report.decode_linears: each launch's module paths)."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
    groups: dict[tuple[fx.Node, torch.dtype], list[tuple[fx.Node, fx.Node]]] = {}
    for node in gm.graph.nodes:
        weight = _mergeable_weight(node)
        if weight is not None:  # one launch reads one weight dtype
            groups.setdefault((node.args[0], example_value(weight).dtype), []).append((node, weight))
    for (x, _), linears in groups.items():
        if writers_of(x):  # one read at the first linear would miss a write before a later one
            continue
        if len(linears) >= 2 or _lone_gemv(x, linears[0][1]):
            _replace(gm, x, linears)
            ctx.report.decode_linears.append([module_path(n) or n.name for n, _ in linears])
            ctx.counters["lower_decode_linears.linears"] += len(linears)
            log.info("lower_decode_linears: %d linear(s) of %s in one launch", len(linears), x.name)
    return gm


def lowered_multi_linear(x, *weights):
    """x [.., K] with at most MAX_TOKENS rows -> [x @ W_i^T as [T, N_i]]."""
    return torch.ops.ic.multi_linear(as_rows(x), list(weights))


def as_rows(x):
    """x [.., K] -> contiguous [T, K] (the op's layout)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _mergeable_weight(node: fx.Node) -> fx.Node | None:
    """The parameter node a mergeable linear reads (see the module docstring), else None."""
    if node.op != "call_function" or op_name(node) != "linear" or len(node.args) < 2:
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    x, weight = node.args[0], _parameter_read(node.args[1])
    if bias is not None or set(node.kwargs) - {"bias"} or not isinstance(x, fx.Node) or weight is None:
        return None
    xv, wv, out = example_value(x), example_value(weight), example_value(node)
    if not all(isinstance(v, torch.Tensor) for v in (xv, wv, out)):
        return None
    if not all(isinstance(d, int) for d in (*xv.shape, *wv.shape)):
        return None  # symbolic sizes: a dynamic-shape graph
    K = xv.shape[-1] if xv.dim() else 0
    same_or_upcast = wv.dtype == xv.dtype or (xv.dtype == torch.float32 and wv.dtype in _DTYPES)
    ok = (wv.dim() == 2 and wv.shape[1] == K and wv.stride(1) == 1 and same_or_upcast and xv.dtype in _DTYPES
          and K > 0 and xv.numel() // K <= MAX_TOKENS)
    return weight if ok else None


def _parameter_read(weight) -> fx.Node | None:
    """A parameter node, or the parameter under a cast to fp32 (`W.float()`); else None."""
    if not isinstance(weight, fx.Node):
        return None
    if is_parameter(weight):
        return weight
    if op_name(weight) in _UPCASTS and weight.args and isinstance(weight.args[0], fx.Node) \
            and is_parameter(weight.args[0]):
        cast = example_value(weight)
        if isinstance(cast, torch.Tensor) and cast.dtype == torch.float32:
            return weight.args[0]
    return None


def _lone_gemv(x: fx.Node, weight: fx.Node) -> bool:
    xv, wv = example_value(x), example_value(weight)
    return xv.numel() == xv.shape[-1] and wv.numel() * wv.element_size() <= _LONE_MAX_BYTES


def _replace(gm: fx.GraphModule, x: fx.Node, linears: list[tuple[fx.Node, fx.Node]]) -> None:
    first = linears[0][0]
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(lowered_multi_linear, (x, *(weight for _, weight in linears)))
        take_location(fused, first)
        for index, (linear, _) in enumerate(linears):
            item = gm.graph.call_function(operator.getitem, (fused, index))
            shaped = gm.graph.call_method("view", (item, tuple(example_value(linear).shape)))
            for new in (item, shaped):
                take_location(new, linear)
            shaped.meta.update({k: v for k, v in linear.meta.items() if k in ("example_value", "val")})
            linear.replace_all_uses_with(shaped)
    for linear, _ in linears:
        gm.graph.erase_node(linear)
