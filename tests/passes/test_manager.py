"""The pass manager: one ordered pipeline, a lint after each pass, a log line per pass (and the graph
at DEBUG), counters from the graph edits mirrored into torch._dynamo's counters."""

import logging

import pytest
import torch
from torch import fx

from ic_compile.passes.manager import PassContext, indexer_free_pipeline, pipeline, run_passes
from ic_compile.rewrite import rewrite

from traced import layers  # tests/passes/traced.py


three_layers = layers(3)


def names(passes) -> list[str]:
    return [p.__name__ for p in passes]


def test_pipeline_order_and_the_kernel_passes_only_when_asked():
    rewrite_only = ["eliminate_dead_code", "detect", "bind_plan", "connect_index_store", "forward_indices",
                    "eliminate_dead_code", "drop_shared_key_cache"]
    assert names(pipeline(PassContext())) == rewrite_only
    moe = ["lower_moe_experts", "fold_shared_expert", "lower_moe_router", "fold_moe_route", "lower_decode_linears",
           "fold_rms_norm"]
    inductor_only = ["realize_rotary_table"]
    assert names(pipeline(PassContext(kernels=True))) == rewrite_only + [
        "lower_indexer", "lower_sparse_attention", *moe, "drop_trivial_topk", "eliminate_dead_code", *inductor_only]
    assert names(pipeline(PassContext(kernels=True, lowering="eager"))) == rewrite_only + [
        "lower_indexer", "lower_sparse_attention", *moe, "drop_trivial_topk", "eliminate_dead_code"]
    assert names(pipeline(PassContext(kernels=True, sparse_attention=False))) == rewrite_only + [
        "lower_indexer", *moe, "drop_trivial_topk", "eliminate_dead_code", *inductor_only]
    assert names(pipeline(PassContext(kernels=True, moe_experts=False, moe_router=False, merge_linears=False))) == \
        rewrite_only + ["lower_indexer", "lower_sparse_attention", "drop_trivial_topk", "eliminate_dead_code",
                        *inductor_only]
    assert names(indexer_free_pipeline(PassContext(kernels=True))) == [*moe, "drop_trivial_topk",
                                                                       "eliminate_dead_code"]
    assert indexer_free_pipeline(PassContext()) == []


def test_one_info_line_per_pass_and_the_graph_at_debug(caplog):
    with caplog.at_level(logging.INFO, logger="ic_compile.passes"):
        rewrite(fx.symbolic_trace(three_layers), "FSS")
    lines = [r.getMessage() for r in caplog.records if r.name == "ic_compile.passes"]
    assert [line.split(":")[0] for line in lines] == names(pipeline(PassContext()))
    assert "forward_indices: 45 nodes (-2 +0)" in lines[4] and "shared_topk=2" in lines[4], lines[4]
    assert all(r.levelno == logging.INFO for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ic_compile.passes"):
        rewrite(fx.symbolic_trace(three_layers), "FSS")
    graphs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(graphs) == len(lines) and all("def forward(self, q, k, w, v)" in g for g in graphs)
    assert graphs[0].count(".topk(") == 3 and graphs[-1].count(".topk(") == 1  # the S indexers died


def test_counters_come_from_the_graph_edits_and_reach_dynamo():
    dynamo = torch._dynamo.utils.counters["ic_compile"]
    before = dict(dynamo)
    ctx = PassContext(plan_spec="FSS")
    gm = run_passes(fx.symbolic_trace(three_layers), ctx, pipeline(ctx))
    assert ctx.counters["forward_indices.shared_topk"] == 2
    assert ctx.counters["detect.indexers"] == 3 and ctx.counters["bind_plan.full"] == 1
    removed = sum(len(s.removed) for s in ctx.stats)
    assert removed == sum(n for key, n in ctx.counters.items() if key.endswith(".nodes_removed")) > 0
    assert ctx.stats[-1].nodes == len(gm.graph.nodes)
    assert all(n > 0 for n in ctx.counters.values())  # no zero entries
    assert {key: dynamo[key] - before.get(key, 0) for key in ctx.counters} == dict(ctx.counters)


def test_a_pass_that_breaks_the_graph_is_named():
    def reorder_output_first(gm, ctx):  # a use before its definition: invalid
        last = list(gm.graph.nodes)[-2]
        list(gm.graph.nodes)[0].prepend(gm.graph.call_function(torch.neg, (last,)))
        return gm

    with pytest.raises(RuntimeError) as info:
        run_passes(fx.symbolic_trace(three_layers), PassContext(), [reorder_output_first])
    assert "invalid after pass 'reorder_output_first'" in "".join(getattr(info.value, "__notes__", []))


def test_a_pass_that_stops_ends_the_pipeline():
    ran = []

    def stop(gm, ctx):
        ctx.stopped = "nothing to do"
        return gm

    def after(gm, ctx):
        ran.append(True)
        return gm

    ctx = PassContext()
    run_passes(fx.symbolic_trace(three_layers), ctx, [stop, after])
    assert ran == [] and [s.name for s in ctx.stats] == ["stop"]


def test_rewrite_leaves_its_input_alone():
    gm = fx.symbolic_trace(three_layers)
    code, nodes = gm.code, [n.name for n in gm.graph.nodes]
    result = rewrite(gm, "FSS")
    assert result.gm is not gm and gm.code == code and [n.name for n in gm.graph.nodes] == nodes
    assert result.counters["forward_indices.shared_topk"] == 2
    assert {r.name for r in result.removed} >= {"topk_1", "topk_2"}
