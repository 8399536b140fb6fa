"""Tiny DSA model configs shared by the tests (random weights, CPU-fast)."""

import torch

from ic_compile.tools.models import HF_TINY  # the `hf-tiny:` CLI model; tests monkeypatch it (restored)

PLANS = ["FFFF", "FSFS", "FSSS", "FFSF"]  # all-F, every other, one F, irregular (greedy-looking)


def glm(pattern=None, seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    extra = {} if pattern is None else {"index_topk_pattern": pattern}
    config = GlmMoeDsaConfig(**HF_TINY, **extra)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return GlmMoeDsaForCausalLM(config).to(dtype).eval()


def glm_with_plan(full_model, pattern):
    """The oracle: HF's own IndexCache model with the same weights (S layers have no indexer)."""
    oracle = glm(pattern, dtype=next(full_model.parameters()).dtype,
                 attn=full_model.config._attn_implementation)
    result = oracle.load_state_dict(full_model.state_dict(), strict=False)
    assert not result.missing_keys, result.missing_keys
    assert all(".indexer." in k for k in result.unexpected_keys)
    return oracle


def deepseek_v32(seed=0, dtype=torch.float32):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    torch.manual_seed(seed)
    return DeepseekV32ForCausalLM(DeepseekV32Config(**HF_TINY, n_group=1, topk_group=1)).to(dtype).eval()


def random_ids(batch=2, seq=16, seed=1, vocab=128):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(model, ids, steps):
    """Logits of a prefill and len(steps[0]) single-token decode steps with a DynamicCache."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(ids, cache=cache, use_cache=True).logits]
        for t in range(steps.shape[1]):
            logits.append(model(steps[:, t:t + 1], cache=cache, use_cache=True).logits)
    return logits, cache


def static_cache_steps(run, model, ids, steps, max_len, cache=None):
    """Last-token logits of a prefill and single-token steps with a StaticCache (fixed shapes).
    (transformers 5 writes each step at the cache's running length; cache_position agrees with it.)"""
    from transformers import StaticCache

    cache = cache or StaticCache(config=model.config, max_cache_len=max_len)
    n, out = ids.shape[1], []
    with torch.no_grad():
        for t, tokens in enumerate([ids] + [steps[:, i:i + 1] for i in range(steps.shape[1])]):
            position = torch.arange(n, device=ids.device) if t == 0 else torch.tensor([n + t - 1], device=ids.device)
            # a copy: under CUDA graphs the output lives in the graph's pool, rewritten by the next replay
            out.append(run(tokens, cache=cache, use_cache=True, cache_position=position).logits[:, -1].clone())
    return out
