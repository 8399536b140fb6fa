"""F indexers lowered to ic::indexer_topk (CPU reference here) still equal the model's own plan."""

import math
import re

import pytest
import torch

import ic_compile
import tiny_models
from ic_compile import dsa_model
from ic_compile.passes.detect_indexers import detect_indexers
from ic_compile.passes.graph_ops import op_name, shape_of
from ic_compile.passes.lower_sparse_attention import lowered_absorbed_mla
from ic_compile.passes.lower_indexer import lowered_indexer

pytest.importorskip("transformers")


@pytest.fixture
def eight_heads(monkeypatch):
    """8 indexer heads: with 2, a quarter of the scores are exact 0-ties whose order is arbitrary."""
    monkeypatch.setitem(tiny_models.HF_TINY, "index_n_heads", 8)


@pytest.fixture
def long_context(eight_heads, monkeypatch):
    """Eight indexer heads, top-64 (so a few hundred keys reach topk_select's filtered rows) and
    positions up to 1024: the tiny models of the GPU tests, with prompts of 300 tokens."""
    monkeypatch.setitem(tiny_models.HF_TINY, "index_topk", 64)
    monkeypatch.setitem(tiny_models.HF_TINY, "max_position_embeddings", 1024)


def compiled(model, plan, lowering="eager", indexer_mask="auto"):
    return torch.compile(model, backend="indexcache",
                         options={"plan": plan, "lowering": lowering, "kernels": True, "indexer_mask": indexer_mask})


@pytest.mark.parametrize("plan,lowering", [("FSFS", "eager"), ("FFSF", "inductor")])
def test_hf_prefill_and_decode_with_fused_indexer(eight_heads, plan, lowering):
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=3, seed=5)
    oracle = tiny_models.glm_with_plan(model, plan)
    want, _ = tiny_models.prefill_and_decode(oracle, ids, steps)
    got, _ = tiny_models.prefill_and_decode(compiled(model, plan, lowering), ids, steps)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4


def _left_padded(ids, pad=5):
    """attention_mask [B,T] with the second sequence left-padded by `pad` tokens."""
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :pad] = 0
    return attention_mask


def _left_padded_last_logits(run, model, ids, steps):
    """Last-token logits of a left-padded prefill and single-token steps with a DynamicCache."""
    from transformers import DynamicCache

    cache, attention_mask = DynamicCache(config=model.config), _left_padded(ids)
    with torch.no_grad():
        out = [run(ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits[:, -1]]
        for t in range(steps.shape[1]):
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out.append(run(steps[:, t:t + 1], attention_mask=attention_mask, cache=cache, use_cache=True).logits[:, -1])
    return out


@pytest.mark.parametrize("plan", ["FSFS", "FFSF"])
def test_hf_left_padded_prefill_with_fused_indexer(eight_heads, plan):
    """A padded batch: the indexer gets key ranges that start at the padding (and none for the
    queries inside it); logits equal HF's own IndexCache model at every position."""
    model, ids = tiny_models.glm(), tiny_models.random_ids(seq=20)
    attention_mask = _left_padded(ids)
    with torch.no_grad():
        want = tiny_models.glm_with_plan(model, plan)(ids, attention_mask=attention_mask, use_cache=False).logits
        got = compiled(model, plan, indexer_mask="ranges")(ids, attention_mask=attention_mask, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4


def _tree_mask(batch, seq):
    """bool [B,1,S,S] custom 4D mask, causal except that queries from 10 on skip key 7 (two key runs)."""
    mask = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    mask[10:, 7] = False
    return mask.expand(batch, 1, seq, seq).clone()


def test_non_range_mask_needs_the_dense_option(eight_heads):
    """A mask that is not one key range per query (tree attention) is an error naming the option;
    with indexer_mask="dense" the op gets the mask itself and the logits equal HF's own plan."""
    model, ids = tiny_models.glm(), tiny_models.random_ids(seq=20)
    mask = _tree_mask(2, 20)
    with torch.no_grad():
        with pytest.raises(ic_compile.NotAKeyRangeError, match="not one contiguous key range.*'indexer_mask': 'dense'"):
            compiled(model, "FSFS", indexer_mask="ranges")(ids, attention_mask=mask, use_cache=False)
        torch._dynamo.reset()
        want = tiny_models.glm_with_plan(model, "FSFS")(ids, attention_mask=mask, use_cache=False).logits
        dense = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": "eager",
                                                                    "kernels": True, "indexer_mask": "dense"})
        got = dense(ids, attention_mask=mask, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4


MASK_SEQ = 37  # prime, and no dim of the tiny model: a buffer of a multiple of 37*37 elements holds [S,T]


def _mask_sized_buffers(code: str) -> list[list[int]]:
    """Shapes of the buffers Inductor's output code allocates whose size is a multiple of S*T."""
    shapes = [[int(d) for d in dims.split(",") if d.strip()]
              for dims in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)]
    return [shape for shape in shapes if math.prod(shape) % MASK_SEQ**2 == 0]


@pytest.mark.parametrize("indexer_mask", ["ranges", "dense"])
def test_inductor_never_materialises_the_mask(eight_heads, monkeypatch, indexer_mask):
    """Left-padded HF prefill under Inductor (fused indexer + sparse attention): the key ranges
    are reduced inside kernels that compute HF's mask on the fly, so no buffer has S*T elements;
    with indexer_mask="dense" the op reads the mask, so Inductor writes it (what this test catches)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setitem(tiny_models.HF_TINY, "num_hidden_layers", 2)  # one dense-MLP, one MoE layer
    model, ids = tiny_models.glm(), tiny_models.random_ids(seq=MASK_SEQ)
    attention_mask = _left_padded(ids)
    fn = torch.compile(model, backend="indexcache", options={"plan": "FS", "kernels": True,
                                                             "indexer_mask": indexer_mask})
    with torch.no_grad():
        want = tiny_models.glm_with_plan(model, "FS")(ids, attention_mask=attention_mask, use_cache=False).logits
        got, codes = run_and_get_code(fn, ids, attention_mask=attention_mask, use_cache=False)
    code = "\n".join(codes)
    assert "ic.indexer_topk" in code and ic_compile.backend.last_results[-1].kernels.lowered == [0]
    assert (_mask_sized_buffers(code) == []) == (indexer_mask == "ranges"), _mask_sized_buffers(code)
    assert (got.logits - want).abs().max().item() < 1e-4


def test_deepseek_v32_prompt_as_long_as_the_indexer_head_dim(eight_heads):
    """T == index_head_dim (16 here; a 128-token prompt for the real models): the key [B,T,D] and
    HF's transposed copy [B,D,T] have the same shape, and the lowering must still hand the op the
    key, not its transpose (it once matched by shape and got it wrong: max |dlogits| 0.3). GLM:
    test_prompt_lengths_equal_to_model_dims."""
    from ic_compile.reference import shared_indexer_hooks

    model = tiny_models.deepseek_v32()
    ids = tiny_models.random_ids(seq=tiny_models.HF_TINY["index_head_dim"])
    with torch.no_grad():
        with shared_indexer_hooks(model, "FSFS"):
            want = model(ids, use_cache=False).logits
        got = compiled(model, "FSFS")(ids, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4


def test_prompt_lengths_equal_to_model_dims(eight_heads):
    """Prompt lengths equal to the tiny model's dims (heads 4, rope 8, latent/head dims 16, q rank
    32) and to index_topk = 4, or one off them: shape-based matching would confuse T with a dim."""
    model = tiny_models.glm()
    oracle = tiny_models.glm_with_plan(model, "FFSF")
    fn = compiled(model, "FFSF")
    for seq in (1, 3, 4, 8, 16, 32, 33):
        ids = tiny_models.random_ids(seq=seq, seed=seq)
        with torch.no_grad():
            err = (fn(ids, use_cache=False).logits - oracle(ids, use_cache=False).logits).abs().max().item()
        assert err < 1e-4, f"seq {seq}: max |dlogits| {err}"


def test_lowered_graph_has_one_op_per_f_layer_and_no_score_tensor(eight_heads):
    model, ids = tiny_models.glm(), tiny_models.random_ids(seq=20)
    graph = ic_compile.capture_graphs(model, {"input_ids": ids, "use_cache": False})[0]
    result = ic_compile.rewrite(graph, "FSSF", kernels=True)
    assert result.kernels.lowered == [0, 3] and not result.kernels.skipped
    calls = [n for n in result.gm.graph.nodes if n.target is lowered_indexer]
    assert len(calls) == 2
    # HF's indices only feed scatter(-1, ids, False) (the index mask): any order is fine
    assert [n.args[8] for n in calls] == [False, False]
    attention = [n for n in result.gm.graph.nodes if n.target is lowered_absorbed_mla]
    assert len(attention) == result.kernels.attention_lowered == result.kernels.attention_absorbed == 4
    # absorbed MLA: no per-head keys expanded from the latent (kv_b_proj output, key buffer) remain
    assert not any(op_name(n) in ("new_empty", "copy_") for n in result.gm.graph.nodes)
    assert sum(op_name(n) == "linear" and "kv_b_proj" in str(n.args[1]) for n in graph.graph.nodes) == 4
    assert not any(op_name(n) == "linear" and "kv_b_proj" in str(n.args[1]) for n in result.gm.graph.nodes)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert not any(n.target is sdpa for n in result.gm.graph.nodes)
    assert not any(op_name(n) == "scatter" for n in result.gm.graph.nodes)  # no [B,S,T] index mask
    # the indexer's masked_fill(~mask) hands the op `mask` itself: no [B,S,T] inversion is left
    assert not any(op_name(n) == "invert" and shape_of(n) == (2, 20, 20) for n in result.gm.graph.nodes)
    assert any(op_name(n) == "invert" and shape_of(n) == (2, 20, 20) for n in graph.graph.nodes)
    assert detect_indexers(result.gm).matches == []  # no ReLU(q·k) -> topk left anywhere
    heads = tiny_models.HF_TINY["index_n_heads"]
    score_shape = (2, 20, heads, 20)  # [B,S,H,T]
    assert all(shape_of(n) != score_shape for n in result.gm.graph.nodes)
    assert any(shape_of(n) == score_shape for n in graph.graph.nodes)  # it was there before


def test_reference_model_static_cache_with_fused_indexer():
    dsa = dsa_model
    full = dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny()), 0).eval()
    native = dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny(index_topk_pattern="FSFS")), 0).eval()
    for m in (full, native):
        m.setup_caches(max_batch_size=1, max_seq_length=32)
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    fast = compiled(full, "FSFS")
    with torch.no_grad():
        pairs = [(native(x[:, :16], torch.arange(16)), fast(x[:, :16], torch.arange(16)))]
        for t in range(16, 20):
            pos = torch.tensor([t])
            pairs.append((native(x[:, t:t + 1], pos), fast(x[:, t:t + 1], pos)))
    for want, got in pairs:
        assert (want - got).abs().max().item() < 1e-4
    assert ic_compile.backend.last_results[-1].kernels.lowered == [0, 2]


def test_hf_deepseek_v32_indices_are_order_free(eight_heads):
    """DeepseekV32 builds the same index mask (scatter(-1, ids, False)): unordered rows asked for."""
    model, ids = tiny_models.deepseek_v32(), tiny_models.random_ids(seq=20)
    graph = ic_compile.capture_graphs(model, {"input_ids": ids, "use_cache": False})[0]
    result = ic_compile.rewrite(graph, "FFFF", kernels=True)
    calls = [n for n in result.gm.graph.nodes if n.target is lowered_indexer]
    assert len(calls) == 4 and all(n.args[8] is False for n in calls)


def test_order_sensitive_consumer_keeps_descending_indices():
    """A model reading idx[..., :1] (the best key) must keep torch.topk's order: the lowering
    asks the op for sorted rows (ordered=True), and the rewritten graph still matches eager."""
    from test_detection import Model

    torch.manual_seed(0)
    model, x = Model(["einsum_clamp_sum", "einsum_clamp_sum"]).eval(), torch.randn(2, 12, 16)
    result = ic_compile.rewrite(ic_compile.capture_graphs(model, (x,))[0], "FF", kernels=True)
    calls = [n for n in result.gm.graph.nodes if n.target is lowered_indexer]
    assert len(calls) == 2 and [n.args[8] for n in calls] == [True, True]
    with torch.no_grad():
        assert torch.allclose(compiled(model, "FF")(x)[0], model(x)[0], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hf_oracle_on_gpu_with_triton_kernels(long_context, monkeypatch):
    """CUDA: the lowered graph runs the Triton indexer (unordered selection through topk_select:
    prefill and decode) and sparse MLA; logits match HF's own IndexCache model."""
    from ic_compile.kernels import indexer_topk as indexer_mod

    selects = []
    original = indexer_mod.topk_select
    monkeypatch.setattr(indexer_mod, "topk_select", lambda *a, **kw: selects.append(1) or original(*a, **kw))
    model = tiny_models.glm().cuda()
    ids, steps = tiny_models.random_ids(batch=1, seq=300).cuda(), tiny_models.random_ids(batch=1, seq=2, seed=5).cuda()
    oracle = tiny_models.glm_with_plan(model, "FSFS").cuda()
    want, _ = tiny_models.prefill_and_decode(oracle, ids, steps)
    got, _ = tiny_models.prefill_and_decode(compiled(model, "FSFS", "inductor"), ids, steps)
    assert selects, "the Triton selection did not run"
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-3


@pytest.mark.parametrize("device,seq", [
    ("cpu", 100),
    pytest.param("cuda", 300, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])])
def test_hf_deepseek_v32_with_kernels_matches_hooks(device, seq, long_context):
    """HF DeepseekV32 (no native plan: the oracle is forward hooks, S indexer output := last F's)
    with every F indexer and every attention layer lowered to our ops (CPU: the references; CUDA:
    the Triton kernels), prefill + two decode steps."""
    from ic_compile.reference import shared_indexer_hooks

    model = tiny_models.deepseek_v32().to(device)
    ids = tiny_models.random_ids(batch=1, seq=seq).to(device)
    steps = tiny_models.random_ids(batch=1, seq=2, seed=5).to(device)
    with shared_indexer_hooks(model, "FSSF"):
        want, _ = tiny_models.prefill_and_decode(model, ids, steps)
    ic_compile.backend.last_results.clear()
    got, _ = tiny_models.prefill_and_decode(compiled(model, "FSSF", "inductor"), ids, steps)
    kernels = [r.kernels for r in ic_compile.backend.last_results]
    assert kernels and all(k.lowered == [0, 3] and k.attention_lowered == 4 for k in kernels), kernels
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < (1e-3 if device == "cuda" else 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hf_left_padded_prefill_on_gpu_reads_key_ranges(long_context, monkeypatch):
    """CUDA: a left-padded batch is not plain causal, so the Triton kernel's range path runs
    (HAS_RANGE); logits match HF's own IndexCache model."""
    from ic_compile.kernels import ops

    ranges = []
    original = ops._indexer_topk
    monkeypatch.setattr(ops, "_indexer_topk",
                        lambda *a, **kw: ranges.append(kw.get("key_range") is not None) or original(*a, **kw))
    model = tiny_models.glm().cuda()
    ids = tiny_models.random_ids(batch=2, seq=300).cuda()
    attention_mask = _left_padded(ids, pad=37)
    with torch.no_grad():
        want = tiny_models.glm_with_plan(model, "FSFS").cuda()(ids, attention_mask=attention_mask,
                                                               use_cache=False).logits
        got = compiled(model, "FSFS", "inductor")(ids, attention_mask=attention_mask, use_cache=False).logits
    assert ranges and all(ranges), "the op did not get key ranges"
    # positions after the padding (SDPA backends differ on the padded queries' fully masked rows)
    assert (got[:, 37:] - want[:, 37:]).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_cache_prefill_and_decode_on_gpu(long_context):
    """A StaticCache (fixed shapes; keys past the filled positions masked): prefill with key ranges
    (within causal: T = max_cache_len > S), decode with the dense mask; logits equal HF's own plan.
    (The same with the Triton interpreter on CPU, IC_KERNELS_TRITON=1: max |diff| 2.4e-4.)"""
    model = tiny_models.glm().cuda()
    ids, steps = tiny_models.random_ids(batch=2, seq=300).cuda(), tiny_models.random_ids(batch=2, seq=3, seed=5).cuda()
    want = tiny_models.static_cache_steps(tiny_models.glm_with_plan(model, "FSFS").cuda(), model, ids, steps, 320)
    got = tiny_models.static_cache_steps(compiled(model, "FSFS", "inductor"), model, ids, steps, 320)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_cudagraphs_static_cache_decode_on_gpu(long_context, monkeypatch, pdl):
    """options={"cudagraphs": True} with a StaticCache: no graph is skipped, the decode steps after
    the warm-up and recording replay our ops from the graph (their Python never runs), and prefill
    + every step equal HF's own plan; also with programmatic dependent launch switched on (ours and
    Inductor's kernels). (HF's MoE must be capturable: its fp32 grouped_mm fallback syncs
    (offs.tolist()), so this fp32 model runs its experts as batched_mm.)"""
    from torch._dynamo.utils import counters

    from ic_compile import backend
    from ic_compile.kernels import _triton_utils, ops

    monkeypatch.setattr(_triton_utils, "_PDL", pdl)
    monkeypatch.setattr(backend, "_INDUCTOR_PDL", pdl)

    model = tiny_models.glm().cuda()
    ids, steps = tiny_models.random_ids(batch=2, seq=300).cuda(), tiny_models.random_ids(batch=2, seq=5, seed=5).cuda()
    want = tiny_models.static_cache_steps(tiny_models.glm_with_plan(model, "FSFS").cuda(), model, ids, steps, 320)
    model.config._experts_implementation = "batched_mm"
    torch._dynamo.reset()
    counters.clear()
    calls, op_calls = [], []  # forward calls; the forward call during which each op's Python ran
    for name in ("_indexer_topk", "_sparse_mla"):
        monkeypatch.setattr(ops, name, lambda *a, _fn=getattr(ops, name), **kw: op_calls.append(len(calls)) or _fn(*a, **kw))
    graphs = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "cudagraphs": True})
    got = tiny_models.static_cache_steps(lambda *a, **kw: calls.append(1) or graphs(*a, **kw), model, ids, steps, 320,
                              cache=ic_compile.static_cache(graphs, 2, 320))
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-3
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert op_calls and max(op_calls) <= 3, f"ops ran outside a CUDA graph in forward calls {sorted(set(op_calls))}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_with_cudagraphs_on_gpu(long_context):
    """HF `generate` with forward compiled with cudagraphs=True and ic_compile.static_cache, a
    left-padded batch (prefill with key ranges: not captured), run twice with the same shapes, so
    the second run replays what the first recorded. Tokens equal HF's own plan's and logits stay
    close, both times. (Capturing prefill graphs failed on the GPU with "operation not permitted when
    stream is capturing": by reading the code, their warm-up checked the key ranges and took a
    data-dependent path the capture did not, so only decode-sized graphs are captured.)"""
    model = tiny_models.glm().cuda()
    native = tiny_models.glm_with_plan(model, "FSFS").cuda()
    model.config._experts_implementation = "batched_mm"  # HF's fp32 grouped_mm fallback syncs
    model.forward = torch.compile(model.forward, backend="indexcache", options={"plan": "FSFS", "cudagraphs": True})
    for seed in (0, 1):
        ids = tiny_models.random_ids(batch=2, seq=300, seed=seed).cuda()
        kwargs = dict(input_ids=ids, attention_mask=_left_padded(ids, pad=37), max_new_tokens=5, do_sample=False,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        want = native.generate(**kwargs, cache=ic_compile.static_cache(native, 2, 320), disable_compile=True)  # eager
        ic_compile.backend.last_results.clear()
        # disable_compile: else on CUDA generate compiles the decode forward itself, around ours
        got = model.generate(**kwargs, cache=ic_compile.static_cache(model, 2, 320), disable_compile=True)
        assert seed or [r.changed for r in ic_compile.backend.last_results] == [True, True], "not our graphs"
        assert torch.equal(got.sequences, want.sequences), f"generate call {seed}"
        for w, g in zip(want.logits, got.logits):
            assert (w - g).abs().max().item() < 1e-3


def test_rewritten_graph_keeps_dynamo_static_inputs(eight_heads):
    """The rewritten graph still reads as Dynamo's to AOTAutograd (compile id, placeholder sources):
    otherwise it finds no static inputs, and Inductor's CUDA graphs copy every weight per replay and
    skip the decode graph for writing the cache (seen on the H200). The StaticCache's tensors stay
    marked static in the decode graph."""
    from ic_compile.backend import last_results

    model = tiny_models.glm()
    ids = tiny_models.random_ids(batch=1, seq=20)
    cache = ic_compile.static_cache(model, 1, 32)
    last_results.clear()
    torch._dynamo.reset()
    tiny_models.static_cache_steps(compiled(model, "FSFS", "inductor"), model, ids, ids[:, :2], 32, cache=cache)
    rewritten = [r for r in last_results if r.changed]
    assert rewritten
    for result in rewritten:
        assert result.gm.meta.get("dynamo_compile_id") == result.original.meta["dynamo_compile_id"]
        assert all(hasattr(node, "_dynamo_source") for node in result.gm.graph.find_nodes(op="placeholder"))
    decode = [r for r in rewritten if any(shape_of(n) == (1, 1) for n in r.gm.graph.find_nodes(op="placeholder"))]
    marked = [n for n in decode[-1].gm.graph.find_nodes(op="placeholder")
              if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]
    assert len(marked) >= 4, "the cache tensors are not marked static in the decode graph"


def test_static_cache_helper_allocates_marked_empty_tensors(eight_heads):
    """ic_compile.static_cache (given the torch.compile wrapper): every cache tensor exists, is
    marked as a static address (what CUDA graphs need for in-place writes) and is empty again."""
    model = tiny_models.glm()
    cache = ic_compile.static_cache(torch.compile(model, backend="indexcache"), batch_size=2, max_cache_len=16)
    tensors = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    assert len(tensors) == 5 * len(cache.layers)  # keys, values, length; indexer keys, indexer length
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in tensors)
    assert all(not t.any() for t in tensors)
    assert cache.layers[0].keys.shape[:3] == (2, 1, 16)


def test_cudagraphs_option_captures_decode_graphs_only(eight_heads, monkeypatch):
    """cudagraphs=True: graphs with a prefill-sized indexer are compiled without CUDA graphs (their
    indexer keeps its host checks and causal fast path); decode graphs are captured, their indexers
    with check=False (no device sync; one path in warm-up and capture), so their op runs no check.
    A left-padded prefill (key ranges) and decode steps still equal HF's own plan. (On CPU Inductor
    records no graphs; the GPU tests above do.)"""
    from ic_compile import backend
    from ic_compile.kernels import ops

    graphed, checks = [], []
    monkeypatch.setattr(backend, "lower", lambda gm, inputs, lowering, cudagraphs=False, _lower=backend.lower:
                        graphed.append(cudagraphs) or _lower(gm, inputs, lowering, cudagraphs))
    monkeypatch.setattr(ops, "check_key_range", lambda *a, _fn=ops.check_key_range: checks.append(a[1]) or _fn(*a))
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=2, seed=5)
    graphs = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "kernels": True, "cudagraphs": True})

    backend.last_results.clear()
    want = _left_padded_last_logits(tiny_models.glm_with_plan(model, "FSFS"), model, ids, steps)
    got = _left_padded_last_logits(graphs, model, ids, steps)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4
    prefill, decode = backend.last_results[0].gm, backend.last_results[-1].gm
    assert graphed[0] is False and graphed[-1] is True
    assert all(n.kwargs.get("check", True) for n in prefill.graph.find_nodes(op="call_function", target=lowered_indexer))
    assert all(n.kwargs["check"] is False for n in decode.graph.find_nodes(op="call_function", target=lowered_indexer))
    assert checks and set(checks) == {20}, "only the prefill (20 queries) checks its key ranges"


def test_cudagraphs_needs_inductor():
    with pytest.raises(ic_compile.OptionsError, match="cudagraphs=True needs lowering='inductor'"):
        ic_compile.backend.BackendOptions.parse({"cudagraphs": True, "lowering": "eager"})


def test_static_cache_prefill_and_decode(eight_heads):
    """The same on CPU (references): the prefill's key ranges end before T = max_cache_len."""
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(batch=2, seq=40), tiny_models.random_ids(batch=2, seq=3, seed=5)
    want = tiny_models.static_cache_steps(tiny_models.glm_with_plan(model, "FSFS"), model, ids, steps, 64)
    got = tiny_models.static_cache_steps(compiled(model, "FSFS", "inductor"), model, ids, steps, 64)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4


def test_decode_graphs_hand_the_op_the_dense_mask(eight_heads, monkeypatch):
    """Default options under Inductor, a left-padded batch: the prefill hands ic::indexer_topk key
    ranges; the decode graphs (one query) the dense [B,1,T] mask, and the op runs neither the range
    check nor the mask's causal check for them (each a device sync: decode without CUDA graphs is
    host-bound). Last-token logits equal HF's own plan at every step."""
    from ic_compile.kernels import ops

    got_forms, checks = [], []
    original = ops._indexer_topk

    def recording(q, k, w, topk, mask, causal, sorted=True, key_range=None):
        got_forms.append((q.shape[1], mask is not None, key_range is not None))
        return original(q, k, w, topk, mask, causal, sorted=sorted, key_range=key_range)

    monkeypatch.setattr(ops, "_indexer_topk", recording)
    for name in ("check_key_range", "mask_within_causal"):  # both take (tensor, S, T, ...)
        monkeypatch.setattr(ops, name, lambda *a, _fn=getattr(ops, name), _name=name: checks.append((_name, a[1])) or _fn(*a))
    model = tiny_models.glm()
    ids, steps = tiny_models.random_ids(seq=20), tiny_models.random_ids(seq=2, seed=5)

    want = _left_padded_last_logits(tiny_models.glm_with_plan(model, "FSFS"), model, ids, steps)
    got = _left_padded_last_logits(compiled(model, "FSFS", "inductor"), model, ids, steps)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4
    assert {form for form in got_forms if form[0] == 20} == {(20, False, True)}, got_forms  # prefill: ranges
    assert {form for form in got_forms if form[0] == 1} == {(1, True, False)}, got_forms  # decode: dense mask
    assert checks and all(S == 20 for _, S in checks), checks


def test_indexer_mask_auto_picks_ranges_under_inductor_only():
    """"auto" (the default), decided once per graph: key ranges under Inductor, which fuses their
    reductions, except in decode graphs (every query length a constant <= 8); the dense mask when
    the graph runs eagerly (unfused, the reductions would write int64 [B,S,T] temporaries)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from ic_compile.passes.lower_indexer import decide_indexer_mask

    symbolic = ShapeEnv().create_unbacked_symint()  # a query length under dynamic shapes: prefill
    assert decide_indexer_mask("auto", "inductor", [20, 20]) == "ranges"
    assert decide_indexer_mask("auto", "inductor", [symbolic]) == "ranges"
    assert decide_indexer_mask("auto", "inductor", [1, 1]) == "dense"
    assert decide_indexer_mask("auto", "inductor", [8]) == "dense"
    assert decide_indexer_mask("auto", "inductor", [9]) == "ranges"
    assert decide_indexer_mask("auto", "eager", [20]) == "dense"
    assert decide_indexer_mask("ranges", "eager", [1]) == "ranges"
    assert decide_indexer_mask("dense", "inductor", [20]) == "dense"
    with pytest.raises(ValueError, match="indexer_mask='tree' is not one of"):
        decide_indexer_mask("tree", "inductor", [20])


def test_the_graph_mask_decision_reaches_every_lowered_call(eight_heads):
    """indexer_mask="auto" is decided once for the graph: the lowered calls carry "ranges" or "dense"
    (never "auto"), and the report and counters say which."""
    model = tiny_models.glm()
    prefill = ic_compile.capture_graphs(model, {"input_ids": tiny_models.random_ids(seq=20), "use_cache": False})[0]
    for lowering, want in (("inductor", "ranges"), ("eager", "dense")):
        result = ic_compile.rewrite(prefill, "FSSF", kernels=True, indexer_mask="auto", lowering=lowering)
        calls = result.gm.graph.find_nodes(op="call_function", target=lowered_indexer)
        assert [n.args[9] for n in calls] == [want, want] and result.kernels.indexer_mask == want
        assert result.counters[f"lower_indexer.mask_{want}"] == 2 == result.counters["lower_indexer.lowered"]


def test_fp8_indexer_option_reaches_the_op(eight_heads):
    """indexer_precision="fp8" lowers every F indexer with fp8 scores (on CPU: the fp8 reference),
    and changes what is computed; bf16 graphs carry no precision argument."""
    model, ids = tiny_models.glm(), tiny_models.random_ids(seq=20)
    graph = ic_compile.capture_graphs(model, {"input_ids": ids, "use_cache": False})[0]
    fp8 = ic_compile.rewrite(graph, "FSSF", kernels=True, indexer_precision="fp8").gm
    bf16 = ic_compile.rewrite(graph, "FSSF", kernels=True).gm
    assert [n.kwargs for n in fp8.graph.find_nodes(op="call_function", target=lowered_indexer)] == [
        {"indexer_precision": "fp8"}] * 2
    assert all(not n.kwargs for n in bf16.graph.find_nodes(op="call_function", target=lowered_indexer))

    def logits(precision):
        options = {"plan": "FSSF", "lowering": "eager", "kernels": True, "indexer_precision": precision}
        torch._dynamo.reset()
        return torch.compile(model, backend="indexcache", options=options)(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        got_fp8, got_bf16 = logits("fp8"), logits("bf16")
    assert torch.isfinite(got_fp8).all()
    assert (got_fp8 - got_bf16).abs().max() > 0, "fp8 scores selected exactly the bf16 keys everywhere"


@pytest.mark.parametrize("options,message", [
    ({"indexer_precision": "fp16"}, r"indexer_precision='fp16' is not one of \('bf16', 'fp8'\)"),
    ({"indexer_precision": "fp8", "kernels": False}, r"indexer_precision='fp8' runs in our fused indexer op"),
])
def test_indexer_precision_option_errors(options, message):
    with pytest.raises(ic_compile.OptionsError, match=message):
        ic_compile.backend.BackendOptions.parse(options)


def test_per_key_scale_applies_after_the_head_sum():
    """A per-key factor on the scores (DeepSeek's `fp8_index(...) * k_scale`) reaches the op as k_scale,
    applied after the ReLU and head sum: any sign, the reference's answer."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic
    from ic_compile.kernels.reference import indexer_scores_ref

    torch.manual_seed(0)
    q, k, w = torch.randn(1, 3, 4, 8), torch.randn(1, 6, 8), torch.rand(1, 3, 4, 1)
    scales = torch.randn(1, 1, 6)  # negative factors too
    got = lowered_indexer(q, k, w, 1.0, None, 2, "bsh1", "none", key_scale=scales)  # no mask: all keys
    want = (indexer_scores_ref(q, k, w[..., 0]) * scales).topk(2, dim=-1).indices
    assert torch.equal(got, want.int())


def test_captured_graphs_get_inductor_pdl_only_when_switched_on(monkeypatch):
    """Inductor's config for captured (decode) graphs: CUDA graphs always; Inductor's programmatic
    dependent launch only with the private switch on (off until measured on a GPU) and where this
    torch has the setting; the patch is one Inductor accepts."""
    import torch._inductor.config as inductor_config

    from ic_compile import backend

    monkeypatch.setattr(backend, "_INDUCTOR_PDL", False)
    assert backend.graph_patches() == {"triton.cudagraphs": True}
    monkeypatch.setattr(backend, "_INDUCTOR_PDL", True)
    has_pdl = hasattr(inductor_config.triton, "enable_pdl")
    assert backend.graph_patches() == {"triton.cudagraphs": True, **({"triton.enable_pdl": True} if has_pdl else {})}
    with inductor_config.patch(backend.graph_patches()):
        assert not has_pdl or inductor_config.triton.enable_pdl
