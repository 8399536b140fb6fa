"""An RMSNorm that only feeds one `ic::multi_linear` call -> the op's prologue (decode graphs).

At one decode token an RMSNorm is a launch of its own (an Inductor reduction over 4 KB, ~1.5 us plus
its gap in the CUDA graph). Where the normed tensor's only reader is one multi_linear launch
(passes/lower_decode_linears.py ran first: q_a_layernorm -> q_b (+ the indexer's wq_b); in layers
without an indexer, input_layernorm -> q_a + kv_a), the op takes the norm's input, weight and eps
and norms its rows itself (kernels/multi_linear.py). Where that input is the sum of two tensors of
its shape and dtype (the residual add that made the layer's input), the op reads the two terms,
and the sum needs no launch either: Inductor recomputes it where the residual stream is read next.
A norm with other readers (the F layers' fp32 copy for the indexer's weights_proj, the router and
the experts after post_attention_layernorm) is left alone: Inductor computes it anyway. The op reads
its input where the linear was, after the norm: an input written in place anywhere in the graph
(`x += ...`, a view's `copy_`) is not folded (nor split into its residual terms).

Matched, however the code writes it: h32 = h.float() / .to(torch.float32) (or h already fp32);
mean(h32 ** 2 | h32.pow(2) | h32 * h32 | square(h32), -1, keepdim=True); + eps; rsqrt(...) (or
h32 / sqrt(...)); times the weight, rounded as written: `w * n.to(dtype)` / `n.type_as(h) * w`
(HF's RMSNorm classes, DeepSeek's reference: two roundings) or `(n * w).to(dtype)`, and
F.rms_norm / torch.rms_norm with an eps given (one rounding). A norm of another form (Gemma's
`1 + w`, a LayerNorm, F.rms_norm with torch's default eps) is not matched and runs as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx

from .graph_ops import (arg_of, example_value, is_last_dim, is_parameter, op_name, shape_of, take_location,
                        writers_of)
from .lower_decode_linears import as_rows, lowered_multi_linear

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

_FOLDS = True  # private switch for A/B runs (bench/e2e.py --without rms_norm_prologue)
_CASTS = {"to", "float", "type", "type_as", "bfloat16", "half"}


@dataclass
class RMSNormMatch:
    h: fx.Node  # the normed tensor [.., K]
    weight: fx.Node  # its parameter [K]
    eps: float
    scale_then_round: bool  # one rounding after the weight (F.rms_norm), not one before and one after it


def fold_rms_norm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each multi_linear call whose input is a matched RMSNorm read by it alone ->
    `lowered_norm_multi_linear` (ctx.counters["fold_rms_norm.norms"], ["fold_rms_norm.residuals"])."""
    if not _FOLDS:
        return gm
    for call in [n for n in gm.graph.nodes if n.target is lowered_multi_linear]:
        normed = call.args[0]
        match = match_rms_norm(normed) if len(normed.users) == 1 else None
        if match is None or writers_of(match.h):  # the op reads h later than the norm did
            continue
        terms = _residual_terms(match.h)
        _replace(gm, call, match, terms)
        ctx.counters["fold_rms_norm.norms"] += 1
        ctx.counters["fold_rms_norm.residuals"] += terms is not None
        log.info("fold_rms_norm: the norm of %s (%s) in the launch of %s", match.h.name,
                 "residual sum" if terms else "one tensor", call.name)
    return gm


def lowered_norm_multi_linear(x, residual, norm_weight, eps, scale_then_round, *weights):
    """RMSNorm(x (+ residual)) [.., K] with at most MAX_TOKENS rows -> [normed @ W_i^T as [T, N_i]]."""
    return torch.ops.ic.multi_linear(as_rows(x), list(weights), norm_weight, eps,
                                     None if residual is None else as_rows(residual), scale_then_round)


def match_rms_norm(out: fx.Node) -> RMSNormMatch | None:
    """The RMSNorm that computes `out` (see the module docstring), else None."""
    if not isinstance(out, fx.Node):
        return None
    if op_name(out) == "rms_norm":
        return _functional(out)
    scale_then_round, product = False, out
    if op_name(out) in _CASTS and _same_shape(out, out.args[0]):
        scale_then_round, product = True, out.args[0]  # (n * w).to(dtype)
    if op_name(product) != "mul" or len(product.args) != 2 or product.kwargs:
        return None
    for weight, other in (product.args, product.args[::-1]):
        if not _is_norm_weight(weight, out):
            continue
        normed = other
        if not scale_then_round and op_name(other) in _CASTS and _same_shape(other, other.args[0]):
            normed = other.args[0]  # w * n.to(dtype): the cast rounds before the weight
        found = _normalized(normed)
        if found is not None and _dtype(found[0]) == _dtype(out) and _weight_dtype_ok(weight, out, scale_then_round):
            return RMSNormMatch(found[0], weight, found[1], scale_then_round)
    return None


def _functional(node: fx.Node) -> RMSNormMatch | None:
    """F.rms_norm(h, (K,), weight, eps): rounds once, after the weight. Without an eps (torch's
    default, which depends on its version's compute dtype) it is left alone."""
    h, shape, weight, eps = (arg_of(node, i, name) for i, name in
                             enumerate(("input", "normalized_shape", "weight", "eps")))
    if not isinstance(h, fx.Node) or not _is_norm_weight(weight, node) or _dtype(h) != _dtype(node):
        return None
    one_dim = isinstance(shape, (tuple, list)) and len(shape) == 1
    if not one_dim or not isinstance(eps, (int, float)) or not _weight_dtype_ok(weight, node, True):
        return None
    return RMSNormMatch(h, weight, float(eps), True)


def _normalized(normed: fx.Node) -> tuple[fx.Node, float] | None:
    """(h, eps) when `normed` is h32 * rsqrt(mean(h32^2, -1, keepdim) + eps) or h32 / sqrt(...)."""
    name = op_name(normed)
    if name not in ("mul", "div") or len(normed.args) != 2 or normed.kwargs:
        return None
    pairs = [normed.args, normed.args[::-1]] if name == "mul" else [normed.args]
    for h32, scale in pairs:
        root = {"mul": "rsqrt", "div": "sqrt"}[name]
        if not (isinstance(scale, fx.Node) and op_name(scale) == root and isinstance(h32, fx.Node)):
            continue
        eps = _mean_square_plus_eps(scale.args[0] if scale.args else None, h32)
        h = _uncast_fp32(h32)
        if eps is not None and h is not None:
            return h, eps
    return None


def _mean_square_plus_eps(node, h32: fx.Node) -> float | None:
    """eps when node is mean(square of h32, last dim, keepdim=True) + eps."""
    if not isinstance(node, fx.Node) or op_name(node) != "add" or len(node.args) != 2 or node.kwargs:
        return None
    for mean, eps in (node.args, node.args[::-1]):
        if isinstance(eps, (int, float)) and isinstance(mean, fx.Node) and op_name(mean) == "mean":
            dim, keepdim = arg_of(mean, 1, "dim"), arg_of(mean, 2, "keepdim")
            dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
            if keepdim is True and is_last_dim(dim, mean.args[0]) and _is_square_of(mean.args[0], h32):
                return float(eps)
    return None


def _is_square_of(node, h32: fx.Node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    name = op_name(node)
    if name == "pow":
        return node.args[0] is h32 and arg_of(node, 1, "exponent") == 2
    if name == "mul":
        return len(node.args) == 2 and node.args[0] is h32 and node.args[1] is h32
    return name == "square" and node.args[0] is h32


def _uncast_fp32(h32: fx.Node) -> fx.Node | None:
    """h when h32 is h.float() / h.to(torch.float32) (or h itself, already fp32)."""
    if _dtype(h32) != torch.float32:
        return None
    if op_name(h32) in _CASTS and isinstance(h32.args[0], fx.Node) and _same_shape(h32, h32.args[0]):
        return h32.args[0]
    return h32


def _residual_terms(h: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when h = a + b of two tensors of h's shape and dtype (no broadcast, no alpha), neither
    written in place anywhere in the graph (the op reads them where the linear was, not at the add)."""
    if op_name(h) != "add" or len(h.args) != 2 or h.kwargs:
        return None
    a, b = h.args
    if all(isinstance(t, fx.Node) and _same_shape(t, h) and _dtype(t) == _dtype(h) and not writers_of(t)
           for t in (a, b)):
        return a, b
    return None


def _is_norm_weight(weight, out: fx.Node) -> bool:
    """A 1-D parameter as long as out's last dim."""
    if not (isinstance(weight, fx.Node) and is_parameter(weight)):
        return False
    shape = _shape(out)
    return bool(shape) and _shape(weight) == shape[-1:]


def _weight_dtype_ok(weight: fx.Node, out: fx.Node, scale_then_round: bool) -> bool:
    """The op takes a weight of the normed tensor's dtype, or fp32 when it rounds once after it."""
    dtype = _dtype(weight)
    return dtype == _dtype(out) or (scale_then_round and dtype == torch.float32)


def _replace(gm: fx.GraphModule, call: fx.Node, match: RMSNormMatch, terms) -> None:
    x, residual = terms if terms is not None else (match.h, None)
    with gm.graph.inserting_before(call):
        fused = gm.graph.call_function(lowered_norm_multi_linear,
                                       (x, residual, match.weight, match.eps, match.scale_then_round, *call.args[1:]))
    take_location(fused, call)
    fused.meta.update({k: v for k, v in call.meta.items() if k in ("example_value", "val")})
    call.replace_all_uses_with(fused)
    gm.graph.erase_node(call)


def _dtype(node) -> torch.dtype | None:
    value = example_value(node) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _shape(node) -> tuple | None:
    return shape_of(node) if isinstance(node, fx.Node) else None


def _same_shape(a, b) -> bool:
    return _shape(a) is not None and _shape(a) == _shape(b)


__all__ = ["fold_rms_norm", "lowered_norm_multi_linear", "match_rms_norm", "RMSNormMatch"]
