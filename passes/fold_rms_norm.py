"""An RMSNorm read by an `ic::multi_linear` call -> the op's prologue (decode graphs).

At one decode token an RMSNorm is a launch of its own (an Inductor reduction over 4 KB, ~1.5 us plus
its gap in the CUDA graph). Where the normed tensor reaches a multi_linear launch (passes/lower_decode_
linears.py ran first: q_a_layernorm -> q_b (+ the indexer's wq_b); input_layernorm -> q_a + kv_a (+ wk);
post_attention_layernorm -> the router's logits, read upcast to fp32), through row views and at most
one exact upcast, the op takes the norm's input, weight and eps and norms its rows itself
(kernels/multi_linear.py). Where that input is the sum of two tensors of its shape and dtype (the
residual add that made the layer's input), the op reads the two terms.

Other readers are served by the op's side outputs (program 0 writes them): the normed rows (the F
layers' fp32 copy for the indexer's weights_proj, the MoE experts after post_attention_layernorm) and
the residual sum (the residual stream read on by the next add), each viewed back to the norm's shape;
the fused call moves up to the first of its readers. So a decoder layer's norms need no launch of their
own except kv_a_layernorm's (read by the KV cache, not by a linear). The op reads its input where the
first reader was: an input written in place anywhere in the graph (`x += ...`, a view's `copy_`) is not
folded (nor split into its residual terms). Side outputs need static shapes.

Matched, however the code writes it: h32 = h.float() / .to(torch.float32) (or h already fp32);
mean(h32 ** 2 | h32.pow(2) | h32 * h32 | square(h32), -1, keepdim=True); + eps; rsqrt(...) (or
h32 / sqrt(...)); times the weight, rounded as written: `w * n.to(dtype)` / `n.type_as(h) * w`
(HF's RMSNorm classes, DeepSeek's reference: two roundings) or `(n * w).to(dtype)`, and
F.rms_norm / torch.rms_norm with an eps given (one rounding). A norm of another form (Gemma's
`1 + w`, a LayerNorm, F.rms_norm with torch's default eps) is not matched and runs as before.
"""

from __future__ import annotations

import logging
import operator
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
_SIDE_OUTPUTS = True  # ... and for the side outputs alone (--without norm_side_outputs: a norm read by the
# multi_linear alone folds, its sum recomputed by Inductor where the residual stream is read next)
_CASTS = {"to", "float", "type", "type_as", "bfloat16", "half"}
_ROW_VIEWS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"}  # keeping the last dim
_HALVES = (torch.bfloat16, torch.float16)


@dataclass
class RMSNormMatch:
    h: fx.Node  # the normed tensor [.., K]
    weight: fx.Node  # its parameter [K]
    eps: float
    scale_then_round: bool  # one rounding after the weight (F.rms_norm), not one before and one after it


def fold_rms_norm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each multi_linear call whose input is a matched RMSNorm (through row views and an exact
    upcast) -> `lowered_norm_multi_linear`, writing the normed rows and the residual sum for their other
    readers (ctx.counters["fold_rms_norm.norms"], [".residuals"], [".normed_outputs"], [".sum_outputs"])."""
    if not _FOLDS:
        return gm
    for call in [n for n in gm.graph.nodes if n.target is lowered_multi_linear]:
        fold = _fold_of(call)
        if fold is None:
            continue
        _replace(gm, fold)
        ctx.counters["fold_rms_norm.norms"] += 1
        ctx.counters["fold_rms_norm.residuals"] += fold.terms is not None
        ctx.counters["fold_rms_norm.normed_outputs"] += bool(fold.normed_readers)
        ctx.counters["fold_rms_norm.sum_outputs"] += bool(fold.sum_readers)
        log.info("fold_rms_norm: the norm of %s (%s) in the launch of %s; %d other reader(s) of the normed rows, "
                 "%d of the sum", fold.match.h.name, "residual sum" if fold.terms else "one tensor", call.name,
                 len(fold.normed_readers), len(fold.sum_readers))
    return gm


@dataclass
class _Fold:
    call: fx.Node  # the lowered multi_linear
    match: RMSNormMatch
    out: fx.Node  # the norm's output
    terms: tuple[fx.Node, fx.Node] | None  # h = terms[0] + terms[1]
    out_dtype: torch.dtype | None  # fp32 where the call read the normed rows upcast (a router's logits)
    normed_readers: list[fx.Node]  # other readers of out: they read the op's normed rows
    sum_readers: list[fx.Node]  # readers of h outside the norm: they read the op's sum
    first: fx.Node  # where the fused call goes: the first of the call and the rewired readers


def _fold_of(call: fx.Node) -> _Fold | None:
    found = _norm_behind(call.args[0])
    if found is None:
        return None
    out, upcast = found
    match = match_rms_norm(out)
    if writers_of(match.h):  # the op reads h later than the norm did
        return None
    terms = _residual_terms(match.h)
    order = {node: i for i, node in enumerate(call.graph.nodes)}
    inside = _between(match.h, out, order)
    normed_readers = [u for u in out.users if u is not call and u not in _chain(call.args[0], out)]
    sum_readers = [u for u in match.h.users if u not in inside] if terms and _SIDE_OUTPUTS else []
    if normed_readers and not _SIDE_OUTPUTS:
        return None
    static = all(isinstance(d, int) for node in (out, match.h) for d in (_shape(node) or (None,)))
    if (normed_readers or sum_readers) and not static:
        return None  # the side outputs are viewed back to the norm's shape: static shapes only
    first = min([call, *normed_readers, *sum_readers], key=order.__getitem__)
    inputs = [*call.args[1:], match.weight, *(terms or (match.h,))]
    if any(order[node] > order[first] for node in inputs):  # (a parameter read late in the graph)
        return None
    return _Fold(call, match, out, terms, torch.float32 if upcast else None, normed_readers, sum_readers, first)


def _norm_behind(x: fx.Node) -> tuple[fx.Node, bool] | None:
    """(node, upcast): the node x is, through views keeping the last dim and at most one exact upcast to
    fp32 (each read by the next alone), that computes an RMSNorm; upcast: one of them was the upcast."""
    node, upcast = x, False
    while match_rms_norm(node) is None:
        source = node.args[0] if node.args else None
        if len(node.users) != 1 or not isinstance(source, fx.Node) or None in (_shape(node), _shape(source)):
            return None
        if op_name(node) in _ROW_VIEWS and _shape(node)[-1:] == _shape(source)[-1:]:
            node = source
        elif op_name(node) in _CASTS and _dtype(node) is not None and _dtype(node) == _dtype(source):
            node = source  # a cast to the dtype it has
        elif op_name(node) in _CASTS and not upcast and _dtype(node) == torch.float32 and _dtype(source) in _HALVES:
            node, upcast = source, True
        else:
            return None
    return node, upcast


def _chain(x: fx.Node, out: fx.Node) -> set[fx.Node]:
    """The views and cast from out's reader to x (x included, out not)."""
    nodes = set()
    while x is not out:
        nodes.add(x)
        x = x.args[0]
    return nodes


def _between(h: fx.Node, out: fx.Node, order: dict) -> set[fx.Node]:
    """The norm's nodes: those on a path from h to out (h excluded, out included)."""
    after_h, stack = set(), [h]
    while stack:
        for user in stack.pop().users:
            if user not in after_h and order[user] <= order[out]:
                after_h.add(user)
                stack.append(user)
    inside, stack = set(), [out]
    while stack:
        node = stack.pop()
        if node in after_h and node not in inside:
            inside.add(node)
            stack.extend(node.all_input_nodes)
    return inside


def lowered_norm_multi_linear(x, residual, norm_weight, eps, scale_then_round, *weights, write_normed=False,
                              write_sum=False, out_dtype=None):
    """RMSNorm(x (+ residual)) [.., K] with at most MAX_TOKENS rows -> [normed @ W_i^T as [T, N_i]], then
    (write_normed, write_sum) the normed rows and x + residual as [T, K]; out_dtype: the products'."""
    return torch.ops.ic.multi_linear(as_rows(x), list(weights), norm_weight, eps,
                                     None if residual is None else as_rows(residual), scale_then_round,
                                     write_normed, write_sum, out_dtype)


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


def _replace(gm: fx.GraphModule, fold: _Fold) -> None:
    """The fused call, placed before the first of the call and the rewired readers (its inputs, the
    terms and parameters, all come before the norm), replaces the call; the other readers of the
    normed rows and of the sum read its side outputs, viewed to the norm's shape."""
    call, match = fold.call, fold.match
    x, residual = fold.terms if fold.terms is not None else (match.h, None)
    options = {"write_normed": bool(fold.normed_readers), "write_sum": bool(fold.sum_readers),
               "out_dtype": fold.out_dtype}
    with gm.graph.inserting_before(fold.first):
        fused = gm.graph.call_function(lowered_norm_multi_linear,
                                       (x, residual, match.weight, match.eps, match.scale_then_round, *call.args[1:]),
                                       {k: v for k, v in options.items() if v})
        take_location(fused, call)
        fused.meta.update({k: v for k, v in call.meta.items() if k in ("example_value", "val")})
        side = len(call.args) - 1  # the first side output's index
        for readers, shaped_like in ((fold.normed_readers, fold.out), (fold.sum_readers, match.h)):
            if readers:
                view = gm.graph.call_method("view", (gm.graph.call_function(operator.getitem, (fused, side)),
                                                     tuple(_shape(shaped_like))))
                view.meta.update({k: v for k, v in shaped_like.meta.items() if k in ("example_value", "val")})
                for reader in readers:
                    reader.replace_input_with(shaped_like, view)
                side += 1
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
