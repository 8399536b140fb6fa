"""passes/fp8_key_cache.py: with indexer_precision="fp8", an F indexer whose keys live in a buffer
cache reads an fp8 copy written a row at a time, and answers exactly as quantising every key per call
(the same compiled model without the pass), over a prefill and 8 decode steps."""

import warnings

import pytest
import torch

import dsa_styles
import ic_compile
import tiny_models
from ic_compile.passes import fp8_key_cache as pass_module
from ic_compile.passes.lower_indexer import lowered_indexer

pytest.importorskip("transformers")
DECODE_STEPS = 8


@pytest.fixture
def eight_heads(monkeypatch):
    monkeypatch.setitem(tiny_models.HF_TINY, "index_n_heads", 8)


def _fp8(model, plan, lowering="eager"):
    torch._dynamo.reset()
    ic_compile.backend.last_results.clear()
    return torch.compile(model, backend="indexcache", options={"plan": plan, "lowering": lowering, "kernels": True,
                                                                "indexer_precision": "fp8"})


def _reports():
    return [(r.kernels.fp8_key_cache, r.kernels.fp8_key_cache_skipped) for r in ic_compile.backend.last_results
            if r.changed]


def _hf_static_steps(model, lowering, cache_of):
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=DECODE_STEPS, seed=5)
    run = _fp8(model, "FSFS", lowering)
    return tiny_models.static_cache_steps(run, model, ids, steps, 32, cache=cache_of(run)), _reports()


@pytest.mark.parametrize("lowering,allocated", [("eager", False), ("inductor", True)])
def test_hf_static_cache_reads_the_fp8_copy(eight_heads, monkeypatch, lowering, allocated):
    """HF StaticCache (allocated by its first write inside the prefill graph, or beforehand by
    ic_compile.static_cache: a graph input): both graphs' F indexers keep an fp8 copy, and every
    step's logits are those of quantising the whole cache per call."""
    from transformers import StaticCache

    model = tiny_models.glm()
    cache_of = (lambda run: ic_compile.static_cache(run, 2, 32)) if allocated else \
        (lambda run: StaticCache(config=model.config, max_cache_len=32))
    got, reports = _hf_static_steps(model, lowering, cache_of)
    assert reports == [([0, 2], {})] * 2  # prefill and decode graph
    monkeypatch.setattr(pass_module, "fp8_key_cache", lambda gm, ctx: gm)  # per-call quantisation
    want, reports = _hf_static_steps(model, "eager", cache_of)
    assert reports == [([], {})] * 2
    assert len(got) == DECODE_STEPS + 1
    for step, (w, g) in enumerate(zip(want, got)):
        if lowering == "eager":
            assert torch.equal(w, g), f"step {step}"
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_dynamic_cache_decode_warns(eight_heads):
    """A DynamicCache grows by concatenation: nothing to keep a copy of. The answer is the fp8 one
    anyway; each decode graph compiled (2: the second step's length makes the graph dynamic) says
    that every step re-quantises the keys (Python's default filter then shows it once)."""
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=2, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_models.prefill_and_decode(_fp8(model, "FSFS"), ids, steps)
    messages = [str(w.message) for w in caught if issubclass(w.category, ic_compile.IndexerPrecisionWarning)]
    assert len(messages) == 2 and all("layers [0, 2] quantise their whole key cache" in m for m in messages)
    assert "grow by concatenation" in messages[0] and "StaticCache" in messages[0]
    assert all(mirrored == [] and set(skipped) == {0, 2} for mirrored, skipped in _reports())


class _SliceWritten(dsa_styles.OfficialIndexer):
    """DeepSeek's indexer in bf16 with our einsum form; key buffer written `k_cache[:b, s:e] = k`
    (write="slice") or gpt-fast's `keys = k_cache[:b]; keys.index_copy_(1, arange(s, e), k)`."""

    write = "slice"

    def forward(self, x, qr, start_pos, cos, sin, mask):
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        q = self.wq_b(qr).unflatten(-1, (self.args.index_n_heads, -1))
        q = dsa_styles.rope_part(q, self.args.rope_dim, cos, sin)
        k = dsa_styles.rope_part(self.k_norm(self.wk(x)), self.args.rope_dim, cos, sin)
        self.write_keys(k, start_pos, end_pos)
        weights = self.weights_proj(x) * self.args.index_n_heads ** -0.5
        scores = torch.einsum("bshd,btd->bsht", q, self.k_cache[:bsz, :end_pos]).clamp_min(0) * self.softmax_scale
        scores = (scores * weights.unsqueeze(-1)).sum(2)
        if mask is not None:
            scores = scores + mask
        return scores.topk(min(self.args.index_topk, end_pos), dim=-1)[1]

    def write_keys(self, k, start_pos, end_pos):
        if self.write == "slice":
            self.k_cache[:k.shape[0], start_pos:end_pos] = k
        else:
            self.k_cache[:k.shape[0]].index_copy_(1, torch.arange(start_pos, end_pos), k)


@pytest.mark.parametrize("write", ["slice", "index_copy"])
def test_module_buffer_cache(one_thread, monkeypatch, write):
    """A module-buffer key cache (DeepSeek / gpt-fast style): every graph keeps the copy, and the
    logits equal per-call quantisation's exactly."""
    net = dsa_styles.model("official", n_layers=3)
    for block in net.layers:
        block.attn.indexer.__class__ = _SliceWritten
    monkeypatch.setattr(_SliceWritten, "write", write)
    prompt, steps = dsa_styles.tokens(), dsa_styles.tokens(seq=DECODE_STEPS, seed=3)

    def run():
        return dsa_styles.prefill_and_decode(_fp8(net, "FSS"), net, prompt, steps), _reports()

    got, reports = run()
    assert len(reports) >= 2 and all(r == ([0], {}) for r in reports)  # prefill, decode (dynamic after one)
    monkeypatch.setattr(pass_module, "fp8_key_cache", lambda gm, ctx: gm)
    want, _ = run()
    for step, (w, g) in enumerate(zip(want, got)):
        assert torch.equal(w, g), f"step {step}"


def test_unlowered_indexer_warns_fp8_is_not_applied(one_thread):
    """fp8 asked for, but the indexer's form is not one our op runs (its top-k values are used, with a
    mask fill that is a tensor): it runs in the model's precision, and the user is told which layers."""
    net = tiny_models.ValuesModel("tensor")
    with torch.no_grad(), pytest.warns(ic_compile.IndexerPrecisionWarning,
                                       match=r"not applied to the F indexers of layers \[0\]"):
        _fp8(net, "FS")(torch.randn(1, 12, 16))


def test_lowered_call_gets_the_write(eight_heads):
    """The rewritten graph: the fp8 call takes the index_copy_'s keys and positions."""
    from transformers import StaticCache

    model = tiny_models.glm()
    ids = tiny_models.random_ids(batch=1, seq=6)
    cache = StaticCache(config=model.config, max_cache_len=8)
    graph = ic_compile.capture_graphs(model, {"input_ids": ids, "cache": cache, "use_cache": True})[0]
    gm = ic_compile.rewrite(graph, "FSFS", kernels=True, indexer_precision="fp8").gm
    calls = gm.graph.find_nodes(op="call_function", target=lowered_indexer)
    writes = [n for n in gm.graph.nodes
              if n.target == "index_copy_" and "indexer" in str(n.meta.get("nn_module_stack"))]
    written = {(w.args[3], w.args[2]) for w in writes}
    assert len(calls) == 2 and len({(c.kwargs["new_keys"], c.kwargs["new_key_pos"]) for c in calls} & written) == 2


class _CounterWritten(_SliceWritten):
    """Writes at `self.next_pos[:n]`, then advances that counter in place (after the write, before
    the scores): the op, reading the positions after the advance, must not follow this write."""

    def write_keys(self, k, start_pos, end_pos):
        if not hasattr(self, "next_pos"):
            self.register_buffer("next_pos", torch.arange(self.args.max_seq_len), persistent=False)
        self.k_cache[:k.shape[0]].index_copy_(1, self.next_pos[:k.shape[1]], k)
        self.next_pos.add_(k.shape[1])


def _prefill_report(first_indexer: type):
    """The fp8 rewrite's report for a prefill whose F indexer (layer 0) is `first_indexer`."""
    net = dsa_styles.model("official", n_layers=3)
    for block in net.layers:
        block.attn.indexer.__class__ = _SliceWritten
    net.layers[0].attn.indexer.__class__ = first_indexer
    graph = ic_compile.capture_graphs(net, (dsa_styles.tokens(), 0))[0]
    return ic_compile.rewrite(graph, "FSS", kernels=True, indexer_precision="fp8").kernels


def test_positions_changed_after_the_write_are_not_followed():
    report = _prefill_report(_CounterWritten)
    assert report.fp8_key_cache == [] and "changed in place after the write" in report.fp8_key_cache_skipped[0]


class _BroadcastWritten(_SliceWritten):
    """Writes the first sequence's keys to every sequence (a [1,n,D] value into buf[:b]): the copy,
    written from the value, would hold row 0 only."""

    def write_keys(self, k, start_pos, end_pos):
        self.k_cache[:k.shape[0], start_pos:end_pos] = k[:1]


def test_keys_broadcast_over_the_batch_are_not_followed():
    report = _prefill_report(_BroadcastWritten)
    assert report.fp8_key_cache == [] and "one row of keys to every sequence" in report.fp8_key_cache_skipped[0]
