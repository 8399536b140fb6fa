"""HF DeepseekV32 has no native plan: the oracle is eager forward hooks (S indexer output := last F)."""

import pytest
import torch

from ic_compile.reference import find_indexer_modules, shared_indexer_hooks
from tiny_models import deepseek_v32, prefill_and_decode, random_ids

pytest.importorskip("transformers")


def compiled(model, plan, lowering="eager"):
    return torch.compile(model, backend="indexcache", options={"plan": plan, "lowering": lowering})


@pytest.mark.parametrize("plan", ["FFFF", "FSFS", "FSSS", "FFSF"])
def test_prefill_matches_hooks(plan):
    model, ids = deepseek_v32(), random_ids()
    with torch.no_grad(), shared_indexer_hooks(model, plan):
        want = model(ids, use_cache=False).logits
    with torch.no_grad():
        got = compiled(model, plan)(ids, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4


def test_decode_matches_hooks_inductor():
    model, ids, steps = deepseek_v32(), random_ids(seq=12), random_ids(seq=3, seed=3)
    with shared_indexer_hooks(model, "FSSF"):
        want, _ = prefill_and_decode(model, ids, steps)
    got, cache = prefill_and_decode(compiled(model, "FSSF", "inductor"), ids, steps)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4
    assert cache.layers[1].indexer_keys.numel() == 0  # S layers stop growing their key cache


def test_hooks_need_one_role_per_indexer():
    model = deepseek_v32()
    assert len(find_indexer_modules(model)) == 4
    with pytest.raises(ValueError, match="has 3 layers but 4 indexer layers"):
        with shared_indexer_hooks(model, "FSS"):
            pass
