"""A lowered router read only by one lowered experts call routes inside that call (passes/fold_moe_route.py):
HF's GLM-DSA decode graphs hold no ic::moe_route after it, prefill and 8 decode steps still equal HF's
own plan; a graph whose weights are rounded to bf16 before the experts, or whose routing is read
twice, keeps both calls. The kernel's routing in the interpreter: tests/kernels/test_moe_experts.py."""

import operator

import pytest
import torch
from torch import fx

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes import fold_moe_route as fold_module
from ic_compile.passes.fold_moe_route import fold_moe_route, lowered_moe_route_experts
from ic_compile.passes.lower_indexer import LoweringReport
from ic_compile.passes.lower_moe_experts import lowered_moe_experts
from ic_compile.passes.lower_moe_router import lowered_moe_route
from ic_compile.passes.manager import PassContext

MOE_LAYERS = [f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)]  # layer 0 is dense
T, H, E, I, K = 1, 16, 8, 12, 2


def _compiled(model, fold=True, lowering="inductor"):
    torch._dynamo.reset()
    last_results.clear()
    fold_module._FOLDS = fold
    return torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": lowering, "kernels": True})


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    fold_module._FOLDS = True


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_hf_glm_decode_routes_inside_the_experts_call(lowering):
    pytest.importorskip("transformers")
    model = tiny_models.with_random_router_bias(tiny_models.glm())
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=8, seed=5)
    oracle = tiny_models.with_random_router_bias(tiny_models.glm_with_plan(model, "FSFS"))
    want = tiny_models.prefill_and_decode(oracle, ids, steps)[0]
    got = tiny_models.prefill_and_decode(_compiled(model, lowering=lowering), ids, steps)[0]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    decode = [r for r in last_results if r.changed and r.kernels.moe_lowered]
    assert decode, "no decode graph with the experts op"
    for result in decode:
        assert sorted(result.kernels.moe_route_folded) == MOE_LAYERS
        targets = [n.target for n in result.gm.graph.nodes]
        assert targets.count(lowered_moe_route_experts) == 3
        assert lowered_moe_route not in targets and lowered_moe_experts not in targets


def test_switch_off_keeps_both_calls():
    pytest.importorskip("transformers")
    model = tiny_models.with_random_router_bias(tiny_models.glm())
    tiny_models.prefill_and_decode(_compiled(model, fold=False, lowering="eager"), tiny_models.random_ids(seq=20),
                                   tiny_models.random_ids(seq=2, seed=5))
    decode = [r for r in last_results if r.changed and r.kernels.moe_lowered]
    assert decode and all(not r.kernels.moe_route_folded for r in decode)
    assert all(lowered_moe_route in [n.target for n in r.gm.graph.nodes] for r in decode)


def _routed_graph(weights_dtype=torch.float32, second_reader=False) -> fx.GraphModule:
    """hidden, logits, bias, gate_up, down -> the two lowered calls as lower_moe_router leaves them."""
    graph = fx.Graph()
    names = ("hidden", "logits", "bias", "gate_up", "down")
    hidden, logits, bias, gate_up, down = (graph.placeholder(name) for name in names)
    route = graph.call_function(lowered_moe_route, (logits, bias, K, 1, 1, True, 2.5))
    weights = graph.call_method("to", (graph.call_function(operator.getitem, (route, 0)), weights_dtype))
    ids = graph.call_method("to", (graph.call_function(operator.getitem, (route, 1)), torch.int64))
    out = graph.call_function(lowered_moe_experts, (hidden, ids, weights, gate_up, down))
    graph.output((out, weights) if second_reader else out)
    return fx.GraphModule(torch.nn.Module(), graph)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(T, H, generator=generator), torch.randn(T, E, generator=generator),
            0.3 * torch.randn(E, generator=generator), 0.2 * torch.randn(E, 2 * I, H, generator=generator),
            0.2 * torch.randn(E, H, I, generator=generator))


def _fold(gm):
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
    ctx = PassContext(kernels=True)
    ctx.report = LoweringReport()
    fold_moe_route(gm, ctx)
    gm.recompile()
    return ctx


@pytest.mark.parametrize("case", ["folded", "bf16_weights", "second_reader"])
def test_only_a_value_keeping_sole_route_is_folded(case):
    """fp32 weights read by the experts alone: one call, equal output (reference ops on CPU); weights
    rounded to bf16 first, or also returned: both calls stay."""
    gm = _routed_graph(torch.bfloat16 if case == "bf16_weights" else torch.float32, case == "second_reader")
    inputs = _inputs()
    want = gm(*inputs)
    ctx = _fold(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert (lowered_moe_route_experts in targets) == (case == "folded")
    assert (lowered_moe_route in targets) == (case != "folded")
    assert ctx.counters["fold_moe_route.folded"] == (case == "folded")
    torch.testing.assert_close(gm(*inputs), want, rtol=0, atol=0)
