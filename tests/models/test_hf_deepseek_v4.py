"""HF DeepSeek-V4 (compressed sparse attention): lightning indexers only in its CSA layers, HCA
layers between them. No native plan: the oracle is forward hooks (S indexer output := last F's)."""

import os

import pytest
import torch

import dsa_styles
import ic_compile
from ic_compile.passes.graph_ops import op_name
from ic_compile.reference import shared_indexer_hooks
from marks import needs_triton

pytest.importorskip("transformers")

SLOW = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("IC_RUN_SLOW") != "1", reason="set IC_RUN_SLOW=1")]
PLAN = "FSS"  # one role per CSA layer (layers 0, 2, 3); layer 1 is HCA, without an indexer
PROMPT = 14  # not a multiple of the CSA compress rate (4): the decode steps close a window at 16


def deepseek_v4(seed=0):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    config = DeepseekV4Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32, q_lora_rank=32,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, num_hash_layers=0,
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention", "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        sliding_window=8, o_groups=2, o_lora_rank=16, hc_mult=2, partial_rotary_factor=0.25,
        index_n_heads=8, index_head_dim=16, index_topk=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return DeepseekV4ForCausalLM(config).eval()


def ids(seq=PROMPT, seed=1):
    return torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(run, config, prompt, steps):
    from transformers import DynamicCache
    cache = DynamicCache(config=config)
    with torch.no_grad():
        logits = [run(prompt, cache=cache, use_cache=True).logits]
        for t in range(steps.shape[1]):
            logits.append(run(steps[:, t:t + 1], cache=cache, use_cache=True).logits)
    return logits


def compiled(model, lowering, dynamic=False):
    return torch.compile(model, backend="indexcache", dynamic=dynamic, options={"plan": PLAN, "lowering": lowering})


@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=SLOW)])  # Inductor: ~1 min CPU
def test_prefill_matches_hooks(lowering, one_thread):
    model, prompt = deepseek_v4(), ids(16)
    with torch.no_grad(), shared_indexer_hooks(model, PLAN):
        want = model(prompt, use_cache=False).logits
    ic_compile.backend.last_results.clear()
    with torch.no_grad():
        full = model(prompt, use_cache=False).logits
        got = compiled(model, lowering)(prompt, use_cache=False).logits
    assert (full - want).abs().max().item() > 1e-3  # the plan changes the answer: the test can fail
    assert (got - want).abs().max().item() < 1e-4
    result = ic_compile.backend.last_results[-1]  # indexers only in the CSA layers, HCA layer 1 skipped
    assert [(b.match.layer, b.role, b.source.layer) for b in result.bindings] == [(0, "F", 0), (2, "S", 0), (3, "S", 0)]


def test_static_decode_matches_hooks_and_keeps_no_s_indexer_op(one_thread):
    """Prefill + 3 decode steps (a CSA window closes on the second), static shapes: one graph per
    step. Every S layer's indexer, its compressor state included, is gone from every graph."""
    model, prompt, steps = deepseek_v4(), ids(), ids(3, seed=2)
    with shared_indexer_hooks(model, PLAN):
        want = prefill_and_decode(model, model.config, prompt, steps)
    ic_compile.backend.last_results.clear()
    got = prefill_and_decode(compiled(model, "eager"), model.config, prompt, steps)
    for step, (w, g) in enumerate(zip(want, got)):
        assert (w - g).abs().max().item() < 1e-4, f"step {step} (0 = prefill) differs"
    paths = dsa_styles.indexer_paths(model)
    assert len(ic_compile.backend.last_results) == 4
    for result in ic_compile.backend.last_results:
        assert [len(dsa_styles.indexer_ops(result.original, p)) > 40 for p in paths] == [True] * 3
        assert [op_name(n) for p in paths[1:] for n in dsa_styles.indexer_ops(result.gm, p)] == []


def test_decode_experts_with_swiglu_limit_lower_to_the_moe_op(one_thread):
    """kernels=True: V4's experts (gate capped, up clamped at swiglu_limit; batched_mm, as on a GPU
    they are grouped_mm) become ic::moe_experts with that limit in the decode graphs (2 tokens), not
    in the prefill, each with V4's shared expert (capped alike) folded in; prefill + 2 decode steps
    (the second closes a CSA window) equal the hooks."""
    from ic_compile.passes.lower_moe_experts import lowered_moe_experts
    model, prompt, steps = deepseek_v4(), ids(), ids(2, seed=2)
    model.config._experts_implementation = "batched_mm"
    with shared_indexer_hooks(model, PLAN):
        want = prefill_and_decode(model, model.config, prompt, steps)
    ic_compile.backend.last_results.clear()
    options = {"plan": PLAN, "lowering": "eager", "kernels": True}
    got = prefill_and_decode(torch.compile(model, backend="indexcache", options=options), model.config, prompt, steps)
    for step, (w, g) in enumerate(zip(want, got)):
        assert (w - g).abs().max().item() < 1e-4, f"step {step} (0 = prefill) differs"
    experts = [f"model.layers.{i}.mlp.experts" for i in range(4)]
    prefill, *decode = ic_compile.backend.last_results
    assert not prefill.kernels.moe_lowered and len(decode) == 2
    for result in decode:
        assert result.kernels.moe_lowered == experts
        assert result.kernels.moe_shared_folded == experts, result.kernels.moe_shared_skipped
        limits = [n.args[5] for n in result.gm.graph.nodes if n.target is lowered_moe_experts]
        assert limits == [model.config.swiglu_limit] * 4


@needs_triton
@pytest.mark.parametrize("indexer_mask", [pytest.param("dense", marks=SLOW), "ranges"])
def test_f_indexer_lowers_to_the_triton_kernel(indexer_mask, monkeypatch, one_thread):
    """kernels=True (what "auto" picks for CUDA inputs): V4's CSA indexer (matmul form over the
    compressed keys [B, T/4, D], its own not-yet-compressed mask, -1 for unready picks) becomes
    ic::indexer_topk, and the Triton kernel -- in its CPU interpreter here (IC_KERNELS_TRITON=1) --
    gives the hooks' answer. Its attention (sinks, block bias) is not a form lower_sparse_attention
    knows: it stays dense."""
    from ic_compile.kernels import indexer_topk as kernel
    calls = []
    monkeypatch.setenv("IC_KERNELS_TRITON", "1")
    monkeypatch.setattr(kernel, "indexer_topk_triton",
                        lambda *a, _run=kernel.indexer_topk_triton, **kw: calls.append(a[1].shape) or _run(*a, **kw))
    model, prompt = deepseek_v4(), ids(16)
    with torch.no_grad(), shared_indexer_hooks(model, PLAN):
        want = model(prompt, use_cache=False).logits
    ic_compile.backend.last_results.clear()
    options = {"plan": PLAN, "lowering": "eager", "kernels": True, "indexer_mask": indexer_mask}
    with torch.no_grad():
        got = torch.compile(model, backend="indexcache", dynamic=False, options=options)(prompt, use_cache=False).logits
    report = ic_compile.backend.last_results[-1].kernels
    assert report.lowered == [0] and report.skipped == {} and report.attention_lowered == 0
    assert calls == [(2, 4, 16)]  # one F layer, 16 tokens -> 4 compressed keys of index_head_dim 16
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IC_RUN_SLOW") != "1", reason="set IC_RUN_SLOW=1")
def test_dynamic_decode_matches_hooks(one_thread):
    """Default dynamic=None: the second call recompiles with symbolic lengths for the later steps
    (passed on CPU, ~50 s of CPU: slow)."""
    model, prompt, steps = deepseek_v4(), ids(), ids(3, seed=2)
    with shared_indexer_hooks(model, PLAN):
        want = prefill_and_decode(model, model.config, prompt, steps)
    got = prefill_and_decode(compiled(model, "eager", dynamic=None), model.config, prompt, steps)
    for step, (w, g) in enumerate(zip(want, got)):
        assert (w - g).abs().max().item() < 1e-4, f"step {step} (0 = prefill) differs"
