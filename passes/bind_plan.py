"""Check a plan against the detected indexers and resolve each S layer to its F source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from ic_compile.plan import FULL, LayerPlan, PlanError, check_plan_length

from .detect_indexers import Detection, IndexerMatch
from .drop_shared_key_cache import find_shared_key_caches
from .graph_ops import example_value, shape_of, topk_args

if TYPE_CHECKING:
    from ic_compile.frames import FrameLayout

    from .manager import PassContext


@dataclass
class LayerBinding:
    match: IndexerMatch  # this layer's indexer
    role: str  # "F" or "S"
    source: IndexerMatch  # the F indexer whose top-k this layer uses (itself when F)


def bind_plan(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: ctx.plan, ctx.bindings (and ctx.fragment for a graph holding some of the model's
    indexers), then ctx.caches, recorded while the S indexers are still whole."""
    matches = ctx.detection.matches
    if is_fragment(ctx.detection, ctx.layout):
        positions = [ctx.layout.position(m.module) for m in matches]
        ctx.plan = _whole_model_plan(ctx.plan_spec, matches, positions, ctx.layout)
        ctx.fragment = bind_fragment(matches, positions, ctx.plan)
        ctx.bindings = ctx.fragment.bindings
        ctx.counters["bind_plan.store_reads"] += len(ctx.fragment.reads)
        ctx.counters["bind_plan.store_writes"] += len(ctx.fragment.writes)
    else:
        ctx.plan = LayerPlan.coerce(ctx.plan_spec, len(matches)) or LayerPlan.all_full(len(matches))
        ctx.bindings = bind_layers(matches, ctx.plan)
    ctx.counters["bind_plan.full"] += len(ctx.full)
    ctx.counters["bind_plan.shared"] += len(ctx.shared)
    ctx.caches = find_shared_key_caches(ctx.bindings)
    ctx.counters["bind_plan.caches"] += len(ctx.caches)
    return gm


def is_fragment(detection: Detection, layout: FrameLayout | None) -> bool:
    """Does the graph hold some, not all, of the model's indexers? (Without a layout, or when the
    model names no indexer modules, the graph is taken to be the whole model, as before.)"""
    if layout is None or not layout.indexers:
        return False
    found = {layout.position(m.module) for m in detection.matches}
    if None in found and len(detection.matches) == len(layout.indexers):
        return False  # the name-based module list disagrees with detection: trust the graph, as before
    return found != set(range(len(layout.indexers)))


def _whole_model_plan(plan_spec, matches: list[IndexerMatch], positions: list[int | None],
                      layout: FrameLayout) -> LayerPlan:
    """The plan over the whole model's indexers, for a fragment whose indexers sit at `positions`."""
    total = len(layout.indexers)
    if None in positions:
        stray = [m.module for m, p in zip(matches, positions) if p is None]
        raise PlanError(f"indexer(s) at {stray} are not inside any of the model's {total} indexer modules "
                        f"({layout.indexers[0]}, ...), so their plan position across graph fragments is "
                        "unknown. Compile with fullgraph=True (one graph, ordered by layer number).")
    plan = LayerPlan.coerce(plan_spec, total) or LayerPlan.all_full(total)
    if len(plan) != total:
        raise PlanError(f"plan {plan.pattern!r} has {len(plan)} layers but the model has {total} "
                        f"indexer modules ({layout.indexers[0]} ... {layout.indexers[-1]}); this graph "
                        f"fragment holds {len(positions)} of them (plan positions {sorted(positions)}). "
                        "Give exactly one 'F'/'S' per indexer layer of the whole model.")
    return plan


def bind_layers(matches: list[IndexerMatch], plan: LayerPlan) -> list[LayerBinding]:
    """Each detected indexer (the whole model's, in layer order) to its plan role and F source."""
    check_plan_length(plan, len(matches))
    sources = plan.sources()
    bindings = [LayerBinding(m, role, matches[src]) for m, role, src in zip(matches, plan.pattern, sources)]
    for b in bindings:
        if b.role != FULL:
            check_compatible(b.match, b.source)
    return bindings


def check_compatible(own: IndexerMatch, source: IndexerMatch) -> None:
    """An S layer can take its source's top-k only if both rank the same [.., T] scores and keep the
    same k. Under dynamic shapes each layer may carry its own symbol for T (HF DynamicCache gives
    every layer's key length its own) and so its own `min(index_topk, T)` node: equal by value is
    enough. Equality is proved by the ShapeEnv or, when it holds for these inputs, guarded (a later
    call where it does not recompiles and lands here with a real mismatch)."""
    own_shape, source_shape = shape_of(own.topk.args[0]), shape_of(source.topk.args[0])
    if own_shape is not None and source_shape is not None and not _same_shape(own_shape, source_shape):
        raise PlanError(f"layer {own.layer} cannot reuse layer {source.layer}'s top-k: their score "
                        f"shapes differ ({show(own_shape)} vs {show(source_shape)})")
    own_k, source_k = _k_value(own.topk), _k_value(source.topk)
    if not same_size(own_k, source_k):
        raise PlanError(f"layer {own.layer} selects k={show(own_k)} keys but its source layer "
                        f"{source.layer} selects k={show(source_k)}; sharing needs the same k. Give "
                        f"layer {own.layer} its own indexer (F) or use the same index_topk in both layers")


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def same_size(a, b) -> bool:
    """int / SymInt equality by value: proved statically, else guarded on (true for these inputs)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return statically_known_true(a == b) or guard_or_false(a == b)
    return a == b


def show(value) -> str:
    """Sizes as values (a SymInt as its hint for these inputs, with its symbol), not node names."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return f"{hint} (symbolic {value.node.expr})" if hint is not None else f"symbolic {value.node.expr}"
    return str(value)


def _k_value(topk):
    """k as an int or SymInt: a node's example value (e.g. `min(index_topk, T)` traced as sym_min)."""
    k = topk_args(topk)[1]
    if isinstance(k, torch.fx.Node):
        value = example_value(k)
        return value if value is not None else k.name
    return k


@dataclass
class StoreRead:
    """An S layer whose F source ran in an earlier graph fragment: it reads the source's top-k from
    the index store (the graph gets it as an extra input) instead of computing it."""
    match: IndexerMatch
    layer: int  # plan position of the S layer
    source: int  # plan position of its F source
    items: tuple = ()  # which topk outputs the graph reads: 0 values, 1 indices
    shapes: tuple = ()  # per item, the shape this graph was traced with (ints, or SymInts: unchecked)


@dataclass
class StoreWrite:
    """An F layer whose top-k S layers in later fragments read: the graph returns it as extra
    outputs, written to the index store after the fragment runs."""
    match: IndexerMatch
    layer: int
    readers: tuple  # plan positions of the S layers outside this fragment that read it


@dataclass
class FragmentBinding:
    bindings: list  # every indexer of the fragment; imported S layers bound to themselves
    reads: list  # StoreRead
    writes: list  # StoreWrite
    layers: list  # plan position of each match, in match order


def bind_fragment(matches: list[IndexerMatch], positions: list[int], plan: LayerPlan) -> FragmentBinding:
    """Bind the indexers of one graph fragment to their plan positions (found from their module
    paths over the whole model). S layers whose source is in the fragment share in-graph as in
    `bind_plan`; the others go through the index store."""
    by_position = dict(zip(positions, matches))
    sources = plan.sources()
    bindings, reads, writes = [], [], []
    for match, position in zip(matches, positions):
        role, source = plan.pattern[position], sources[position]
        if role == FULL:
            bindings.append(LayerBinding(match, role, match))
            readers = tuple(j for j, s in enumerate(sources) if s == position and j != position
                            and j not in by_position)
            if readers:
                writes.append(StoreWrite(match, position, readers))
        elif source in by_position:
            check_compatible(match, by_position[source])
            bindings.append(LayerBinding(match, role, by_position[source]))
        else:
            bindings.append(LayerBinding(match, role, match))  # its own topk is replaced by the read
            reads.append(StoreRead(match, position, source))
    return FragmentBinding(bindings, reads, writes, list(positions))
