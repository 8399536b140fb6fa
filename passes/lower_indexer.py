"""F-layer indexers -> one `ic::indexer_topk` call (fused scores + top-k, no [S,H,T] tensor).

Recognised forms (others are left as they are, with the reason in `LoweringReport.skipped` and one
UnloweredIndexerWarning per graph):
  the product:      einsum of q and k; matmul(q, kT) of 4-d operands (HF: q[B,S,H,D] @ kT[B,1,D,T]);
                    bmm / mm of q with queries and heads merged (q.reshape(B, S*H, D)), split back later
  the head weights: scores * w after the ReLU, then a sum over the heads; matmul(w[B,S,1,H], scores)
                    (HF); an einsum of the scores and w over the heads
in any layout of their dims (passes/indexer_layout.py labels them: [B,S,H,T] or head-major [B,H,S,T]
scores, no batch dim, ...), then scalar scales and shifts, a mask (masked_fill / additive / where), a
per-key factor, and topk(k, dim=-1). When its values are used too, the call is
ic::indexer_topk_scored, whose picked scores stand in for them (`topk_values`).
Positive scalar scales are folded into w (ReLU(c·x) = c·ReLU(x) for c > 0). The model's own mask
keeps its exact meaning (causal=False; static caches, padding): by default (`indexer_mask="ranges"`)
it reaches the op as per-query key ranges, int32 [B,S,3] = (first, last, number of) allowed keys,
three reductions traced into the graph that Inductor fuses with the mask's producers, so the [S,T]
mask need not be materialised for the indexer (kernels/key_range.py); the op raises if a row is not
one contiguous range. `indexer_mask="dense"` hands the op the [B,S,T] bool mask itself (any mask).
`indexer_mask="auto"` (the backend's default) is decided once per graph by `decide_indexer_mask`,
and the lowered calls carry the decision ("ranges" | "dense").
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from ic_compile.kernels.fp8_indexer import FP8_DTYPE
from ic_compile.kernels.key_range import key_range_of

from .detect_indexers import IndexerMatch
from .graph_ops import example_value, is_last_dim, op_name, shape_of, take_location, topk_args
from .indexer_layout import CASTS, product_labels, relabel, widening
from .score_path import walk_score_path

if TYPE_CHECKING:
    from .manager import PassContext


class UnloweredIndexerWarning(UserWarning):
    """Kernels asked for, and some F indexer's form is not one the fused op takes: it runs as written."""


class IndexerPrecisionWarning(UnloweredIndexerWarning):
    """indexer_precision="fp8" asked for, and some indexer does not get it (or not at full speed)."""


@dataclass
class LoweringReport:
    lowered: list[int] = field(default_factory=list)  # layers now calling ic::indexer_topk
    skipped: dict[int, str] = field(default_factory=dict)  # layer -> why it was left alone
    attention_lowered: int = 0  # SDPA calls now running a sparse-attention op
    attention_absorbed: int = 0  # of those, in the absorbed MLA form (ic::sparse_mla)
    indexer_mask: str | None = None  # how the lowered indexers get the mask: "ranges" | "dense"
    moe_lowered: list[str] = field(default_factory=list)  # experts modules now calling ic::moe_experts
    moe_skipped: dict[str, str] = field(default_factory=dict)  # experts-like module -> why it was left alone
    moe_shared_folded: list[str] = field(default_factory=list)  # experts modules whose op also runs the shared expert
    moe_shared_skipped: dict[str, str] = field(default_factory=dict)  # experts module -> why its shared expert was not
    moe_router_lowered: list[str] = field(default_factory=list)  # router modules whose tail is ic::moe_route
    moe_router_skipped: dict[str, str] = field(default_factory=dict)  # router-like module -> why it was left alone
    moe_route_folded: list[str] = field(default_factory=list)  # experts calls that route too (ic::moe_route_experts)
    decode_linears: list[list[str]] = field(default_factory=list)  # linears of one input now one ic::multi_linear
    fp8_key_cache: list[int] = field(default_factory=list)  # fp8 indexers reading an fp8 copy of their key cache
    fp8_key_cache_skipped: dict[int, str] = field(default_factory=dict)  # fp8 indexer -> why it quantises per call


@dataclass
class _Plan:
    q: fx.Node
    k: fx.Node  # the [B,T,D] key behind the product's key operand
    w: fx.Node
    w_layout: str  # w's dims: b, s, h or 1 each (passes/indexer_layout.py), e.g. "bs1h" (HF), "bsh1"
    scale: float
    mask: fx.Node | None
    mask_kind: str  # "none" | "fill" (True = drop) | "additive" | "allowed"
    topk: int | fx.Node
    ordered: bool  # some consumer may depend on the descending order of the indices
    key_scale: fx.Node | None = None  # a per-key factor [B|1, (1,) 1, T] on the scores (DeepSeek's k_scale)
    scored: bool = False  # the topk's values are used too: the op also returns the picked scores
    pad: float | str = float("-inf")  # the model's value in an empty slot (a row with fewer allowed keys than
    # topk): its masked score, the fill of a masked_fill / where, or "mask_min" for an additive mask (its
    # most negative value: finfo.min + a score rounds to finfo.min)
    values_dtype: torch.dtype = torch.float32  # the dtype of the model's topk values
    layouts: dict = field(default_factory=dict)  # q_layout / k_layout / out_layout where not bshd / btd / bst


INDEXER_MASKS = ("auto", "ranges", "dense")  # how the model's mask reaches the op (backend option indexer_mask)
DENSE_MASK_MAX_QUERIES = 8  # "auto": graphs with at most this many (static) queries get the dense mask


def lower_indexer(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each F indexer (ctx.full) whose form is recognised -> `lowered_indexer`; the others
    stay, with the reason in ctx.report.skipped. All get the one mask decision of the graph."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
    plans = []
    for match in ctx.full:
        plan = _analyse(match)
        if isinstance(plan, str):
            ctx.report.skipped[match.layer] = plan
            ctx.counters["lower_indexer.skipped"] += 1
        else:
            plans.append((match, plan))
    if ctx.report.skipped:
        _warn_unlowered(ctx.report.skipped, ctx.indexer_precision)
    mask = decide_indexer_mask(ctx.indexer_mask, ctx.lowering, [_query_count(plan.q, plan.layouts) for _, plan in plans])
    for match, plan in plans:
        _replace(gm, match, plan, mask, ctx.indexer_precision)
        ctx.report.lowered.append(match.layer)
        ctx.counters["lower_indexer.lowered"] += 1
        ctx.counters[f"lower_indexer.mask_{mask}"] += 1
    if plans:
        ctx.report.indexer_mask = mask
    return gm


def _warn_unlowered(skipped: dict, precision: str) -> None:
    """Once per graph: which F indexers run as the model wrote them, and the first reason."""
    layers, reason = sorted(skipped), next(iter(skipped.values()))
    if precision != "bf16":
        warnings.warn(f"indexer_precision={precision!r} is not applied to the F indexers of layers {layers}: they "
                      f"run as the model wrote them, in its precision, since our op does not take their form "
                      f"({reason})", IndexerPrecisionWarning, stacklevel=3)
    else:
        warnings.warn(f"indexcache: the F indexers of layers {layers} run as the model wrote them, not in the fused "
                      f"op ({reason}): at long context they build the [S,H,T] score tensor. The plan still holds "
                      "(S layers share). kernels=False silences this.", UnloweredIndexerWarning, stacklevel=3)


def decide_indexer_mask(requested: str, lowering: str, queries: list) -> str:
    """The one place indexer_mask="auto" is resolved, per graph, at compile time -> "ranges" | "dense".
    queries: each lowered indexer's query length S (an int, or a SymInt under dynamic shapes).
    "auto" is key ranges under Inductor, which fuses their three reductions with the mask's
    producers, except in decode graphs (every S a constant <= DENSE_MASK_MAX_QUERIES): there the mask
    is at most [B, 8, T] and goes dense, since the op checks key ranges with a device sync that
    host-bound decode cannot afford. Under any other lowering (eager) "auto" is dense: unfused, the
    reductions would write int64 [B,S,T] temporaries, 8 bytes per mask element."""
    if requested not in INDEXER_MASKS:
        raise ValueError(f"indexer_mask={requested!r} is not one of {INDEXER_MASKS}")
    if requested != "auto":
        return requested
    if lowering != "inductor" or all(decode_sized(S) for S in queries):
        return "dense"
    return "ranges"


def lowered_indexer(q, k, w, scale, mask, topk, w_layout, mask_kind, ordered=True, indexer_mask="ranges",
                    check=True, indexer_precision="bf16", new_keys=None, new_key_pos=None, key_scale=None,
                    scored=False, q_layout="bshd", k_layout="btd", out_layout="bst"):
    """Canonical layouts, then the fused op -> int32 [B,S,topk], -1 where fewer keys are allowed;
    rows descending by score when `ordered` (else any order, which lets CUDA use topk_select).
    scored: (those indices, the picked scores fp32 [B,S,topk]), ic::indexer_topk_scored.
    q_layout / k_layout / w_layout / out_layout: the model's dims of q, k, w and the ranked scores (letters
    b s h d t 1, passes/indexer_layout.py), brought to [B,S,H,D], [B,T,D], [B,S,H] and back (views only).
    indexer_mask (decided by `decide_indexer_mask`): "ranges", the mask reaches the op as key ranges
    [B,S,3]; "dense", as itself. check: the op's host-side checks (False under CUDA graphs).
    indexer_precision: "bf16" (the model's) or "fp8"; new_keys / new_key_pos (fp8): k is a key cache
    the model has just written those keys into (passes/fp8_key_cache.py). key_scale [B|1,1..,T]: the
    model's per-key factor on the scores, the op's k_scale (with e4m3 q and k, the model's own fp8
    indexer, run as the fp8 op on its values)."""
    q, k = relabel(q, q_layout, "bshd"), relabel(k, k_layout, "btd")
    # q [B,S,H,D], k [B,T,D] in the model's dtype: bf16 products are exact in the fp32 accumulator,
    # so skipping the model's .float() upcast changes only the summation order (and uses tensor cores)
    extra = {} if new_keys is None else {"new_keys": new_keys, "new_key_pos": new_key_pos}  # the op's fp8 copy
    if key_scale is not None:  # [B|1, (1,) 1, T] -> [B, T], applied by the op after the head sum
        extra["k_scale"] = key_scale.reshape(key_scale.shape[0], key_scale.shape[-1]).float().expand(
            k.shape[0], k.shape[1])
        if q.dtype == k.dtype == FP8_DTYPE:  # the model's own fp8 indexer: its e4m3 q and keys, as they are
            indexer_precision = "fp8"
    if q.dtype != k.dtype and new_keys is None:  # with a key copy the op reads that, not k: k stays the buffer
        q, k = q.float(), k.float()
    w = relabel(w, w_layout, "bsh").float().expand(q.shape[:3]) * scale  # [B,S,H]
    allowed = _allowed(mask, mask_kind, q.shape[0], q.shape[1], k.shape[1])  # bool [B,S,T] | None
    op = torch.ops.ic.indexer_topk_scored if scored else torch.ops.ic.indexer_topk
    if allowed is None or indexer_mask == "dense":
        out = op(q, k, w, topk, allowed, False, ordered, check=check, indexer_precision=indexer_precision,
                 **extra)  # [B,S,topk] int32 (, fp32 scores)
    else:
        out = op(q, k, w, topk, None, False, ordered, key_range=key_range_of(allowed), check=check,
                 indexer_precision=indexer_precision, **extra)
    return out if scored else relabel(out, "bst", out_layout)  # (scored: only with out_layout bst)


def topk_values(picked, ids, pad, mask, dtype):
    """The model's topk values from the op's picked scores fp32 [B,S,topk]: in its dtype (that of the
    scores it ranked), and in empty slots (ids -1) its masked value: `pad`, or for "mask_min" the
    additive mask's most negative value per row."""
    if pad == "mask_min":
        pad = _to_rank(mask.amin(-1), 2).to(picked.dtype).expand(ids.shape[0], ids.shape[1])[..., None]  # [B,S,1]
    return torch.where(ids < 0, pad, picked).to(dtype)


def prefill_indexers(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's lowered indexers whose query count is not a constant <= DENSE_MASK_MAX_QUERIES
    (or is unknown)."""
    calls = gm.graph.find_nodes(op="call_function", target=lowered_indexer)
    return [n for n in calls if not decode_sized(query_count(n))]


def query_count(call: fx.Node):
    """The query length S of a lowered indexer call (an int, a SymInt, or None when unknown)."""
    return _query_count(call.args[0], call.kwargs)


def _query_count(q: fx.Node, layouts: dict):
    shape = shape_of(q)
    return None if shape is None else shape[layouts.get("q_layout", _DEFAULT_LAYOUTS["q_layout"]).index("s")]


def skip_host_checks(gm: fx.GraphModule) -> None:
    """check=False on every lowered indexer: the graph is to be captured as a CUDA graph, which can
    hold no device sync and replays one kernel path for all later data (see ic::indexer_topk)."""
    calls = gm.graph.find_nodes(op="call_function", target=lowered_indexer)
    for node in calls:
        node.kwargs = {**node.kwargs, "check": False}
    if calls:
        gm.recompile()


def decode_sized(S) -> bool:  # S: from query_count
    """A query length fixed at trace time and small (decode; symbolic under dynamic shapes: prefill)."""
    return isinstance(S, int) and S <= DENSE_MASK_MAX_QUERIES


def scatter_safe_indices(ids, keys, t_dim=1):
    """For the model's own consumers (scatter into a mask, gather): -1 -> key T-1 (T = keys.shape[t_dim]),
    int64 like topk.

    A row has -1 only when fewer than topk keys are allowed; then all allowed keys are selected,
    and T-1 is masked for every such query under causal masks (the last query sees all T keys)."""
    return torch.where(ids < 0, keys.shape[t_dim] - 1, ids).long()


def _allowed(mask, kind, batch, seq, keys):
    if kind == "none":
        return None
    if kind == "fill":
        mask = ~mask
    elif kind == "additive":
        mask = mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask == 0
    return _to_rank(mask, 3).expand(batch, seq, keys)


def _to_rank(mask, rank: int):
    """A mask [B, 1|H, ...] as `rank` dims: dim 1 squeezed (or its first entry taken) until it fits."""
    while mask.dim() > rank:
        mask = mask.squeeze(1) if mask.shape[1] == 1 else mask[:, 0]
    return mask


def _analyse(match: IndexerMatch) -> _Plan | str:
    if any(op_name(u) != "getitem" or u.args[1] not in (0, 1) for u in match.topk.users):
        return "the topk result is used other than through [0] (values) and [1] (indices)"
    scored = any(u.args[1] == 0 for u in match.topk.users)
    labels = product_labels(match.product, match.query, match.key)
    if isinstance(labels, str):
        return labels
    query, q_labels, key, k_labels, score_labels = labels
    path = walk_score_path(match, score_labels)
    if isinstance(path, str):
        return path
    if path.w is None or path.head is None or not isinstance(path.scale, (int, float)) or path.scale <= 0:
        return "no head weights and head reduction found, or a non-positive scale (cannot fold it through the ReLU)"
    names = {path.head: "h", ("y" if path.head == "x" else "x"): "s"}
    named = {key: "".join(names.get(c, c) for c in text) for key, text in
             (("q", q_labels), ("w", path.w_labels), ("out", path.labels))}
    if named["out"].replace("1", "") not in ("bst", "st"):
        return f"the ranked scores' dims are '{named['out']}' (b batch, s query, h head, t key), not [B,S,T]"
    if scored and path.shifted:
        return "topk values are used and a constant is added to the scores (the op's values would lack it)"
    if scored and named["out"] != "bst":
        return f"topk values are used and the ranked scores' dims are '{named['out']}', not [B,S,T]"
    mask, mask_kind = path.mask, path.mask_kind
    if mask_kind == "fill" and op_name(mask) in _NOT_OPS:  # masked_fill(~allowed): use `allowed`
        mask, mask_kind = mask.args[0], "allowed"  # (no [B,S,T] inversion, twice, per F layer)
    if scored and not isinstance(path.fill, (int, float, str)):
        return "topk values are used and the mask's fill is a tensor (its value in empty slots is unknown)"
    ranked = example_value(match.topk.args[0])
    if scored and not isinstance(ranked, torch.Tensor):
        return "topk values are used and the dtype of the ranked scores is unknown"
    layouts = {"q_layout": named["q"], "k_layout": k_labels, "out_layout": named["out"]}
    return _Plan(_uncast(query), key, path.w, named["w"], float(path.scale), mask, mask_kind,
                 topk_args(match.topk)[1], ordered=scored or not order_free(match.topk), key_scale=path.key_scale,
                 scored=scored, pad=path.fill, values_dtype=ranked.dtype if scored else torch.float32,
                 layouts={k: v for k, v in layouts.items() if v != _DEFAULT_LAYOUTS[k]})


_DEFAULT_LAYOUTS = {"q_layout": "bshd", "k_layout": "btd", "out_layout": "bst"}


# a masked_fill mask is bool, so these are all "logical not"
_NOT_OPS = {"invert", "logical_not", "bitwise_not"}
# casts that keep each index value where it is (HF: .indices.to(torch.int32), then .long())
_INDEX_CASTS = {"to", "long", "int", "type", "contiguous", "clone"}
# uses that read only dtype / device / shape (HF: topk_indices.new_ones(...) for the index mask)
_METADATA_USES = {"new_ones", "new_zeros", "new_full", "new_empty", "size", "dim"}


def order_free(indices: fx.Node) -> bool:
    """True when no use of the top-k result can see the order of the indices along the last dim:
    the indices only go (through casts, possibly into S layers) into scatter(-1, ids, <scalar>)
    -- HF's index mask -- or into metadata reads (new_ones). Anything else (a graph output, a
    gather, a slice...) counts as ordered."""
    for use in indices.users:
        name = op_name(use)
        if name == "getitem" and op_name(indices) == "topk":
            through = use.args[1] == 1 and order_free(use)
        elif name in _INDEX_CASTS:
            through = order_free(use)
        elif name in _METADATA_USES:
            through = use.args[0] is indices
        else:
            through = name in ("scatter", "scatter_") and _scatters_scalar_along_last(use, indices)
        if not through:
            return False
    return bool(indices.users)


def _scatters_scalar_along_last(scatter: fx.Node, index: fx.Node) -> bool:
    """scatter(input, dim, index, value) with `index` as the index, dim the last one, a scalar value."""
    args = list(scatter.args) + [None] * 4
    dim, idx = scatter.kwargs.get("dim", args[1]), scatter.kwargs.get("index", args[2])
    value = scatter.kwargs.get("value", args[3])
    return (idx is index and is_last_dim(dim, scatter) and isinstance(value, (bool, int, float))
            and args[0] is not index and "reduce" not in scatter.kwargs)


def _uncast(node: fx.Node) -> fx.Node:
    """q before the model's widening casts (same shape), so bf16 models feed bf16 to the kernel. Not
    before a narrowing one (DeepSeek's fp8 q: x.to(float8)): the values after it are the model's."""
    while op_name(node) in CASTS and isinstance(node.args[0], fx.Node) \
            and shape_of(node.args[0]) == shape_of(node) and widening(node):
        node = node.args[0]
    return node


def _replace(gm: fx.GraphModule, match: IndexerMatch, plan: _Plan, indexer_mask: str,
             indexer_precision: str = "bf16") -> None:
    with gm.graph.inserting_before(match.topk):
        options = {"indexer_precision": indexer_precision} if indexer_precision != "bf16" else {}
        if plan.key_scale is not None:
            options["key_scale"] = plan.key_scale
        if plan.scored:
            options["scored"] = True
        options.update(plan.layouts)
        node = gm.graph.call_function(
            lowered_indexer, (plan.q, plan.k, plan.w, plan.scale, plan.mask, plan.topk, plan.w_layout,
                              plan.mask_kind, plan.ordered, indexer_mask), options)
        ids = gm.graph.call_function(operator.getitem, (node, 0)) if plan.scored else node
        t_dim = plan.layouts.get("k_layout", _DEFAULT_LAYOUTS["k_layout"]).index("t")
        safe = gm.graph.call_function(scatter_safe_indices, (ids, plan.k) + ((t_dim,) if t_dim != 1 else ()))
        new_nodes = [node, safe]
        if plan.scored:
            picked = gm.graph.call_function(operator.getitem, (node, 1))
            values = gm.graph.call_function(topk_values, (picked, ids, plan.pad, plan.mask, plan.values_dtype))
            new_nodes += [ids, picked, values]
    for new in new_nodes:
        take_location(new, match.topk)
    node.meta["indexcache_layer"] = match.layer
    for use in list(match.topk.users):
        use.replace_all_uses_with(values if use.args[1] == 0 else safe)
