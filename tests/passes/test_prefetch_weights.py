"""The weight read right after each absorbed sparse-MLA call is handed to it for L2 prefetching
(passes/prefetch_weights.py): in HF's GLM-DSA graphs each call carries its own layer's o_proj weight,
prefill and 8 decode steps still equal HF's own plan (eager and Inductor), and a call whose output
has a second reader gets nothing. The kernel side: tests/kernels/test_sparse_attention.py (prefetch)
and test_sm90_compile.py (the prefetch programs' code)."""

import re

import pytest
import torch
from torch import fx

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes import prefetch_weights as prefetch_module
from ic_compile.passes.lower_sparse_attention import lowered_absorbed_mla
from ic_compile.passes.manager import PassContext
from ic_compile.passes.prefetch_weights import prefetch_weights


@pytest.fixture
def prefetching(monkeypatch):
    monkeypatch.setattr(prefetch_module, "_PREFETCHES", True)


def _compiled(model, lowering):
    torch._dynamo.reset()
    last_results.clear()
    return torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": lowering, "kernels": True})


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_hf_glm_calls_get_their_layers_o_proj(prefetching, lowering):
    pytest.importorskip("transformers")
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=8, seed=5)
    want = tiny_models.prefill_and_decode(tiny_models.glm_with_plan(model, "FSFS"), ids, steps)[0]
    got = tiny_models.prefill_and_decode(_compiled(model, lowering), ids, steps)[0]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    graphs = [r for r in last_results if r.changed]
    assert len(graphs) >= 2  # prefill and decode
    for result in graphs:
        calls = [n for n in result.gm.graph.nodes if n.target is lowered_absorbed_mla]
        assert len(calls) == 4
        for layer, call in enumerate(calls):
            (weight,) = call.kwargs["prefetch"]
            assert re.search(rf"layers_modules_{layer}_modules_self_attn_modules_o_proj_parameters_weight", weight.name)


def test_switch_off_leaves_the_calls_alone():
    pytest.importorskip("transformers")
    tiny_models.prefill_and_decode(_compiled(tiny_models.glm(), "eager"), tiny_models.random_ids(seq=20),
                                   tiny_models.random_ids(seq=1, seed=5))
    calls = [n for r in last_results for n in r.gm.graph.nodes if n.target is lowered_absorbed_mla]
    assert calls and all("prefetch" not in call.kwargs for call in calls)


def _attention_graph(second_reader: bool) -> fx.GraphModule:
    """An absorbed call whose output is reshaped into o_proj's linear (and, optionally, also returned)."""
    graph = fx.Graph()
    q, latent, rope, kv_b, idx = (graph.placeholder(name) for name in ("q", "latent", "rope", "kv_b", "idx"))
    o_proj = graph.placeholder("l_self_modules_o_proj_parameters_weight_")
    out = graph.call_function(lowered_absorbed_mla, (q, latent, rope, kv_b, idx, 0.5, 8))
    rows = graph.call_method("reshape", (graph.call_method("transpose", (out, 1, 2)), 2, 1, -1))
    projected = graph.call_function(torch.nn.functional.linear, (rows, o_proj))
    graph.output((projected, out) if second_reader else projected)
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("second_reader", [False, True])
def test_only_a_sole_reader_through_layout_ops_is_prefetched(prefetching, second_reader):
    gm = _attention_graph(second_reader)
    ctx = PassContext(kernels=True)
    prefetch_weights(gm, ctx)
    (call,) = [n for n in gm.graph.nodes if n.target is lowered_absorbed_mla]
    if second_reader:
        assert "prefetch" not in call.kwargs and not ctx.counters["prefetch_weights.calls"]
    else:
        assert [w.name for w in call.kwargs["prefetch"]] == ["l_self_modules_o_proj_parameters_weight_"]
        assert ctx.counters["prefetch_weights.calls"] == 1
