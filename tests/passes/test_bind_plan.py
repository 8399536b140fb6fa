"""bind_plan: plan roles and F sources, by-value size checks (errors show values, not node names),
and graph fragments bound by their indexers' plan positions over the whole model."""

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from ic_compile.frames import FrameLayout
from ic_compile.passes.bind_plan import bind_fragment, bind_plan, check_compatible
from ic_compile.passes.detect_indexers import IndexerMatch, detect_indexers
from ic_compile.passes.manager import PassContext
from ic_compile.plan import LayerPlan, PlanError

from traced import layers  # tests/passes/traced.py


four_layers = layers(4)


def bound(plan, layout=None, modules=None) -> PassContext:
    """bind_plan on four_layers; `modules`: the module path to give each indexer's topk."""
    gm = fx.symbolic_trace(four_layers)
    topks = [n for n in gm.graph.nodes if n.target == "topk"]
    for topk, path in zip(topks, modules or ()):
        topk.meta["nn_module_stack"] = {path: (path, torch.nn.Module)}
    ctx = PassContext(plan_spec=plan, layout=layout)
    ctx.detection = detect_indexers(gm)
    bind_plan(gm, ctx)
    return ctx


def test_s_layers_bind_to_the_last_f_before_them():
    ctx = bound("FSFS")
    assert [(b.role, b.match.layer, b.source.layer) for b in ctx.bindings] == [
        ("F", 0, 0), ("S", 1, 0), ("F", 2, 2), ("S", 3, 2)]
    assert str(ctx.plan) == "FSFS" and ctx.fragment is None
    assert [m.layer for m in ctx.full] == [0, 2] and [b.match.layer for b in ctx.shared] == [1, 3]
    assert ctx.counters == {"bind_plan.full": 2, "bind_plan.shared": 2, "bind_plan.caches": 2}


def test_no_plan_keeps_every_layer_full_and_a_wrong_length_is_an_error():
    assert [b.role for b in bound(None).bindings] == ["F"] * 4
    with pytest.raises(PlanError, match="plan 'FSF' has 3 layers but 4 indexer layers were detected"):
        bound("FSF")


def fake(shape, dynamic_last: bool, mode: FakeTensorMode):
    sizes = [DimDynamic.STATIC] * (len(shape) - 1) + [DimDynamic.DYNAMIC if dynamic_last else DimDynamic.STATIC]
    return mode.from_tensor(torch.empty(shape), symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))


def match_over(graph: fx.Graph, scores, k: int, layer: int) -> IndexerMatch:
    """An IndexerMatch whose topk ranks `scores` (a fake tensor); check_compatible reads only the topk."""
    placeholder = graph.placeholder(f"scores_{layer}")
    placeholder.meta["example_value"] = scores
    topk = graph.call_method("topk", (placeholder, k), {"dim": -1})
    return IndexerMatch(topk, None, None, None, None, f"layers.{layer}.indexer", layer)


def test_symbolic_key_lengths_compare_by_value():
    """HF's DynamicCache gives each layer's key length its own symbol: equal for these inputs is
    enough (guarded); different ones are an error that shows the values and the symbols."""
    mode, graph = FakeTensorMode(shape_env=ShapeEnv()), fx.Graph()
    source = match_over(graph, fake((1, 4, 10), True, mode), 2, 0)
    check_compatible(match_over(graph, fake((1, 4, 10), True, mode), 2, 1), source)
    longer = match_over(graph, fake((1, 4, 12), True, mode), 2, 2)
    with pytest.raises(PlanError, match=r"layer 2 cannot reuse layer 0's top-k: their score shapes differ "
                                        r"\(\(1, 4, 12 \(symbolic s\d+\)\) vs \(1, 4, 10 \(symbolic s\d+\)\)\)"):
        check_compatible(longer, source)


def test_a_different_k_is_an_error_naming_both():
    mode, graph = FakeTensorMode(shape_env=ShapeEnv()), fx.Graph()
    source = match_over(graph, fake((1, 4, 10), False, mode), 2, 0)
    with pytest.raises(PlanError, match="layer 1 selects k=3 keys but its source layer 0 selects k=2"):
        check_compatible(match_over(graph, fake((1, 4, 10), False, mode), 3, 1), source)


MODEL_INDEXERS = [f"layers.{i}.indexer" for i in range(6)]


def test_a_fragment_binds_by_plan_position_and_uses_the_store():
    """Plan FSFSSS over six indexer modules; this graph holds layers 1-4. Layer 1's F (layer 0) ran
    in an earlier fragment: a store read. Layer 3 reads layer 2 in-graph. Layer 2's top-k is also
    read by layer 5, in a later fragment: a store write. Layer 4 reads layer 2 in-graph."""
    layout = FrameLayout(None, "", MODEL_INDEXERS)
    ctx = bound("FSFSSS", layout, MODEL_INDEXERS[1:5])
    fragment = ctx.fragment
    assert fragment.layers == [1, 2, 3, 4]
    assert [(r.layer, r.source) for r in fragment.reads] == [(1, 0)]
    assert [(w.layer, w.readers) for w in fragment.writes] == [(2, (5,))]
    assert [(b.role, b.match.layer, b.source.layer) for b in ctx.bindings] == [
        ("S", 1, 1), ("F", 2, 2), ("S", 3, 2), ("S", 4, 2)]  # a store reader is bound to itself
    assert [b.match.layer for b in ctx.shared] == [3, 4]
    assert ctx.counters["bind_plan.store_reads"] == 1 and ctx.counters["bind_plan.store_writes"] == 1


def test_a_fragment_needs_a_whole_model_plan_and_known_positions():
    layout = FrameLayout(None, "", MODEL_INDEXERS)
    with pytest.raises(PlanError, match=r"plan 'FSFS' has 4 layers but the model has 6 indexer modules.*"
                                        r"plan positions \[1, 2, 3, 4\]"):
        bound("FSFS", layout, MODEL_INDEXERS[1:5])
    with pytest.raises(PlanError, match=r"indexer\(s\) at \['mlp.topk'\] are not inside any of the model's 6"):
        bound("FSFSSS", layout, MODEL_INDEXERS[1:4] + ["mlp.topk"])


def test_the_whole_model_in_one_graph_is_not_a_fragment():
    ctx = bound("FSFS", FrameLayout(None, "", MODEL_INDEXERS[:4]), MODEL_INDEXERS[:4])
    assert ctx.fragment is None and len(ctx.bindings) == 4


def test_bind_fragment_without_the_pass():
    """The plain function, as tools call it: matches, their plan positions, the whole plan."""
    ctx = bound(None)
    fragment = bind_fragment(ctx.detection.matches[:2], [2, 3], LayerPlan("FSSS"))
    assert [(r.layer, r.source) for r in fragment.reads] == [(2, 0), (3, 0)] and fragment.writes == []
