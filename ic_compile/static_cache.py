"""A Hugging Face StaticCache ready for CUDA graphs (options={"cudagraphs": True}).

    cache = ic_compile.static_cache(model, batch_size=1, max_cache_len=L + new_tokens)
    fast = torch.compile(model, backend="indexcache", options={"plan": plan, "cudagraphs": True})
    fast(ids, cache=cache, use_cache=True)                       # prefill
    fast(next_ids, cache=cache, use_cache=True)                  # decode steps: replayed graphs

A StaticCache allocates its tensors on the first write. When that write happens inside a compiled
graph (the prefill, which this backend compiles), HF cannot mark them as static addresses, and
Inductor then skips the CUDA graph of every decode step ("mutated inputs": the step writes the
cache in place). Allocating them with one uncompiled token, then resetting, avoids that.
"""
from __future__ import annotations

import inspect

import torch


def static_cache(model: torch.nn.Module, batch_size: int, max_cache_len: int):
    """A transformers StaticCache for `model` whose tensors are allocated (outside any compiled
    graph, so marked as static addresses) and empty. `model` may already be compiled (torch.compile
    of the module or of its forward, as for `generate`): the allocating token runs eagerly."""
    from transformers import StaticCache

    module = getattr(model, "_orig_mod", model)
    cache = StaticCache(config=module.config, max_cache_len=max_cache_len)
    cache_kwarg = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    token = torch.zeros((batch_size, 1), dtype=torch.long, device=module.device)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        model(token, use_cache=True, **{cache_kwarg: cache})
    cache.reset()
    return cache


__all__ = ["static_cache"]
