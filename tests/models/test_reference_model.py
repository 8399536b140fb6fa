"""Our own reference model (einsum / clamp_min / sum-over-heads / bool mask / static cache variant)."""

import pytest
import torch

import ic_compile
from ic_compile import dsa_model
from ic_compile.reference import shared_indexer_hooks

dsa = dsa_model


def model_pair(pattern, seed=0):
    full = dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny()), seed).eval()
    native = dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny(index_topk_pattern=pattern)), seed).eval()
    return full, native


def ids(seq=24, seed=1):
    return torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("plan", ["FFFF", "FSFS", "FSSS", "FFSF"])
def test_prefill_matches_native_and_hooks(plan):
    full, native = model_pair(plan)
    x = ids()
    with torch.no_grad():
        want = native(x)
        with shared_indexer_hooks(full, plan):
            hooked = full(x)
        got = torch.compile(full, backend="indexcache", options={"plan": plan, "lowering": "eager"})(x)
    assert (want - hooked).abs().max().item() < 1e-5
    assert (got - want).abs().max().item() < 1e-4


def test_static_cache_decode_matches_native_inductor():
    plan = "FSSF"
    full, native = model_pair(plan)
    for m in (full, native):
        m.setup_caches(max_batch_size=2, max_seq_length=32)
    x = ids(seq=20)
    fast = torch.compile(full, backend="indexcache", options={"plan": plan, "lowering": "inductor"})
    with torch.no_grad():
        prefill_pos = torch.arange(16)
        want = [native(x[:, :16], prefill_pos)]
        got = [fast(x[:, :16], prefill_pos)]
        for t in range(16, 20):
            pos = torch.tensor([t])
            want.append(native(x[:, t:t + 1], pos))
            got.append(fast(x[:, t:t + 1], pos))
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4
    # the S layers' indexer key-cache buffers were never written
    assert full.layers[1].attn.kv_cache.index_k.abs().sum() == 0
    assert full.layers[3].attn.kv_cache.index_k.abs().sum() > 0


def test_shared_layers_lose_their_indexer_work():
    full, _ = model_pair("FSSS")
    graph = ic_compile.capture_graphs(full, ids())[0]
    result = ic_compile.rewrite(graph, "FSSS")
    after = ic_compile.passes.detect_indexers.detect_indexers(result.gm)
    assert [m.layer for m in after.matches] == [0]  # exactly one indexer per F layer remains
    removed_ops = {n.op for n in result.removed}
    assert {"einsum", "clamp_min", "topk"} <= removed_ops
