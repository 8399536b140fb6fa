"""An S layer's indexer stops writing every cache it owns (buffers, scale caches, attribute state)
and keeps every write that live code reads (the attention's KV cache, a buffer the model reads)."""

import torch

import dsa_styles
import ic_compile
from ic_compile.passes.graph_ops import module_path


def compiled_prefill(net, plan="FSS"):
    net.reset_caches()
    ic_compile.backend.last_results.clear()
    with torch.no_grad():
        torch.compile(net, backend="indexcache", dynamic=False,
                      options={"plan": plan, "lowering": "eager"})(dsa_styles.tokens(), 0)
    return ic_compile.backend.last_results[-1]


def test_s_layers_write_neither_key_nor_scale_cache(one_thread):
    """Run, not just rewritten: F buffers hold keys and scales, S buffers stay zero, and every
    layer's attention KV cache is written (its readers are live)."""
    net = dsa_styles.model("official", n_layers=3)
    result = compiled_prefill(net)
    indexers = [layer.attn.indexer for layer in net.layers]
    assert [bool(ix.k_cache.any()) for ix in indexers] == [True, False, False]
    assert [bool(ix.k_scale_cache.any()) for ix in indexers] == [True, False, False]
    assert all(layer.attn.k_cache.any() and layer.attn.v_cache.any() for layer in net.layers)
    assert [(c.layer, c.dropped, c.kept) for c in result.caches] == [(1, True, []), (2, True, [])]


def test_attribute_state_keeps_its_shape_not_its_work(one_thread):
    """community: `self.k_cache = k` on the first call. S layers hand back an uninitialised tensor of
    the keys' shape (code may read the cache's length), made by one torch.empty, nothing of the
    indexer's projection, norm or rope."""
    net = dsa_styles.model("community", n_layers=3)
    result = compiled_prefill(net)
    shapes = [tuple(layer.attn.indexer.k_cache.shape) for layer in net.layers]
    assert shapes == [(2, 12, net.layers[0].attn.indexer.args.index_head_dim)] * 3
    empties = [n for n in result.gm.graph.nodes if n.target is torch.empty]
    assert len(empties) == 2 and all(module_path(n) == "" for n in empties)


class ReadScalesAttention(dsa_styles.Attention):
    """The attention also reads its indexer's scale cache: that buffer is live, its writes stay."""

    def forward(self, x, start_pos, cos, sin, mask):
        out = super().forward(x, start_pos, cos, sin, mask)
        end_pos = start_pos + x.shape[1]
        return out + self.indexer.k_scale_cache[:x.shape[0], :end_pos].mean()


def test_a_cache_read_outside_the_indexer_keeps_its_writes(one_thread):
    net = dsa_styles.model("official", n_layers=3)
    for layer in net.layers:
        layer.attn.__class__ = ReadScalesAttention
    prompt = dsa_styles.tokens()
    want = dsa_styles.hooked_prefill_and_decode(net, "FSS", prompt, prompt[:, :0])
    result = compiled_prefill(net)
    assert all(layer.attn.indexer.k_scale_cache.any() for layer in net.layers)
    assert [c.layer for c in result.caches if not c.dropped] == [1, 2]
    assert all("k_scale_cache" in " ".join(c.kept) for c in result.caches)
    assert not any(layer.attn.indexer.k_cache.any() for layer in net.layers[1:])  # keys: only the indexer reads
    net.reset_caches()
    with torch.no_grad():
        got = torch.compile(net, backend="indexcache", dynamic=False,
                            options={"plan": "FSS", "lowering": "eager"})(prompt, 0)
    assert (got - want[0]).abs().max().item() < 1e-4
