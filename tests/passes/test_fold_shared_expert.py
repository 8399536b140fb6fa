"""A shared expert added to the experts op's output is folded into the op (passes/fold_shared_expert.py):
HF's three linears (tests/passes/test_lower_moe_experts.py) and a stacked gate_up weight in either
order are folded; a shared MLP computing anything else, or whose output is read twice, is left as
written with the reason. Prefill and 8 decode steps equal HF's own plan either way."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes.lower_moe_experts import lowered_moe_experts

pytest.importorskip("transformers")

MOE_LAYERS = [f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)]  # layer 0 is dense


class StackedSharedExpert(nn.Module):
    """Research / engine style: gate and up rows stacked in one [2IS,H] weight, one linear, a chunk.
    variant "up_first": the up rows come first; "gelu": another activation; "scaled": the output
    halved; "clamped": the gate capped at a bound only large activations reach."""

    def __init__(self, mlp, variant):
        super().__init__()
        gate, up = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
        self.gate_up = nn.Parameter(torch.cat((up, gate) if variant == "up_first" else (gate, up)))
        self.down = nn.Parameter(mlp.down_proj.weight.detach().clone())
        self.variant = variant

    def forward(self, x):
        first, second = F.linear(x, self.gate_up).chunk(2, dim=-1)
        gate, up = (second, first) if self.variant == "up_first" else (first, second)
        if self.variant == "clamped":
            gate = gate.clamp(max=50.0)
        act = F.gelu(gate) if self.variant == "gelu" else F.silu(gate)
        out = F.linear(act * up, self.down)
        return 0.5 * out if self.variant == "scaled" else out


def _with_shared(model, variant):
    for layer in model.model.layers[1:]:
        layer.mlp.shared_experts = StackedSharedExpert(layer.mlp.shared_experts, variant)
    return model


def _compiled(model, lowering="eager"):
    torch._dynamo.reset()
    last_results.clear()
    return torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": lowering, "kernels": True})


def _decode_results():
    return [r for r in last_results if r.changed and r.kernels.moe_lowered]


def _logits_gap(want_model, got_model, steps=8):
    ids, more = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=steps, seed=5)
    want = tiny_models.prefill_and_decode(want_model, ids, more)[0]
    got = tiny_models.prefill_and_decode(got_model, ids, more)[0]
    return max((w.float() - g.float()).abs().max().item() for w, g in zip(want, got))


def _shared_ops_left(gm):
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and ".mlp.shared_experts" in str(n.meta.get("nn_module_stack", ""))]


@pytest.mark.parametrize("variant", ["stacked", "up_first", "gelu", "scaled", "clamped"])
def test_stacked_shared_expert(variant):
    base = tiny_models.glm()
    oracle = _with_shared(tiny_models.glm_with_plan(base, "FSFS"), variant)
    model = _with_shared(base, variant)
    lowering = "inductor" if variant == "stacked" else "eager"
    assert _logits_gap(oracle, _compiled(model, lowering)) < 1e-4
    decode = _decode_results()
    assert decode
    for result in decode:
        assert result.kernels.moe_lowered == MOE_LAYERS
        if variant in ("stacked", "up_first"):
            assert result.kernels.moe_shared_folded == MOE_LAYERS, result.kernels.moe_shared_skipped
            assert not _shared_ops_left(result.gm)
            ops = [n for n in result.gm.graph.nodes if n.target is lowered_moe_experts]
            assert all(len(n.args) == 9 for n in ops)  # the three shared weights (two row slices of gate_up)
            continue
        assert not result.kernels.moe_shared_folded and sorted(result.kernels.moe_shared_skipped) == MOE_LAYERS
        assert all("computes another function" in why for why in result.kernels.moe_shared_skipped.values())
        assert _shared_ops_left(result.gm)


def test_shared_output_read_twice_left_alone(monkeypatch):
    """The MoE block also reads the shared expert's output on its own: folding it would lose that
    value, so it stays as written."""
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf

    def forward(self, hidden_states):
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        routed = self.experts(hidden_states.view(-1, orig_shape[-1]), topk_indices, topk_weights).view(*orig_shape)
        shared = self.shared_experts(hidden_states)
        return routed + shared + 0.25 * shared

    base = tiny_models.glm()
    oracle = tiny_models.glm_with_plan(base, "FSFS")
    monkeypatch.setattr(hf.GlmMoeDsaMoE, "forward", forward)
    assert _logits_gap(oracle, _compiled(base), steps=2) < 1e-4
    decode = _decode_results()
    assert decode and all(not r.kernels.moe_shared_folded for r in decode)
    assert all("used elsewhere" in why for r in decode for why in r.kernels.moe_shared_skipped.values())


def test_shared_expert_reading_other_tokens_left_alone(monkeypatch):
    """A shared expert of other activations than the routed experts' (here the tokens doubled on the
    way in): the walk back from the add takes the doubling into the MLP, and the check on random
    tokens finds it is not the op's function."""
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf

    def forward(self, hidden_states):
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        routed = self.experts(hidden_states.view(-1, orig_shape[-1]), topk_indices, topk_weights).view(*orig_shape)
        return routed + self.shared_experts(2.0 * hidden_states)

    base = tiny_models.glm()
    monkeypatch.setattr(hf.GlmMoeDsaMoE, "forward", forward)
    oracle = tiny_models.glm_with_plan(base, "FSFS")
    assert _logits_gap(oracle, _compiled(base), steps=2) < 1e-4
    decode = _decode_results()
    assert decode and all(not r.kernels.moe_shared_folded for r in decode)
    assert all("computes another function" in why for r in decode for why in r.kernels.moe_shared_skipped.values())


def test_sum_of_flat_rows_folded(monkeypatch):
    """Written the other way round: the shared expert reads the experts' own [T,H] rows, and the sum
    is taken before the view back (the add reads the op's output directly): folded, same answer."""
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf

    def forward(self, hidden_states):
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        flat = hidden_states.view(-1, orig_shape[-1])
        return (self.shared_experts(flat) + self.experts(flat, topk_indices, topk_weights)).view(*orig_shape)

    base = tiny_models.glm()
    monkeypatch.setattr(hf.GlmMoeDsaMoE, "forward", forward)
    oracle = tiny_models.glm_with_plan(base, "FSFS")
    assert _logits_gap(oracle, _compiled(base), steps=2) < 1e-4
    decode = _decode_results()
    assert decode and all(r.kernels.moe_shared_folded == MOE_LAYERS for r in decode), \
        [r.kernels.moe_shared_skipped for r in decode]
    assert not any(_shared_ops_left(r.gm) for r in decode)
