"""Linears of one few-token input  ->  one `ic::multi_linear` launch (decode).

At one decode token each projection is a GEMV whose launch costs more than its weight reads (kernels/
multi_linear.py). In a DSA layer several read the same tensor: the normed hidden state feeds q_a,
kv_a and, in F layers, the indexer's wk and weights_proj; the normed q_a feeds q_b and the indexer's
wq_b. Each group of bias-free `linear(x, W)` calls on the same node x, with 2-D parameter weights of
x's dtype (unit stride along K) and at most kernels.multi_linear.MAX_TOKENS static rows of x, becomes
one op call; each linear's users read its output from the op's list (a fresh [T,N] tensor, viewed to
the linear's shape). A linear is a linear: no check run is needed beyond these structural ones.
Prefill graphs (more rows) keep cuBLAS's GEMMs.
"""

from __future__ import annotations

import logging
import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from ic_compile.kernels.multi_linear import MAX_TOKENS

from .graph_ops import example_value, is_parameter, module_path, op_name, take_location

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def merge_sibling_linears(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each group of >= 2 mergeable linears of one input -> `lowered_multi_linear`
    (ctx.report.linears_merged: the module paths of each group)."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _mergeable(node):
            groups.setdefault(node.args[0], []).append(node)
    for x, linears in groups.items():
        if len(linears) >= 2:
            _replace(gm, x, linears)
            ctx.report.linears_merged.append([module_path(n) or n.name for n in linears])
            ctx.counters["merge_sibling_linears.merged"] += len(linears)
            log.info("merge_sibling_linears: %d linears of %s in one launch", len(linears), x.name)
    return gm


def lowered_multi_linear(x, *weights):
    """x [.., K] with at most MAX_TOKENS rows -> [x @ W_i^T as [T, N_i]]."""
    return torch.ops.ic.multi_linear(x.reshape(-1, x.shape[-1]).contiguous(), list(weights))


def _mergeable(node: fx.Node) -> bool:
    if node.op != "call_function" or op_name(node) != "linear" or len(node.args) < 2:
        return False
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    x, weight = node.args[0], node.args[1]
    if bias is not None or set(node.kwargs) - {"bias"} or not isinstance(x, fx.Node) or not is_parameter(weight):
        return False
    xv, wv, out = example_value(x), example_value(weight), example_value(node)
    if not all(isinstance(v, torch.Tensor) for v in (xv, wv, out)):
        return False
    if not all(isinstance(d, int) for d in (*xv.shape, *wv.shape)):
        return False  # symbolic sizes: a dynamic-shape graph
    K = xv.shape[-1] if xv.dim() else 0
    return (wv.dim() == 2 and wv.shape[1] == K and wv.stride(1) == 1 and wv.dtype == xv.dtype
            and xv.dtype in _DTYPES and K > 0 and xv.numel() // K <= MAX_TOKENS)


def _replace(gm: fx.GraphModule, x: fx.Node, linears: list[fx.Node]) -> None:
    with gm.graph.inserting_before(linears[0]):
        fused = gm.graph.call_function(lowered_multi_linear, (x, *(n.args[1] for n in linears)))
        take_location(fused, linears[0])
        for index, linear in enumerate(linears):
            item = gm.graph.call_function(operator.getitem, (fused, index))
            shaped = gm.graph.call_method("view", (item, tuple(example_value(linear).shape)))
            for new in (item, shaped):
                take_location(new, linear)
            shaped.meta.update({k: v for k, v in linear.meta.items() if k in ("example_value", "val")})
            linear.replace_all_uses_with(shaped)
    for linear in linears:
        gm.graph.erase_node(linear)
