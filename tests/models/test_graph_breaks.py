"""Models that compile into several graphs: a MoE whose dispatch breaks the graph (`bincount(...)
.tolist()`, plus an explicit `torch._dynamo.graph_break()`) inside every layer, and a break outside
the layer stack. Each layer's attention (with its indexer) is then its own graph fragment; an S
layer's fragment reads its F source's top-k from the index store, its own indexer deleted."""

import pytest
import torch
from torch import Tensor, nn

import dsa_styles as ds
import ic_compile
from ic_compile.index_store import IndexStoreError
from ic_compile.passes.graph_ops import op_name
from ic_compile.plan import PlanError

STEPS = 8
EXPERTS = 4


class DispatchMoE(nn.Module):
    """Top-1 MoE dispatched with host-side counts (as real MoE code does): graph breaks."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.SiLU()) for _ in range(EXPERTS))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(0, 1)
        weight, expert = self.gate(flat).softmax(-1).topk(1, dim=-1)  # a router topk, not an indexer
        counts = torch.bincount(expert.flatten(), minlength=EXPERTS).tolist()  # graph break
        torch._dynamo.graph_break()
        order = expert.flatten().argsort()
        out, start = torch.zeros_like(flat), 0
        for e, count in enumerate(counts):
            rows = order[start:start + count]
            out[rows] = self.experts[e](flat[rows]) * weight[rows]
            start += count
        return out.view_as(x)


def moe_model(style: str = "official") -> ds.Transformer:
    net = ds.model(style)
    torch.manual_seed(1)
    for block in net.layers:
        block.ffn = DispatchMoE(net.embed.embedding_dim)
    return net.eval()


class BreakOutsideLayers(ds.Transformer):
    """A break between the embedding and the layer stack (a print, a logging call, ...)."""

    def forward(self, tokens: Tensor, start_pos: int = 0) -> Tensor:
        seqlen = tokens.shape[1]
        cos, sin = self.cos[start_pos:start_pos + seqlen], self.sin[start_pos:start_pos + seqlen]
        mask = torch.full((seqlen, seqlen), float("-inf")).triu_(1) if seqlen > 1 else None
        h = self.embed(tokens)
        torch._dynamo.graph_break()
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        return self.head(self.norm(h))


def compiled(net, plan, lowering="eager", **kwargs):
    return torch.compile(net, backend="indexcache", options={"plan": plan, "lowering": lowering}, **kwargs)


def max_error(want, got) -> float:
    return max((w - g).abs().max().item() for w, g in zip(want, got))


def store_graphs():
    """The fragments that read / write the index store, by their layer positions."""
    results = [r for r in ic_compile.backend.last_results if r.fragment is not None]
    reads = sorted({(r.layer, r.source) for res in results for r in res.fragment.reads})
    writes = sorted({(w.layer, w.readers) for res in results for w in res.fragment.writes})
    return reads, writes


@pytest.mark.parametrize("lowering,dynamic", [("eager", None), ("inductor", None), ("eager", False)])
def test_moe_dispatch_breaks_decode_matches_hooks(lowering, dynamic, one_thread):
    """Prefill + 8 decode steps; every layer's attention is its own fragment. Plan FSSF: S layers 1
    and 2 read layer 0's top-k from the store; layer 3 is F with no reader (writes nothing)."""
    net, prompt, steps = moe_model(), ds.tokens(), ds.tokens(seq=STEPS, seed=2)
    want = ds.hooked_prefill_and_decode(net, "FSSF", prompt, steps)
    ic_compile.backend.last_results.clear()
    with torch._dynamo.config.patch(recompile_limit=64):  # dynamic=False: a compile per shape and layer
        got = ds.prefill_and_decode(compiled(net, "FSSF", lowering, dynamic=dynamic), net, prompt, steps)
    assert len(got) == STEPS + 1 and max_error(want, got) < 1e-4
    assert store_graphs() == ([(1, 0), (2, 0)], [(0, (1, 2))])
    s_graphs = [r.gm for r in ic_compile.backend.last_results
                if r.fragment is not None and r.fragment.reads]
    for gm in s_graphs:  # the S layer's indexer work is gone: no op of it at all (key projection,
        # scale and attribute caches included), no ReLU anywhere
        assert not [n for n in gm.graph.nodes if op_name(n) == "relu"]
        assert ds.indexer_ops(gm, "attn.indexer") == []


def test_plan_changes_the_answer_across_fragments(one_thread):
    """Guards the oracle test: the plan read from the store really differs from all-F."""
    net, prompt = moe_model(), ds.tokens()
    with torch.no_grad():
        full = net(prompt, 0)
        net.reset_caches()
        shared = compiled(net, "FSSS")(prompt, 0)
    assert (full - shared).abs().max().item() > 1e-3


def test_break_outside_layer_stack_keeps_fullgraph_plan(one_thread):
    """The embedding fragment has no indexer: it passes through; the layer stack is one graph."""
    torch.manual_seed(0)
    net = BreakOutsideLayers(ds.Args(), "official").eval()
    prompt, steps = ds.tokens(), ds.tokens(seq=STEPS, seed=2)
    want = ds.hooked_prefill_and_decode(net, "FSFS", prompt, steps)
    ic_compile.backend.last_results.clear()
    got = ds.prefill_and_decode(compiled(net, "FSFS", "inductor"), net, prompt, steps)
    assert max_error(want, got) < 1e-4
    results = ic_compile.backend.last_results
    assert any(r.passes_through for r in results)
    assert [r.plan.pattern for r in results if r.changed] == ["FSFS"] * len([r for r in results if r.changed])
    assert all(r.fragment is None for r in results)  # the layer stack is one graph: no store needed


def test_fragment_plan_length_must_match_the_model(one_thread):
    net, prompt = moe_model(), ds.tokens()
    with pytest.raises(Exception, match=r"plan 'FSS' has 3 layers but the model has 4 indexer modules "
                                        r"\(layers.0.attn.indexer ... layers.3.attn.indexer\); this graph "
                                        r"fragment holds 1 of them"):
        with torch.no_grad():
            compiled(net, "FSS")(prompt, 0)


def test_s_fragment_without_its_f_source_raises(one_thread):
    """Layer 0 (F) runs un-compiled, as a frame Dynamo fell back to would: it writes nothing to the
    store, and layer 1's fragment (S, compiled) must fail rather than read a stale top-k from the
    previous call."""
    net, prompt = moe_model(), ds.tokens()
    fast = compiled(net, "FSSF")
    with torch.no_grad():
        fast(prompt, 0)  # compiles every fragment; layers 1 and 2 read layer 0's top-k once each
        net.reset_caches()
        net.layers[0].forward = torch._dynamo.disable(net.layers[0].forward)
        with pytest.raises(IndexStoreError, match=r"S layer 1 \(plan FSSF\) ran before its F source layer 0 "
                                                  r"wrote its top-k in this call"):
            fast(prompt, 0)
    assert issubclass(IndexStoreError, RuntimeError) and issubclass(PlanError, ValueError)


def test_index_store_each_reader_reads_a_write_once():
    """The store's freshness rule without any compile: a write names its readers; each reads once;
    a second read (a later call whose F layer did not run) is an error, as is a shape mismatch."""
    from ic_compile.index_store import IndexStore, _read_all
    from ic_compile.passes.bind_plan import StoreRead
    store = IndexStore("FSS")
    values, indices = torch.randn(2, 3, 4), torch.randint(0, 9, (2, 3, 4))
    store.write(0, (values, indices), readers=(1, 2))
    assert store.read(0, 1)[1] is indices and store.pending() == {0: {2}}
    with pytest.raises(IndexStoreError, match="S layer 1 \\(plan FSS\\) ran before its F source layer 0"):
        store.read(0, 1)
    read = StoreRead(None, layer=2, source=0, items=(1,), shapes=((2, 3, 5),))
    with pytest.raises(IndexStoreError, match=r"S layer 2 selects a top-k of shape \(2, 3, 5\) but its F "
                                              r"source layer 0 wrote \(2, 3, 4\)"):
        _read_all(store, [read])
    assert store.pending() == {}  # the last reader took it: nothing outlives the call


@pytest.fixture
def hf_moe_break(monkeypatch):
    """HF DeepseekV32 whose MoE breaks the graph (host-side counts, as expert dispatch code does)."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf
    from tiny_models import break_graph_in_moe
    break_graph_in_moe(monkeypatch, hf.DeepseekV32MoE)


def test_hf_deepseek_v32_with_moe_break_matches_hooks(hf_moe_break, one_thread):
    """HF's layers compile as frames of their own (GradientCheckpointingLayer, deprecate_kwarg
    wrappers shared by every layer): layer 0 writes, S layers 1 and 2 read; 8 decode steps."""
    from tiny_models import deepseek_v32, prefill_and_decode, random_ids
    from ic_compile.reference import shared_indexer_hooks
    model, ids, steps = deepseek_v32(), random_ids(seq=12), random_ids(seq=STEPS, seed=3)
    with shared_indexer_hooks(model, "FSSF"):
        want, _ = prefill_and_decode(model, ids, steps)
    ic_compile.backend.last_results.clear()
    with torch._dynamo.config.patch(recompile_limit=8), pytest.warns(UserWarning, match="recompile_limit raised "
                                                                                       "from 8 to 64"):
        got, _ = prefill_and_decode(compiled(model, "FSSF"), ids, steps)
        assert torch._dynamo.config.recompile_limit == 64
    assert max_error(want, got) < 1e-4
    assert store_graphs() == ([(1, 0), (2, 0)], [(0, (1, 2))])
    prefixes = {r.layout.prefix for r in ic_compile.backend.last_results if r.fragment is not None}
    assert prefixes == {"model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3"}


def test_shared_wrapper_frame_past_the_limit_raises(hf_moe_break, monkeypatch, one_thread):
    """HF's deprecate_kwarg wrapper recompiles per caller and shape; past the limit Dynamo would run
    it and the layer frames under it uncompiled. That is an error naming the wrapper."""
    from tiny_models import deepseek_v32, prefill_and_decode, random_ids
    import ic_compile.frames
    monkeypatch.setattr(ic_compile.frames, "FRAGMENT_RECOMPILE_LIMIT", 4)
    model, ids, steps = deepseek_v32(), random_ids(seq=12), random_ids(seq=STEPS, seed=3)
    with torch._dynamo.config.patch(recompile_limit=4), pytest.raises(ic_compile.frames.RecompileLimitError) as error:
        prefill_and_decode(compiled(model, "FSSF"), ids, steps)
    assert "'wrapped_func'" in str(error.value) and "it calls a frame the plan rewrote" in str(error.value)
