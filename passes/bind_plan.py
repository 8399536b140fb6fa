"""Check a plan against the detected indexers and resolve each S layer to its F source."""

from __future__ import annotations

from dataclasses import dataclass

from ic_compile.plan import FULL, LayerPlan, PlanError, check_plan_length

from .detect_indexers import IndexerMatch
from .graph_ops import shape_of


@dataclass
class LayerBinding:
    match: IndexerMatch  # this layer's indexer
    role: str  # "F" or "S"
    source: IndexerMatch  # the F indexer whose top-k this layer uses (itself when F)


def bind_plan(matches: list[IndexerMatch], plan: LayerPlan) -> list[LayerBinding]:
    check_plan_length(plan, len(matches))
    sources = plan.sources()
    bindings = [LayerBinding(m, role, matches[src]) for m, role, src in zip(matches, plan.pattern, sources)]
    for b in bindings:
        if b.role != FULL:
            _check_compatible(b)
    return bindings


def _check_compatible(binding: LayerBinding) -> None:
    own, source = binding.match, binding.source
    own_shape, source_shape = shape_of(own.topk.args[0]), shape_of(source.topk.args[0])
    if own_shape is not None and source_shape is not None and own_shape != source_shape:
        raise PlanError(f"layer {own.layer} cannot reuse layer {source.layer}'s top-k: their score "
                        f"shapes differ ({own_shape} vs {source_shape})")
    own_k, source_k = _k_of(own.topk), _k_of(source.topk)
    if own_k != source_k:
        raise PlanError(f"layer {own.layer} selects k={own_k} keys but its source layer "
                        f"{source.layer} selects k={source_k}; sharing needs the same k")


def _k_of(topk):
    return topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
