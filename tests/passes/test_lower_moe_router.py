"""Router tails lowered to ic::moe_route (CPU reference here; the Triton kernel in the interpreter in
tests/kernels/test_moe_router.py): HF's GLM-DSA router (one group) and DeepSeek-V3.2's (group-limited)
in prefill and decode graphs still equal the model; a softmax router stays as written (the option off:
tests/passes/test_drop_trivial_topk.py)."""

import pytest
import torch
from torch import nn

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes.graph_ops import op_name
from ic_compile.passes.fold_moe_route import lowered_moe_route_experts
from ic_compile.passes.lower_moe_router import lowered_moe_route
from ic_compile.reference import shared_indexer_hooks

pytest.importorskip("transformers")

ROUTERS = [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]  # layer 0 is dense


def compiled(model, plan, lowering="eager", **options):
    torch._dynamo.reset()
    last_results.clear()
    return torch.compile(model, backend="indexcache",
                         options={"plan": plan, "lowering": lowering, "kernels": True, **options})


def _max_error(want, got):
    return max((w.float() - g.float()).abs().max().item() for w, g in zip(want, got))


def _route_settings(gm):
    """(top_k, n_group, topk_group) of each lowered router, folded into the experts call or not
    (passes/fold_moe_route.py: in the decode graphs, whose experts are lowered too)."""
    return [n.args[2:5] if n.target is lowered_moe_route else n.args[3:6] for n in gm.graph.nodes
            if n.target in (lowered_moe_route, lowered_moe_route_experts)]


def _topk_left_in_routers(gm):
    return [n.name for n in gm.graph.nodes if op_name(n) == "topk" and ".mlp.gate" in str(n.meta.get("nn_module_stack"))]


def test_hf_glm_router_lowered():
    """GLM-DSA (n_group = 1): every MoE layer's router tail is one op, no top-k left in the routers,
    prefill and 8 decode steps equal HF's own plan."""
    model = tiny_models.with_random_router_bias(tiny_models.glm())
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=8, seed=5)
    oracle = tiny_models.with_random_router_bias(tiny_models.glm_with_plan(model, "FSFS"))
    want = tiny_models.prefill_and_decode(oracle, ids, steps)[0]
    got = tiny_models.prefill_and_decode(compiled(model, "FSFS", "inductor"), ids, steps)[0]
    assert _max_error(want, got) < 1e-4
    changed = [r for r in last_results if r.changed]
    assert changed
    for result in changed:
        assert result.kernels.moe_router_lowered == ROUTERS and not result.kernels.moe_router_skipped
        assert len(_route_settings(result.gm)) == 3
        assert not _topk_left_in_routers(result.gm)


def test_hf_deepseek_v32_group_limited_router_lowered():
    """DeepSeek-V3.2 with 16 experts in 4 groups, 2 kept: the group pick runs in the op; prefill and 8
    decode steps equal the hooks oracle (the model with the plan applied by forward hooks)."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    from ic_compile.tools.models import HF_TINY
    torch.manual_seed(0)
    config = DeepseekV32Config(**{**HF_TINY, "n_routed_experts": 16}, n_group=4, topk_group=2)
    model = tiny_models.with_random_router_bias(DeepseekV32ForCausalLM(config).eval())
    ids, steps = tiny_models.random_ids(seq=12), tiny_models.random_ids(seq=8, seed=3)
    with shared_indexer_hooks(model, "FSFS"):
        want, _ = tiny_models.prefill_and_decode(model, ids, steps)
    got, _ = tiny_models.prefill_and_decode(compiled(model, "FSFS"), ids, steps)
    assert _max_error(want, got) < 1e-4
    for result in (r for r in last_results if r.changed):
        assert result.kernels.moe_router_lowered == ROUTERS, result.kernels.moe_router_skipped
        assert set(_route_settings(result.gm)) == {(2, 4, 2)}  # top_k, n_group, topk_group read from the router's graph


class SoftmaxRouter(nn.Module):
    """Qwen / Mixtral style: softmax over the experts, then the top-k (no bias, no groups)."""

    def __init__(self, experts=8, hidden=16, k=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden))
        self.k = k

    def forward(self, x):
        probs = nn.functional.linear(x, self.weight).softmax(-1)
        weights, ids = probs.topk(self.k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids


class SigmoidRouter(SoftmaxRouter):
    """DeepSeek-V3's routing without groups or bias, scaled by 2.5: the op's."""

    def forward(self, x):
        scores = nn.functional.linear(x, self.weight).sigmoid()
        ids = scores.topk(self.k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        return weights / (weights.sum(-1, keepdim=True) + 1e-20) * 2.5, ids


def test_softmax_router_left_alone_and_sigmoid_router_matched():
    """The pass itself on a traced router module: the sigmoid one (scale read from its constant) is
    lowered and gives the module's pairs; the softmax one is left as written with the reason."""
    from ic_compile.passes.lower_indexer import LoweringReport
    from ic_compile.passes.lower_moe_router import lower_moe_router
    from ic_compile.passes.manager import PassContext

    for router, lowered in ((SigmoidRouter(), True), (SoftmaxRouter(), False)):
        gm, inputs = _dynamo_graph(router)
        ctx = PassContext(kernels=True, input_values=inputs)
        ctx.report = LoweringReport()
        x = torch.randn(3, 16)
        want_w, want_ids = router(x)
        lower_moe_router(gm, ctx)
        gm.recompile()
        assert bool(ctx.report.moe_router_lowered) == lowered, ctx.report.moe_router_skipped
        if not lowered:
            assert "another routing" in next(iter(ctx.report.moe_router_skipped.values()))
            continue
        got_w, got_ids = gm(*[inputs[name] if name in inputs else x for name in _placeholders(gm)])
        order, got_order = want_ids.argsort(-1), got_ids.argsort(-1)
        assert torch.equal(want_ids.gather(-1, order), got_ids.gather(-1, got_order))
        torch.testing.assert_close(want_w.gather(-1, order), got_w.gather(-1, got_order))


def _dynamo_graph(module):
    """Dynamo's graph of module(x) for x [3, 16], and its parameters' values by placeholder name."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append((graph_module, example_inputs))
        return graph_module.forward

    class Holder(nn.Module):  # the router as a submodule: its nodes carry its module path
        def __init__(self):
            super().__init__()
            self.gate = module

        def forward(self, x):
            return self.gate(x)

    torch._dynamo.reset()
    torch.compile(Holder(), backend=backend)(torch.randn(3, 16))
    gm, example_inputs = graphs[0]
    params = list(module.parameters())
    return gm, {name: value for name, value in zip(_placeholders(gm), example_inputs)
                if any(value is p for p in params)}


def _placeholders(gm):
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]
