"""Tests for the reference DSA model in ic_compile/dsa_model.py (CPU, fast)."""
import sys
from pathlib import Path

import pytest
import torch

from ic_compile.dsa_model import KVCache, ModelArgs, MoE, Transformer, init_weights  # noqa: E402

SEQ = 24  # > index_topk (8) of the tiny config, so the indexer really selects


def make_model(pattern=None, seed=0, **overrides):
    torch.manual_seed(seed)
    args = ModelArgs.tiny(index_topk_pattern=pattern, **overrides)
    return init_weights(Transformer(args), seed=seed).eval()


def tokens(batch=2, seq=SEQ, seed=1):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, idx, n_prefill, cache_len=32):
    """Prefill n_prefill tokens through the cache, then decode one token at a time."""
    model.setup_caches(idx.shape[0], cache_len)
    outs = [model(idx[:, :n_prefill], torch.arange(n_prefill))]
    for t in range(n_prefill, idx.shape[1]):
        outs.append(model(idx[:, t:t + 1], torch.tensor([t])))
    return torch.cat(outs, dim=1)


def test_shapes_and_structure():
    model = make_model("FSFS")
    logits = model(tokens())
    assert logits.shape == (2, SEQ, 256) and logits.dtype == torch.float32
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 4
    assert [layer.attn.indexer is not None for layer in model.layers] == [True, False, True, False]
    assert type(model.layers[0].ffn).__name__ == "MLP"  # n_dense_layers=1
    assert all(isinstance(layer.ffn, MoE) for layer in model.layers[1:])

    model.setup_caches(3, 40)
    cache0, cache1 = model.layers[0].attn.kv_cache, model.layers[1].attn.kv_cache
    assert isinstance(cache0, KVCache)
    assert cache0.kv_latent.shape == (3, 40, 32) and cache0.k_rope.shape == (3, 40, 8)
    assert cache0.index_k.shape == (3, 40, 16) and cache1.index_k is None
    assert not any("kv_cache" in k for k in model.state_dict())  # caches are not weights


def test_indexer_topk_shape_and_causality():
    model = make_model()
    topks = []
    model.layers[0].register_forward_hook(lambda m, i, out: topks.append(out[1]))
    model(tokens())
    topk = topks[0]
    assert topk.shape == (2, SEQ, 8) and topk.dtype == torch.int32
    query_pos = torch.arange(SEQ)[None, :, None]
    # once a query has >= 8 allowed keys, every selected key is causal
    assert (topk[:, 7:] <= query_pos[:, 7:]).all()
    assert (topk[:, 7:] < SEQ).all() and (topk.sort(-1).values.diff(dim=-1) > 0).all()


def test_s_layers_reuse_previous_topk():
    model = make_model("FSSF")
    topks = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, i, out: topks.append(out[1]))
    model(tokens())
    assert topks[1] is topks[0] and topks[2] is topks[0]
    assert not torch.equal(topks[3], topks[0])  # layer 3 is F: its own selection


@pytest.mark.parametrize("pattern", [None, "FSFS"])
def test_decode_matches_prefill(pattern):
    model = make_model(pattern)
    idx = tokens()
    with torch.no_grad():
        full = model(idx)  # no-cache causal prefill
        decoded = decode_logits(model, idx, n_prefill=10)
        model.setup_caches(2, 32)
        cached_prefill = model(idx, torch.arange(SEQ))
    assert (decoded - full).abs().max() < 1e-4
    assert (cached_prefill - full).abs().max() < 1e-4


def test_cache_batch_smaller_than_max_batch():
    model = make_model()
    idx = tokens(batch=1)
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(4, 32)
        cached = model(idx, torch.arange(SEQ))
    assert (cached - full).abs().max() < 1e-4


def test_pattern_model_loads_all_f_weights():
    full = make_model()
    shared = Transformer(ModelArgs.tiny(index_topk_pattern="FSFS")).eval()
    result = shared.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == []
    s_indexers = ("layers.1.attn.indexer.", "layers.3.attn.indexer.")
    assert result.unexpected_keys
    assert all(k.startswith(s_indexers) for k in result.unexpected_keys)

    all_f = Transformer(ModelArgs.tiny(index_topk_pattern="FFFF")).eval()
    all_f.load_state_dict(full.state_dict(), strict=True)

    idx = tokens()
    with torch.no_grad():
        ref, out_shared, out_all_f = full(idx), shared(idx), all_f(idx)
    assert (out_shared - ref).abs().max() > 1e-3  # S layers really change the selection
    assert torch.equal(out_all_f, ref)


def test_init_weights_is_deterministic_per_name():
    a, b, c = make_model(seed=3), make_model("FSFS", seed=3), make_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sb[k], sa[k]) for k in sb)
    assert not torch.equal(sa["layers.1.attn.wq_a.weight"], sc["layers.1.attn.wq_a.weight"])
    assert torch.equal(sa["norm.weight"], torch.ones(64))
    assert torch.equal(sa["layers.0.attn.indexer.k_norm.bias"], torch.zeros(16))


@pytest.mark.parametrize("pattern, message", [
    ("FSX", "may only contain 'F'"),
    ("fsfs", "may only contain 'F'"),
    ("FSF", "has length 3 but n_layers is 4"),
    ("SFFF", "must start with 'F'"),
])
def test_bad_patterns_raise(pattern, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.tiny(index_topk_pattern=pattern)


def test_unknown_name_and_errors():
    with pytest.raises(ValueError, match="unknown model name 'nope'"):
        ModelArgs.from_name("nope")
    assert ModelArgs.from_name("small").index_topk == 64
    big = ModelArgs.from_name("glm4.7-flash-dsa", index_topk_pattern="F" + "S" * 46)
    assert big.pattern[1] == "S" and big.n_layers == 47  # args only, never built here

    model = make_model("FSFS")
    x = torch.randn(1, 4, 64)
    cos, sin = model.rope_cos[:4], model.rope_sin[:4]
    with pytest.raises(ValueError, match="layer 1 is Shared"):
        model.layers[1].attn(x, cos, sin, torch.arange(4), None, False)
    with pytest.raises(RuntimeError, match="setup_caches"):
        make_model()(tokens(), torch.arange(SEQ))


def test_moe_router_topk():
    model = make_model()
    moe = model.layers[1].ffn
    x = torch.randn(10, 64)
    weights, expert_ids = moe.route(x)
    assert weights.shape == expert_ids.shape == (10, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(10))
    assert (expert_ids[:, 0] != expert_ids[:, 1]).all() and (expert_ids < 4).all()

    # reference: loop over tokens and their chosen experts
    with torch.no_grad():
        out = moe(x[None])[0]
        ref = moe.shared_experts(x)
        for n in range(10):
            for w, e in zip(weights[n], expert_ids[n]):
                h = torch.nn.functional.silu(moe.w1[e] @ x[n]) * (moe.w3[e] @ x[n])
                ref[n] += w * (moe.w2[e] @ h)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("pattern", [None, "FSFS"])
def test_fullgraph_compile_matches_eager(pattern):
    torch._dynamo.reset()
    model = make_model(pattern)
    # dynamic=False: one static graph per shape (no-cache S=24, prefill S=20, decode S=1)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    idx = tokens()
    with torch.no_grad():
        assert torch.allclose(compiled(idx), model(idx), atol=1e-5)  # no-cache path
        eager = decode_logits(model, idx, n_prefill=20)
        model.setup_caches(2, 32)
        outs = [compiled(idx[:, :20], torch.arange(20))]  # cache path: prefill + decode
        for t in range(20, SEQ):
            outs.append(compiled(idx[:, t:t + 1], torch.tensor([t])))
    assert torch.allclose(torch.cat(outs, dim=1), eager, atol=1e-5)
    torch._dynamo.reset()


def test_bf16_runs():
    model = make_model().to(torch.bfloat16)
    idx = tokens()
    with torch.no_grad():
        logits = model(idx)
        model.setup_caches(2, 32)
        cached = model(idx, torch.arange(SEQ))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.isfinite(cached).all()
