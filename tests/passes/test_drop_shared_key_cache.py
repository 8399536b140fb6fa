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


def s_indexer_appends_keys(x, old_keys, wk):  # x [B,T,E], old_keys [B,T0,D], wk [E,D]
    keys = torch.cat([old_keys, x @ wk], dim=1)  # the S indexer's key cache: [B,T0+T,D]
    return x + 1, keys


def dropped(old_keys_shape, keys_read_in_graph=False):
    """drop_shared_key_cache on s_indexer_appends_keys, the cat recorded as layer 1's cache."""
    from torch import fx

    from ic_compile.passes.drop_shared_key_cache import CacheWrite, drop_shared_key_cache
    from ic_compile.passes.manager import PassContext

    gm = fx.symbolic_trace(s_indexer_appends_keys)
    nodes = {n.name: n for n in gm.graph.nodes}
    nodes["old_keys"].meta["example_value"] = torch.empty(old_keys_shape)
    nodes["cat"].meta["example_value"] = torch.empty(2, old_keys_shape[1] + 3, 4)
    if keys_read_in_graph:
        with gm.graph.inserting_after(nodes["cat"]):
            gm.graph.call_method("sum", (nodes["cat"],))  # a reader inside the graph, kept by output
        nodes["output"].args = ((nodes["add"], nodes["cat"], list(nodes["cat"].users)[-1]),)
    ctx = PassContext()
    ctx.caches = [CacheWrite(1, concat=nodes["cat"], old_keys=nodes["old_keys"])]
    drop_shared_key_cache(gm, ctx)
    gm.graph.lint()
    return gm, ctx


def test_an_empty_growing_cache_stays_empty_and_its_keys_are_not_computed():
    gm, ctx = dropped((2, 0, 4))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert [getattr(a, "name", a) for a in output.args[0]] == ["add", "old_keys"]
    assert not [n for n in gm.graph.nodes if n.target in ("cat", torch.cat) or n.name == "matmul"]
    assert ctx.caches[0].dropped and ctx.counters["drop_shared_key_cache.dropped"] == 1


def test_a_cache_holding_keys_keeps_its_length_not_its_work():
    """Keys already in the cache (a model that never saw an empty one): the output becomes an
    uninitialised tensor of the same shape, so code reading the cache length behaves the same."""
    gm, ctx = dropped((2, 5, 4))
    empty = next(n for n in gm.graph.nodes if n.target is torch.empty)
    assert empty.args == ((2, 8, 4),) and ctx.caches[0].dropped
    assert not [n for n in gm.graph.nodes if n.target in ("cat", torch.cat)]


def test_keys_read_inside_the_graph_are_kept_with_the_reason():
    gm, ctx = dropped((2, 0, 4), keys_read_in_graph=True)
    cache = ctx.caches[0]
    assert not cache.dropped and cache.kept == ["cat: the appended keys are read outside the graph output"]
    assert ctx.counters["drop_shared_key_cache.kept"] == 1
