"""Few-token MoE experts lowered to ic::moe_experts (CPU reference here): decode graphs of HF's GLM-DSA
with each of HF's experts implementations, and hand-written experts modules, still equal the model
(HF's own plan as the oracle); experts that compute anything else, prefill graphs and graphs whose
weights are unknown are left alone, with the reason in the report."""

import inspect

import pytest
import torch
from torch import nn

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes.fold_moe_route import lowered_moe_route_experts
from ic_compile.passes.lower_moe_experts import _MAX_TOKENS, lowered_moe_experts
from ic_compile.rewrite import rewrite

pytest.importorskip("transformers")

MOE_LAYERS = [f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)]  # layer 0 is dense


def compiled(model, plan="FSFS", lowering="eager"):
    torch._dynamo.reset()
    last_results.clear()
    return torch.compile(model, backend="indexcache", options={"plan": plan, "lowering": lowering, "kernels": True})


def _prefill_then_decode(run, ids, steps):
    return tiny_models.prefill_and_decode(run, ids, steps)[0]


def _assert_logits_close(want, got, tolerance):
    for step, (w, g) in enumerate(zip(want, got)):
        assert (w.float() - g.float()).abs().max().item() < tolerance, f"step {step}"


def _decode_results():
    """The rewrite results of the graphs with few-token experts (decode), and of the others (prefill)."""
    results = [r for r in last_results if r.changed]
    prefill = [r for r in results if any("tokens (the op is for at most" in why for why in r.kernels.moe_skipped.values())]
    return [r for r in results if r not in prefill], prefill


def _experts_calls(gm):
    """The experts op's calls, with the router folded in (passes/fold_moe_route.py) or not."""
    return [n for n in gm.graph.nodes if n.target in (lowered_moe_experts, lowered_moe_route_experts)]


def _swiglu_limit(call):
    return inspect.signature(call.target).bind(*call.args, **call.kwargs).arguments.get("swiglu_limit")


def _left_of_experts(gm):
    """Nodes traced under an experts module other than the op and the view / cast of its output."""
    ours = set(_experts_calls(gm))
    ours |= {u for n in ours for u in n.users}
    ours |= {u for n in ours for u in n.users}
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n not in ours
            and ".mlp.experts" in str(n.meta.get("nn_module_stack", ""))]


def _left_of_shared(gm):
    """Ops traced under a shared expert (only its weights should be left, read by the op)."""
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and ".mlp.shared_experts" in str(n.meta.get("nn_module_stack", ""))]


@pytest.mark.parametrize("implementation,lowering", [("grouped_mm", "eager"), ("batched_mm", "inductor")])
def test_hf_decode_experts_lowered(implementation, lowering):
    """HF's experts (grouped_mm: sort, histc, grouped GEMMs; batched_mm: gathered weights, bmm) in
    decode graphs become one op per MoE layer, with nothing of theirs left; prefill (20 tokens) keeps
    HF's; prefill and 8 decode steps equal HF's own plan."""
    model = tiny_models.glm()
    model.config._experts_implementation = implementation
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=8, seed=5)
    want = _prefill_then_decode(tiny_models.glm_with_plan(model, "FSFS"), ids, steps)
    got = _prefill_then_decode(compiled(model, "FSFS", lowering), ids, steps)
    _assert_logits_close(want, got, 1e-4)
    decode, prefill = _decode_results()
    assert decode and prefill
    for result in decode:
        assert result.kernels.moe_lowered == MOE_LAYERS and not result.kernels.moe_skipped
        assert result.kernels.moe_shared_folded == MOE_LAYERS and not result.kernels.moe_shared_skipped
        left = _left_of_experts(result.gm) + _left_of_shared(result.gm)
        assert not left, left
        assert len(_experts_calls(result.gm)) == 3
    for result in prefill:
        assert not result.kernels.moe_lowered
        assert all("40 tokens" in why for why in result.kernels.moe_skipped.values()), result.kernels.moe_skipped


def test_hf_bf16_decode_with_static_cache():
    """bf16 (the op accumulates in fp32 where HF rounds each expert's output to bf16: close, not equal),
    batch 1, a StaticCache: the decode graphs' experts are lowered and logits stay close to HF's plan."""
    from transformers import StaticCache
    model = tiny_models.glm(dtype=torch.bfloat16)
    ids, steps = tiny_models.random_ids(batch=1, seq=20), tiny_models.random_ids(batch=1, seq=8, seed=5)
    oracle = tiny_models.glm_with_plan(model, "FSSS")
    run = compiled(model, "FSSS", "eager")  # Inductor: test_hf_decode_experts_lowered
    logits = []
    for net in (oracle, run):
        cache, out = StaticCache(config=model.config, max_cache_len=32), []
        with torch.no_grad():
            for t, tokens in enumerate([ids] + [steps[:, i:i + 1] for i in range(steps.shape[1])]):
                position = torch.arange(20) if t == 0 else torch.tensor([19 + t])
                out.append(net(tokens, cache=cache, use_cache=True, cache_position=position).logits[:, -1])
        logits.append(out)
    _assert_logits_close(*logits, 5e-2)
    decode, _ = _decode_results()
    assert decode and all(r.kernels.moe_lowered == MOE_LAYERS == r.kernels.moe_shared_folded for r in decode)


def test_experts_lowered_in_a_fragment_without_indexers(monkeypatch):
    """A graph break at the top of each MoE block (host-side dispatch counts, as expert dispatch code
    does): the MoE runs in frames of its own, which hold no indexer and which the plan leaves alone.
    With kernels their decode graphs still get the experts op (before, only graphs holding an
    indexer did); prefill and 8 decode steps equal HF's own plan."""
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf
    tiny_models.break_graph_in_moe(monkeypatch, hf.GlmMoeDsaMoE)
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=8, seed=5)
    want = _prefill_then_decode(tiny_models.glm_with_plan(model, "FSFS"), ids, steps)
    with torch._dynamo.config.patch(recompile_limit=64):
        got = _prefill_then_decode(compiled(model, "FSFS"), ids, steps)
    _assert_logits_close(want, got, 1e-4)
    moe_only = [r for r in last_results if r.passes_through and r.kernels.moe_lowered]
    assert moe_only, "no indexer-free fragment had its experts lowered"
    for result in moe_only:
        assert not result.changed and result.gm is not result.original  # the plan's flag, not the lowering's
        assert len(_experts_calls(result.gm)) == len(result.kernels.moe_lowered)
        assert not _left_of_experts(result.gm)


class GatheredExperts(nn.Module):
    """Research-code experts over HF's weights: each token's k experts gathered, einsums.
    variant "interleaved": gate and up rows alternate (gpt-oss); "clamped": DeepSeek-V4's swiglu_limit;
    "uneven": gate and up capped at different bounds."""

    def __init__(self, experts, variant="plain"):
        super().__init__()
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        self.variant = variant

    def forward(self, hidden, ids, weights):  # [T,H], [T,k], [T,k]
        gate_up = torch.einsum("th,tkoh->tko", hidden, self.gate_up_proj[ids])  # [T,k,2I]
        if self.variant == "interleaved":
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        else:
            gate, up = gate_up.chunk(2, dim=-1)
        if self.variant == "clamped":  # caps the model's own activations never reach here
            gate, up = gate.clamp(max=10.0), up.clamp(min=-10.0, max=10.0)
        if self.variant == "uneven":
            gate, up = gate.clamp(max=10.0), up.clamp(min=-5.0, max=5.0)
        inner = nn.functional.silu(gate) * up  # [T,k,I]
        out = torch.einsum("tki,tkhi->tkh", inner, self.down_proj[ids])  # [T,k,H]
        return (out * weights.unsqueeze(-1).to(out.dtype)).sum(1)


def _with_experts(model, variant):
    for layer in model.model.layers[1:]:
        layer.mlp.experts = GatheredExperts(layer.mlp.experts, variant)
    return model


@pytest.mark.parametrize("variant", ["plain", "clamped", "interleaved", "uneven"])
def test_hand_written_experts(variant):
    """Matched by what the module computes: the same MoE written with gathers and einsums is lowered,
    also with DeepSeek-V4's cap (one bound: the op's swiglu_limit); with interleaved gate/up rows or
    caps of two bounds (other functions of the same weights; the caps only at large activations) it
    is left alone, saying so, and the answer is the model's either way."""
    model = _with_experts(tiny_models.glm(), variant)
    oracle = _with_experts(tiny_models.glm_with_plan(model, "FSFS"), variant)
    for mine, theirs in zip(model.model.layers[1:], oracle.model.layers[1:]):
        theirs.mlp.experts.gate_up_proj, theirs.mlp.experts.down_proj = mine.mlp.experts.gate_up_proj, mine.mlp.experts.down_proj
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=8, seed=5)
    want = _prefill_then_decode(oracle, ids, steps)
    got = _prefill_then_decode(compiled(model), ids, steps)
    _assert_logits_close(want, got, 1e-4)
    decode, _ = _decode_results()
    assert decode
    for result in decode:
        if variant in ("plain", "clamped"):
            assert result.kernels.moe_lowered == MOE_LAYERS
            limits = {_swiglu_limit(n) for n in _experts_calls(result.gm)}
            assert limits == {None if variant == "plain" else 10.0}
            # the op's limit is the shared expert's too: HF's unclamped shared MLP stays as written
            folded = MOE_LAYERS if variant == "plain" else []
            assert result.kernels.moe_shared_folded == folded, result.kernels.moe_shared_skipped
            continue
        assert not result.kernels.moe_lowered
        assert sorted(result.kernels.moe_skipped) == MOE_LAYERS
        reasons = result.kernels.moe_skipped.values()
        assert all("computes another function" in why for why in reasons)
        assert variant != "uneven" or all("scale 1000" in why for why in reasons), reasons


def test_other_activation_left_alone():
    """GELU experts are not the op's SiLU: the region check tells them apart."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**tiny_models.HF_TINY, hidden_act="gelu")).eval()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=2, seed=5)
    want = _prefill_then_decode(model, ids, steps)
    got = _prefill_then_decode(compiled(model, "FFFF"), ids, steps)
    _assert_logits_close(want, got, 1e-4)
    decode, _ = _decode_results()
    assert decode and all(not r.kernels.moe_lowered for r in decode)
    assert all("computes another function" in why for r in decode for why in r.kernels.moe_skipped.values())


def test_option_off_keeps_hf_experts():
    """options={"moe_experts": False}: the decode graph keeps HF's experts (the pass does not run)."""
    model = tiny_models.glm()
    torch._dynamo.reset()
    last_results.clear()
    options = {"plan": "FSFS", "lowering": "eager", "kernels": True, "moe_experts": False}
    with torch.no_grad():
        torch.compile(model, backend="indexcache", options=options)(tiny_models.random_ids(batch=1, seq=1), use_cache=False)
    (result,) = last_results
    assert not result.kernels.moe_lowered and not result.kernels.moe_skipped
    assert not _experts_calls(result.gm)


def test_symbolic_tokens_left_alone():
    """dynamic=True: the batch, hence the token count, is symbolic; the op is for static few-token
    graphs, so HF's experts stay (saying why) and the answer is HF's plan's."""
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=2, seed=5)
    want = _prefill_then_decode(tiny_models.glm_with_plan(model, "FSFS"), ids, steps)
    torch._dynamo.reset()
    last_results.clear()
    options = {"plan": "FSFS", "lowering": "eager", "kernels": True}
    got = _prefill_then_decode(torch.compile(model, backend="indexcache", dynamic=True, options=options), ids, steps)
    _assert_logits_close(want, got, 1e-4)
    results = [r for r in last_results if r.changed]
    assert results and all(not r.kernels.moe_lowered for r in results)
    assert all(why.startswith("symbolic token count") for r in results for why in r.kernels.moe_skipped.values())


def test_unknown_weights_left_alone():
    """`rewrite` on a graph without its example inputs cannot check the region: it is left as it is."""
    model = tiny_models.glm()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(tiny_models.random_ids(batch=1, seq=1), use_cache=False)
    result = rewrite(graphs[0], "FSFS", kernels=True)
    assert not result.kernels.moe_lowered
    assert sorted(result.kernels.moe_skipped) == MOE_LAYERS
    assert all("not known at compile time" in why for why in result.kernels.moe_skipped.values())


def test_lowered_op_matches_reference_shapes():
    """The lowering's reshapes: leading batch dims in, one row per token out."""
    torch.manual_seed(0)
    E, H, inner, k = 4, 8, 6, 2
    gate_up, down = torch.randn(E, 2 * inner, H), torch.randn(E, H, inner)
    hidden, ids, weights = torch.randn(1, _MAX_TOKENS, H), torch.randint(0, E, (1, _MAX_TOKENS, k)), torch.rand(1, _MAX_TOKENS, k)
    out = lowered_moe_experts(hidden, ids, weights, gate_up, down)
    want = torch.zeros(_MAX_TOKENS, H)
    for t in range(_MAX_TOKENS):
        for j in range(k):
            e = ids[0, t, j]
            gate, up = (gate_up[e] @ hidden[0, t]).chunk(2)
            want[t] += weights[0, t, j] * (down[e] @ (nn.functional.silu(gate) * up))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
