"""connect_index_store: a fragment's store reads become graph inputs (the S indexer then dies), its
store writes extra graph outputs; whole-model graphs are left as they are."""

import torch
from torch import fx

from ic_compile.passes.bind_plan import bind_fragment
from ic_compile.passes.connect_index_store import connect_index_store
from ic_compile.passes.detect_indexers import detect_indexers
from ic_compile.passes.eliminate_dead_code import eliminate_dead_code
from ic_compile.passes.manager import PassContext
from ic_compile.plan import LayerPlan

from traced import indexer  # tests/passes/traced.py


def two_layers(q, k, w):
    s = indexer(q * 2, k, w)  # plan position 1: S, its F (position 0) ran in an earlier fragment
    f = indexer(q, k, w)  # plan position 2: F, read by position 3 in a later fragment
    return (s.indices + 1, f.indices + 1)


def connected(plan="FSFS"):
    gm = fx.symbolic_trace(two_layers)
    ctx = PassContext()
    ctx.fragment = bind_fragment(detect_indexers(gm).matches, [1, 2], LayerPlan(plan))
    connect_index_store(gm, ctx)
    eliminate_dead_code(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return gm, ctx


def test_a_store_read_becomes_an_input_and_the_s_indexer_dies():
    gm, ctx = connected()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["q", "k", "w", "ic_index_store_1_from_0_1"]
    assert type(placeholders[-1]._dynamo_source).__name__ == "LocalSource"  # AOTAutograd needs a source
    assert len([n for n in gm.graph.nodes if n.target == "topk"]) == 1
    read = ctx.fragment.reads[0]
    assert read.items == (1,) and read.shapes == (None,)  # only .indices read; no example values here
    assert ctx.counters["connect_index_store.inputs"] == 1


def test_a_store_write_becomes_two_outputs():
    gm, ctx = connected()
    q, k, w = torch.randn(1, 3, 2, 4), torch.randn(1, 5, 4), torch.randn(1, 3, 2)
    stored = torch.tensor([[[0, 1], [1, 2], [2, 0]]])
    s_out, f_out, f_values, f_indices = gm(q, k, w, stored)
    want = indexer(q, k, w)
    assert torch.equal(s_out, stored + 1) and torch.equal(f_out, want.indices + 1)
    assert torch.equal(f_values, want.values) and torch.equal(f_indices, want.indices)
    assert ctx.counters["connect_index_store.outputs"] == 2


def test_no_store_traffic_when_sources_and_readers_are_in_the_graph():
    gm, ctx = connected("FFFF")
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["q", "k", "w"]
    assert not ctx.fragment.reads and not ctx.fragment.writes and not +ctx.counters


def test_a_whole_model_graph_is_left_alone():
    gm = fx.symbolic_trace(two_layers)
    nodes = [(n.name, n.args) for n in gm.graph.nodes]
    assert connect_index_store(gm, PassContext()) is gm and [(n.name, n.args) for n in gm.graph.nodes] == nodes
