"""Inductor's FX graph cache and our custom ops: a graph compiled against other ic_compile sources is
not reused (ic_compile/backend.inductor_cache_tag)."""
import uuid

import torch
from torch._dynamo.utils import counters

from ic_compile import backend
from ic_compile.dsa_model import ModelArgs, Transformer, init_weights


def _compile_and_run(model, ids):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": "inductor"})
    with torch.no_grad():
        return compiled(ids)


def test_cache_entries_are_keyed_on_our_sources(monkeypatch):
    """The same graph again hits the cache; the same graph under another source digest misses it (an
    entry made with older kernels or op schemas is never run), and the user's own tag is kept in ours."""
    torch.manual_seed(0)
    model = init_weights(Transformer(ModelArgs.tiny(index_topk_pattern=None)), seed=0).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False), \
            torch.compiler.config.patch(cache_key_tag="user-tag"):
        want = _compile_and_run(model, ids)
        counters.clear()
        torch.testing.assert_close(_compile_and_run(model, ids), want)
        hits = counters["inductor"]["fxgraph_cache_hit"]
        assert hits >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0, dict(counters["inductor"])
        other = f"other sources {uuid.uuid4()}"  # (a fixed one would hit the entries of an earlier run)
        monkeypatch.setattr(backend, "_source_digest", lambda: other)
        counters.clear()
        torch.testing.assert_close(_compile_and_run(model, ids), want)
        assert counters["inductor"]["fxgraph_cache_hit"] == 0 and counters["inductor"]["fxgraph_cache_miss"] == hits
        assert backend.inductor_cache_tag().startswith("user-tag|ic_compile:")
