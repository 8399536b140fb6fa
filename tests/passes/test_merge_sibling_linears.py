"""Bias-free linears of one few-token input become one ic::multi_linear call (passes/merge_sibling_linears.py,
CPU reference here): HF GLM-DSA decode graphs group q_a / kv_a / the indexer's wk (F layers), q_b / the
indexer's wq_b, the dense MLP's gate / up; prefill graphs, linears with a bias and symbolic shapes are
left alone; prefill and 8 decode steps equal HF's own plan."""

import pytest
import torch
from torch import nn

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes.merge_sibling_linears import lowered_multi_linear

pytest.importorskip("transformers")


def _compiled(model, lowering="eager", **options):
    torch._dynamo.reset()
    last_results.clear()
    return torch.compile(model, backend="indexcache",
                         options={"plan": "FSFS", "lowering": lowering, "kernels": True, **options})


def _logits_gap(want_model, got_model, steps=8, dynamic=None):
    ids, more = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=steps, seed=5)
    want = tiny_models.prefill_and_decode(want_model, ids, more)[0]
    got = tiny_models.prefill_and_decode(got_model, ids, more)[0]
    return max((w.float() - g.float()).abs().max().item() for w, g in zip(want, got))


def _groups(result):
    return [sorted(path.rsplit(".", 1)[-1] for path in group) for group in result.kernels.linears_merged]


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_hf_decode_groups(lowering):
    model = tiny_models.glm()
    assert _logits_gap(tiny_models.glm_with_plan(model, "FSFS"), _compiled(model, lowering)) < 1e-4
    results = [r for r in last_results if r.changed]
    prefill = [r for r in results if not r.kernels.linears_merged]
    decode = [r for r in results if r.kernels.linears_merged]
    assert len(prefill) == 1 and decode  # 20 prompt tokens: cuBLAS keeps the prefill's GEMMs
    f_layer = [["kv_a_proj_with_mqa", "q_a_proj", "wk"], ["q_b_proj", "wq_b"]]
    for result in decode:
        # layer 0 (F, dense MLP), 1 (S), 2 (F), 3 (S): the S layers have no indexer left to merge
        assert _groups(result) == [*f_layer, ["gate_proj", "up_proj"], ["kv_a_proj_with_mqa", "q_a_proj"],
                                   *f_layer, ["kv_a_proj_with_mqa", "q_a_proj"]], _groups(result)
        calls = [n for n in result.gm.graph.nodes if n.target is lowered_multi_linear]
        assert len(calls) == 7
        assert not any(n.op == "call_function" and getattr(n.target, "__name__", "") == "linear"
                       and n.args[0] is call.args[0] for call in calls for n in result.gm.graph.nodes)


def test_option_off_and_bias_left_alone():
    """merge_linears=False keeps every linear; a linear with a bias is never merged (the op has none)."""
    model = tiny_models.glm()
    _logits_gap(model, _compiled(model, merge_linears=False), steps=1)
    assert not any(r.kernels.linears_merged for r in last_results)
    oracle = tiny_models.glm_with_plan(model, "FSFS")
    for mine, theirs in zip(model.model.layers, oracle.model.layers):
        bias = nn.Parameter(0.1 * torch.randn(mine.self_attn.kv_a_proj_with_mqa.out_features))
        mine.self_attn.kv_a_proj_with_mqa.bias = theirs.self_attn.kv_a_proj_with_mqa.bias = bias
    assert _logits_gap(oracle, _compiled(model), steps=2) < 1e-4
    decode = [r for r in last_results if r.kernels.linears_merged]
    assert decode and all("kv_a_proj_with_mqa" not in path for r in decode for g in r.kernels.linears_merged
                          for path in g)


def test_symbolic_rows_left_alone():
    """dynamic=True: the token count is symbolic; the op is for static decode graphs."""
    model = tiny_models.glm()
    torch._dynamo.reset()
    last_results.clear()
    options = {"plan": "FSFS", "lowering": "eager", "kernels": True}
    run = torch.compile(model, backend="indexcache", dynamic=True, options=options)
    assert _logits_gap(tiny_models.glm_with_plan(model, "FSFS"), run, steps=2) < 1e-4
    assert last_results and not any(r.kernels.linears_merged for r in last_results)
