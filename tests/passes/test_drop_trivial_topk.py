"""A top-1 over a size-1 dim is replaced by what it computes: in HF's group-limited router with one
expert group (GLM-4.7-Flash's n_group = topk_group = 1) two of its three topk go, the answer stays."""

import pytest
import torch

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes.drop_trivial_topk import drop_trivial_topk
from ic_compile.passes.graph_ops import op_name
from ic_compile.passes.manager import PassContext

pytest.importorskip("transformers")


def _dynamo_graph(fn, *args, dynamic=False):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=dynamic)(*args)
    return graphs[0]  # (graph, its example inputs: a symbolic size comes first under dynamic=True)


def _topks(gm):
    return [n for n in gm.graph.nodes if op_name(n) == "topk"]


def router_like(scores):  # [T, G=1]
    group = torch.topk(scores, k=1, dim=-1, sorted=False)[1]  # always 0
    best = scores.topk(1, dim=-1).values  # the scores themselves
    best += 1  # in place on the values: must not write into `scores`
    mask = torch.zeros_like(scores).scatter_(1, group, 1)
    return mask, best, scores * 2


@pytest.mark.parametrize("dynamic", [False, True])
def test_top1_of_one_replaced_exactly(dynamic):
    scores = torch.randn(5, 1)
    gm, inputs = _dynamo_graph(router_like, scores, dynamic=dynamic)
    ctx = PassContext()
    drop_trivial_topk(gm, ctx)
    gm.recompile()
    assert ctx.counters["drop_trivial_topk.replaced"] == 2 and not _topks(gm)
    args = [scores.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    for got, want in zip(gm(*args), router_like(scores.clone())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_other_topk_kept():
    """k < size, a size-1 dim that is not the one reduced, k = 1 of several: all stay."""
    def other(x):  # [4, 1, 3]
        return torch.topk(x, 1, dim=-1)[1], x.topk(1, dim=0).indices, x.topk(2, dim=2)[0]
    gm, _ = _dynamo_graph(other, torch.randn(4, 1, 3))
    ctx = PassContext()
    drop_trivial_topk(gm, ctx)
    assert len(_topks(gm)) == 3 and not ctx.counters["drop_trivial_topk.replaced"]


def test_hf_router_keeps_one_topk():
    """HF GLM-DSA with kernels=True and the router op off (moe_router=False; with it the whole tail is
    ic::moe_route, tests/passes/test_lower_moe_router.py): in each MoE router (n_group = topk_group =
    1) the group top-1 is replaced, and Inductor's code keeps only the top-k of experts (the top-2 per
    group fed only the group scores); prefill and 8 decode steps equal HF's own plan."""
    from torch._inductor.utils import run_and_get_code
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=8, seed=5)
    want, _ = tiny_models.prefill_and_decode(tiny_models.glm_with_plan(model, "FSFS"), ids, steps)
    torch._dynamo.reset()
    last_results.clear()
    run = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": "inductor", "kernels": True,
                                                                 "moe_router": False})
    (got, _), codes = run_and_get_code(tiny_models.prefill_and_decode, run, ids, steps)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4
    results = [r for r in last_results if r.changed]
    assert results and all(r.counters["drop_trivial_topk.replaced"] == 3 for r in results)
    assert not any(r.kernels.moe_router_lowered for r in results)  # moe_router=False: HF's router stays
    assert len(codes) == len(results)  # prefill, decode
    assert all(code.count("torch.ops.aten.topk.default(") == 3 for code in codes)  # one per MoE layer (was 9)
