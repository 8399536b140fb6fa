"""F-layer indexers -> one `ic::indexer_topk` call (fused scores + top-k, no [S,H,T] tensor).

Recognised layouts (others are left as they are, with the reason in `LoweringReport.skipped`):
  matmul form (HF):  relu(matmul(q[B,S,H,D], kT[B,1,D,T]) * c) -> matmul(w[B,S,1,H], .) -> squeeze
  einsum form (ours): einsum("bshd,btd->bsht", q, k).clamp_min(0) * c -> (. * w[B,S,H,1]).sum(2)
  head-major (attention-style code): matmul(q.transpose(1, 2), kT[B,1,D,T]) -> [B,H,S,T], * w[B,H,S,1], .sum(1)
then scalar scales, a mask (masked_fill / additive / where) and topk(k, dim=-1). When its values are used
too, the call is ic::indexer_topk_scored, whose picked scores stand in for them (`topk_values`).
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
from .graph_ops import LAYOUT_OPS, example_value, is_last_dim, op_name, shape_of, take_location, topk_args

if TYPE_CHECKING:
    from .manager import PassContext


class IndexerPrecisionWarning(UserWarning):
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
    fp8_key_cache: list[int] = field(default_factory=list)  # fp8 indexers reading an fp8 copy of their key cache
    fp8_key_cache_skipped: dict[int, str] = field(default_factory=dict)  # fp8 indexer -> why it quantises per call


@dataclass
class _Plan:
    q: fx.Node
    k: fx.Node  # the [B,T,D] key behind the product's key operand
    w: fx.Node
    w_layout: str  # "bs1h" | "bsh1" | "bhs1" (see _head_weights)
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
    if ctx.indexer_precision != "bf16" and ctx.report.skipped:
        warnings.warn(f"indexer_precision={ctx.indexer_precision!r} is not applied to the F indexers of layers "
                      f"{sorted(ctx.report.skipped)}: they run as the model wrote them, in its precision, since our op "
                      f"does not take their form ({next(iter(ctx.report.skipped.values()))})", IndexerPrecisionWarning,
                      stacklevel=2)
    mask = decide_indexer_mask(ctx.indexer_mask, ctx.lowering, [shape_of(plan.q)[1] for _, plan in plans])
    for match, plan in plans:
        _replace(gm, match, plan, mask, ctx.indexer_precision)
        ctx.report.lowered.append(match.layer)
        ctx.counters["lower_indexer.lowered"] += 1
        ctx.counters[f"lower_indexer.mask_{mask}"] += 1
    if plans:
        ctx.report.indexer_mask = mask
    return gm


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
                    scored=False):
    """Canonical layouts, then the fused op -> int32 [B,S,topk], -1 where fewer keys are allowed;
    rows descending by score when `ordered` (else any order, which lets CUDA use topk_select).
    scored: (those indices, the picked scores fp32 [B,S,topk]), ic::indexer_topk_scored.
    indexer_mask (decided by `decide_indexer_mask`): "ranges", the mask reaches the op as key ranges
    [B,S,3]; "dense", as itself. check: the op's host-side checks (False under CUDA graphs).
    indexer_precision: "bf16" (the model's) or "fp8"; new_keys / new_key_pos (fp8): k is a key cache
    the model has just written those keys into (passes/fp8_key_cache.py). key_scale [B|1,1..,T]: the
    model's per-key factor on the scores, the op's k_scale (with e4m3 q and k, the model's own fp8
    indexer, run as the fp8 op on its values)."""
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
    w = _weights_bsh(w, w_layout).float() * scale  # [B,S,H]
    allowed = _allowed(mask, mask_kind, q.shape[0], q.shape[1], k.shape[1])  # bool [B,S,T] | None
    op = torch.ops.ic.indexer_topk_scored if scored else torch.ops.ic.indexer_topk
    if allowed is None or indexer_mask == "dense":
        return op(q, k, w, topk, allowed, False, ordered, check=check, indexer_precision=indexer_precision,
                  **extra)  # [B,S,topk] int32 (, fp32 scores)
    return op(q, k, w, topk, None, False, ordered, key_range=key_range_of(allowed), check=check,
              indexer_precision=indexer_precision, **extra)


def _weights_bsh(w, w_layout: str):
    """The head weights as [B,S,H] from their layout in the model (see _head_weights)."""
    if w_layout == "bs1h":
        return w.squeeze(-2)
    return w.squeeze(-1).transpose(1, 2) if w_layout == "bhs1" else w.squeeze(-1)


def topk_values(picked, ids, pad, mask, dtype):
    """The model's topk values from the op's picked scores fp32 [B,S,topk]: in its dtype (that of the
    scores it ranked), and in empty slots (ids -1) its masked value: `pad`, or for "mask_min" the
    additive mask's most negative value per row."""
    if pad == "mask_min":
        pad = mask.amin(-1)
        while pad.dim() > 2:
            pad = pad.squeeze(1) if pad.shape[1] == 1 else pad[:, 0]
        pad = pad.to(picked.dtype).expand(ids.shape[0], ids.shape[1])[..., None]  # [B,S,1]
    return torch.where(ids < 0, pad, picked).to(dtype)


def prefill_indexers(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's lowered indexers whose query count is not a constant <= DENSE_MASK_MAX_QUERIES
    (or is unknown)."""
    calls = gm.graph.find_nodes(op="call_function", target=lowered_indexer)
    return [n for n in calls if not ((q_shape := shape_of(n.args[0])) and decode_sized(q_shape[1]))]


def skip_host_checks(gm: fx.GraphModule) -> None:
    """check=False on every lowered indexer: the graph is to be captured as a CUDA graph, which can
    hold no device sync and replays one kernel path for all later data (see ic::indexer_topk)."""
    calls = gm.graph.find_nodes(op="call_function", target=lowered_indexer)
    for node in calls:
        node.kwargs = {**node.kwargs, "check": False}
    if calls:
        gm.recompile()


def decode_sized(S) -> bool:
    """A query length fixed at trace time and small (decode; symbolic under dynamic shapes: prefill)."""
    return isinstance(S, int) and S <= DENSE_MASK_MAX_QUERIES


def scatter_safe_indices(ids, keys):
    """For the model's own consumers (scatter into a mask, gather): -1 -> key T-1, int64 like topk.

    A row has -1 only when fewer than topk keys are allowed; then all allowed keys are selected,
    and T-1 is masked for every such query under causal masks (the last query sees all T keys)."""
    return torch.where(ids < 0, keys.shape[1] - 1, ids).long()


def _allowed(mask, kind, batch, seq, keys):
    if kind == "none":
        return None
    if kind == "fill":
        mask = ~mask
    elif kind == "additive":
        mask = mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask == 0
    while mask.dim() > 3:
        mask = mask.squeeze(1) if mask.shape[1] == 1 else mask[:, 0]
    return mask.expand(batch, seq, keys)


def _analyse(match: IndexerMatch) -> _Plan | str:
    if any(op_name(u) != "getitem" or u.args[1] not in (0, 1) for u in match.topk.users):
        return "the topk result is used other than through [0] (values) and [1] (indices)"
    scored = any(u.args[1] == 0 for u in match.topk.users)
    if not _known_product(match):
        return f"q·k product layout not recognised ({op_name(match.product)} {shape_of(match.query)} x {shape_of(match.key)})"
    chain = _chain(match)
    if isinstance(chain, str):
        return chain
    query, heads_first = _query_of(match.query)
    scale, w, w_layout, mask, mask_kind, key_scale, fill = 1.0, None, "", None, "none", None, float("-inf")
    for node, via in chain:
        name = op_name(node)
        if name in ("mul", "div") and _scalar_of(node, via) is not None and (name == "mul" or node.args[0] is via):
            c = _scalar_of(node, via)
            scale = scale * c if name == "mul" else scale / c
        elif name in ("matmul", "mul") and w is None and _head_weights(node, via, heads_first) is not None:
            w, w_layout = _head_weights(node, via, heads_first)
        elif name == "masked_fill" and mask is None and node.args[2] == float("-inf"):
            mask, mask_kind = node.args[1], "fill"
        elif name == "add" and mask is None:
            mask, mask_kind, fill = [a for a in node.args if a is not via][0], "additive", "mask_min"
        elif name == "where" and mask is None and node.args[1] is via:
            mask, mask_kind, fill = node.args[0], "allowed", node.args[2]
        elif name == "mul" and key_scale is None and (factor := _per_key(node, via)) is not None:
            key_scale = factor
        elif name == "sum" and w_layout == "bsh1" and _sum_dim(node) not in (2, -2):
            return "the head reduction sums over a dim other than the heads"
        elif name == "sum" and w_layout == "bhs1" and _sum_dim(node) not in (1, -3):
            return "the head reduction sums over a dim other than the heads (dim 1 of [B,H,S,T])"
        elif name in LAYOUT_OPS or name in ("sum", "relu", "clamp_min", "clamp") or node is match.relu:
            continue
        else:
            return f"op '{name}' on the score path is not part of a known indexer form"
    if w is None or not isinstance(scale, (int, float)) or scale <= 0:
        return "no head weights found, or a non-positive scale (cannot fold it through the ReLU)"
    if mask_kind == "fill" and op_name(mask) in _NOT_OPS:  # masked_fill(~allowed): use `allowed`
        mask, mask_kind = mask.args[0], "allowed"  # (no [B,S,T] inversion, twice, per F layer)
    topk = topk_args(match.topk)[1]
    key = _key_source(match)
    if key is None:
        return f"no [B,T,D] key tensor behind the product's key operand {shape_of(match.key)}"
    if scored and not isinstance(fill, (int, float, str)):
        return "topk values are used and the mask's fill is a tensor (its value in empty slots is unknown)"
    ranked = example_value(match.topk.args[0])
    if scored and not isinstance(ranked, torch.Tensor):
        return "topk values are used and the dtype of the ranked scores is unknown"
    return _Plan(_uncast(query), key, w, w_layout, float(scale), mask, mask_kind, topk,
                 ordered=scored or not order_free(match.topk), key_scale=key_scale, scored=scored, pad=fill,
                 values_dtype=ranked.dtype if scored else torch.float32)


def _per_key(node: fx.Node, via: fx.Node) -> fx.Node | None:
    """The other factor of `node` when it is one number per (batch, key): the scores' shape with 1 at
    every dim but the batch (or 1) and the last (DeepSeek's `* k_scale[:, None, :]`)."""
    others = [a for a in node.args if a is not via]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        return None
    shape, scores = shape_of(others[0]), shape_of(via)
    if shape is None or scores is None or len(shape) != len(scores) or len(shape) < 3:
        return None
    if shape[-1] != scores[-1] or shape[0] not in (1, scores[0]) or any(d != 1 for d in shape[1:-1]):
        return None
    return others[0]


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


def _known_product(match: IndexerMatch) -> bool:
    """q [B,S,H,D] times k as einsum("bshd,btd->bsht") or matmul(q, kT [B,1,D,T])."""
    q_shape, k_shape = shape_of(match.query), shape_of(match.key)
    if q_shape is None or k_shape is None or len(q_shape) != 4:
        return False
    if op_name(match.product) == "einsum":
        inputs, out = str(match.product.args[0]).replace(" ", "").split("->")
        q_sub, k_sub = inputs.split(",")
        return (len(q_sub) == 4 and len(k_sub) == 3 and k_sub[0] == q_sub[0] and k_sub[2] == q_sub[3]
                and out == q_sub[:3] + k_sub[1])
    return op_name(match.product) == "matmul" and len(k_shape) == 4 and k_shape[1] == 1


CASTS = {"float", "to", "type", "half", "bfloat16", "double"}


def _uncast(node: fx.Node) -> fx.Node:
    """q before the model's widening casts (same shape), so bf16 models feed bf16 to the kernel. Not
    before a narrowing one (DeepSeek's fp8 q: x.to(float8)): the values after it are the model's."""
    while op_name(node) in CASTS and isinstance(node.args[0], fx.Node) \
            and shape_of(node.args[0]) == shape_of(node) and _widening(node):
        node = node.args[0]
    return node


def _widening(cast: fx.Node) -> bool:
    """The cast keeps every value: floats to a dtype of more bits, or of the same dtype."""
    source, out = example_value(cast.args[0]), example_value(cast)
    if not (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    if source.dtype == out.dtype:
        return True
    return source.is_floating_point() and out.is_floating_point() and out.element_size() > source.element_size()


def _key_source(match: IndexerMatch) -> fx.Node | None:
    """Walk back from the product's key operand through layout ops and casts to the [B,T,D] key
    (HF: k.transpose(-1, -2).float().unsqueeze(1)), following which dim is which through every op:
    shapes alone cannot tell k [B,T,D] from its transpose when T == D (a 128-token prompt with
    index_head_dim 128 picked the transpose)."""
    node = match.key
    dims = ("B", "1", "D", "T") if op_name(match.product) == "matmul" else ("B", "T", "D")
    for _ in range(8):
        if op_name(node) in CASTS and not _widening(node):  # the model's values are the cast's (fp8 keys)
            return node if dims == ("B", "T", "D") else None
        if dims == ("B", "T", "D") and op_name(node) not in CASTS:
            return node
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return None
        dims = _input_dims(node, dims, shape_of(source))
        if dims is None:
            return None
        node = source
    return None


def _input_dims(node: fx.Node, dims: tuple, in_shape) -> tuple | None:
    """Labels of a layout op's input dims given its output's, or None when the op mixes dims."""
    name, args = op_name(node), node.args[1:]
    if in_shape is None:
        return None
    if name in CASTS or name in ("contiguous", "clone") or (name in ("view", "reshape", "expand")
                                                            and tuple(in_shape) == tuple(shape_of(node) or ())):
        return dims
    if name in ("transpose", "swapaxes") and len(args) == 2 and all(isinstance(a, int) for a in args):
        a, b = (d % len(dims) for d in args)
        swapped = list(dims)
        swapped[a], swapped[b] = dims[b], dims[a]
        return tuple(swapped)
    if name == "permute":
        order = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if sorted(d % len(dims) for d in order) != list(range(len(dims))):
            return None
        out = [None] * len(dims)
        for i, d in enumerate(order):
            out[d % len(dims)] = dims[i]
        return tuple(out)
    if name == "unsqueeze" and len(args) == 1 and isinstance(args[0], int):
        d = args[0] % len(dims)
        return dims[:d] + dims[d + 1:] if dims[d] == "1" else None
    return None


def _chain(match: IndexerMatch):
    """(node, the input it reads from the score path) from the product up to the topk input."""
    on_path = {match.product}
    chain = []
    for node in _topo(match):
        inputs = [a for a in node.all_input_nodes if a in on_path]
        if not inputs:
            continue
        if len(inputs) > 1:
            return f"'{node.name}' combines two score tensors"
        on_path.add(node)
        chain.append((node, inputs[0]))
    if not chain or chain[-1][0] is not match.topk.args[0]:
        return "the score path does not end at the topk input"
    return chain


def _topo(match: IndexerMatch) -> list[fx.Node]:
    """Score-path nodes above the product, in graph order (incl. those between product and ReLU)."""
    nodes = set(match.score_nodes) | {match.relu} | _between(match.product, match.relu)
    order = {n: i for i, n in enumerate(match.topk.graph.nodes)}
    return sorted(nodes - {match.product}, key=order.__getitem__)


def _between(low: fx.Node, high: fx.Node) -> set:
    found, stack = set(), list(high.all_input_nodes)
    while stack:
        node = stack.pop()
        if node is low or node in found or low not in _ancestors(node, 16):
            continue
        found.add(node)
        stack += node.all_input_nodes
    return found


def _ancestors(node: fx.Node, depth: int) -> set:
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def _sum_dim(node: fx.Node):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim


def _scalar_of(node: fx.Node, via: fx.Node):
    others = [a for a in node.args if a is not via]
    return others[0] if len(others) == 1 and isinstance(others[0], (int, float)) else None


def _head_weights(node: fx.Node, via: fx.Node, heads_first: bool = False):
    """(w, layout) when `node` applies the head weights: "bs1h" matmul(w [B,S,1,H], scores [B,S,H,T]),
    "bsh1" scores [B,S,H,T] * w [B,S,H,1], or with head-major scores [B,H,S,T] "bhs1" (* w [B,H,S,1])."""
    others = [a for a in node.args if a is not via and isinstance(a, fx.Node)]
    if len(others) != 1:
        return None
    shape = shape_of(others[0])
    if shape is None or len(shape) != 4:
        return None
    if op_name(node) == "matmul" and shape[2] == 1 and node.args[1] is via and not heads_first:
        return others[0], "bs1h"
    if op_name(node) == "mul" and shape[3] == 1:
        return others[0], "bhs1" if heads_first else "bsh1"
    return None


_HEAD_SWAPS = {"transpose", "swapaxes", "permute"}


def _query_of(operand: fx.Node) -> tuple[fx.Node, bool]:
    """(q [B,S,H,D], heads_first): the product's query operand, or, when that is q with dims 1 and 2
    swapped (q.transpose(1, 2): head-major scores [B,H,S,T], attention-style code), q itself."""
    node = operand
    while op_name(node) in CASTS and isinstance(node.args[0], fx.Node) and _widening(node):
        node = node.args[0]
    source = node.args[0] if op_name(node) in _HEAD_SWAPS and node.args else None
    if isinstance(source, fx.Node) and len(shape_of(source) or ()) == 4 \
            and _input_dims(node, ("B", "H", "S", "D"), shape_of(source)) == ("B", "S", "H", "D"):
        return source, True
    return operand, False


def _replace(gm: fx.GraphModule, match: IndexerMatch, plan: _Plan, indexer_mask: str,
             indexer_precision: str = "bf16") -> None:
    with gm.graph.inserting_before(match.topk):
        options = {"indexer_precision": indexer_precision} if indexer_precision != "bf16" else {}
        if plan.key_scale is not None:
            options["key_scale"] = plan.key_scale
        if plan.scored:
            options["scored"] = True
        node = gm.graph.call_function(
            lowered_indexer, (plan.q, plan.k, plan.w, plan.scale, plan.mask, plan.topk, plan.w_layout,
                              plan.mask_kind, plan.ordered, indexer_mask), options)
        ids = gm.graph.call_function(operator.getitem, (node, 0)) if plan.scored else node
        safe = gm.graph.call_function(scatter_safe_indices, (ids, plan.k))
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
