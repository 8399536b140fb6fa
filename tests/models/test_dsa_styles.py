"""DSA models in styles the detector was not written for (tests/dsa_styles.py): the compiled plan
equals the forward-hook oracle over a prefill and 8 decode steps, and no S layer keeps any of its
indexer's work (projections, norms, rope, Hadamard, scales, cache writes, masks)."""

import os

import pytest
import torch

import dsa_styles
import ic_compile
from ic_compile.passes.graph_ops import example_value, op_name
from tiny_models import deepseek_v32, glm, random_ids

# Longer CPU tests (each ~20-30 s of CPU: nine Inductor compiles) run with IC_RUN_SLOW=1, the
# repo's switch (tests/test_kernels_sm90_compile.py); the default run keeps one of each kind.
SLOW = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("IC_RUN_SLOW") != "1", reason="set IC_RUN_SLOW=1")]
PLAN = "FSS"  # three layers: two S layers, each tracing of a step costs ~1 s less than with four
DECODE_STEPS = 8


@pytest.fixture
def static_decode(one_thread):
    """Static shapes: every decode step is a new start_pos, so a new graph (1 prefill + 8 steps).
    Dynamo's default recompile limit (8) would run the ninth call eagerly, without the plan."""
    with torch._dynamo.config.patch(recompile_limit=DECODE_STEPS + 2):
        yield


def compiled(net, lowering, dynamic=False):
    return torch.compile(net, backend="indexcache", dynamic=dynamic, options={"plan": PLAN, "lowering": lowering})


def run_both(style, lowering, dynamic=False):
    net, prompt, steps = dsa_styles.model(style, n_layers=len(PLAN)), dsa_styles.tokens(), dsa_styles.tokens(seq=DECODE_STEPS, seed=3)
    want = dsa_styles.hooked_prefill_and_decode(net, PLAN, prompt, steps)
    ic_compile.backend.last_results.clear()
    got = dsa_styles.prefill_and_decode(compiled(net, lowering, dynamic), net, prompt, steps)
    return net, want, got


def assert_close(want, got):
    assert len(want) == len(got) == DECODE_STEPS + 1
    for step, (w, g) in enumerate(zip(want, got)):
        assert (w - g).abs().max().item() < 1e-4, f"step {step} (0 = prefill) differs"


def s_layer_leftovers(net, result, plan=PLAN) -> dict:
    """{S layer: op names of its indexer still in the rewritten graph}, empty lists expected."""
    paths = dsa_styles.indexer_paths(net)
    return {layer: [op_name(n) for n in dsa_styles.indexer_ops(result.gm, paths[layer])]
            for layer, role in enumerate(plan) if role == "S"}


def _cases(slow_styles, lowering):
    return [pytest.param(style, lowering, marks=SLOW if style in slow_styles else ()) for style in dsa_styles.STYLES]


# Inductor: fp8 (float8 casts lowered) by default; the others (community: attribute state handed out
# as torch.empty) with IC_RUN_SLOW=1 -- the rewrite is the same for both lowerings, eager checks it
@pytest.mark.parametrize("style,lowering", _cases((), "eager") + _cases(("official", "scores", "community"), "inductor"))
def test_plan_matches_hooks_prefill_and_decode(static_decode, style, lowering):
    net, want, got = run_both(style, lowering)
    assert_close(want, got)
    results = ic_compile.backend.last_results
    assert len(results) == DECODE_STEPS + 1 and all(r.changed for r in results)  # every call ran our graph
    for result in results:
        assert s_layer_leftovers(net, result) == {1: [], 2: []}


@pytest.mark.parametrize("style,lowering,triton", [("official", "eager", False), ("fp8", "eager", False),
                                                    ("fp8", "eager", True), ("fp8", "inductor", False),
                                                    ("scores", "eager", True), ("scores", "inductor", False)])
def test_indexer_runs_in_our_op(static_decode, monkeypatch, style, lowering, triton):
    """The F indexer runs in our op, with the hooks' answer over prefill + 8 decode steps.
    DeepSeek's own (fp8_index: scores times a per-key scale from the scale cache): ic::indexer_topk with
    the scale as k_scale; in fp8 (q and key cache already e4m3, q's scales in the head weights) the fp8
    op on the model's own e4m3 values and key scales (not the values before its narrowing casts, not
    quantised again). "scores" (head-major, its top-k values used: the attention drops -inf picks):
    ic::indexer_topk_scored, whose picked scores stand in for the values of F and the S layers.
    triton: the op's Triton kernels in the interpreter (IC_KERNELS_TRITON=1), else the reference."""
    monkeypatch.setenv("IC_KERNELS_TRITON", "1" if triton else "0")
    net, prompt, steps = dsa_styles.model(style, n_layers=len(PLAN)), dsa_styles.tokens(), dsa_styles.tokens(
        seq=DECODE_STEPS, seed=3)
    want = dsa_styles.hooked_prefill_and_decode(net, PLAN, prompt, steps)
    ic_compile.backend.last_results.clear()
    run = torch.compile(net, backend="indexcache", options={"plan": PLAN, "lowering": lowering, "kernels": True})
    got = dsa_styles.prefill_and_decode(run, net, prompt, steps)
    assert_close(want, got)
    assert all(r.kernels.lowered == [0] for r in ic_compile.backend.last_results)


@pytest.mark.parametrize("style", dsa_styles.STYLES)
def test_sharing_changes_the_answer(style):
    """Guards the oracle: with top-6 of 12 keys, S layers reusing F's top-k changes the logits."""
    net, prompt = dsa_styles.model(style, n_layers=len(PLAN)), dsa_styles.tokens()
    with torch.no_grad():
        full = net(prompt, 0)
        net.reset_caches()
        shared = dsa_styles.hooked_prefill_and_decode(net, PLAN, prompt, prompt[:, :0])[0]
    assert (full - shared).abs().max().item() > 1e-3


def test_s_indexer_work_counted_before_and_after(static_decode):
    """Before the rewrite each S layer has its whole indexer (> 50 ops: key projection, norm, rope,
    Hadamard, quantisation, two cache writes, scores, top-k); after it, none. F layers keep theirs,
    the attention its KV-cache writes."""
    net = dsa_styles.model("official")
    graph = ic_compile.capture_graphs(net, (dsa_styles.tokens(), 0))[0]
    result = ic_compile.rewrite(graph, "FSSF")
    paths = dsa_styles.indexer_paths(net)
    before = [len(dsa_styles.indexer_ops(result.original, p)) for p in paths]
    after = [len(dsa_styles.indexer_ops(result.gm, p)) for p in paths]
    assert min(before) > 50 and after[1] == after[2] == 0 and after[0] == after[3] > 50
    writes = [n for n in result.gm.graph.nodes if op_name(n) == "setitem"]
    assert len(writes) == 4 * 2 + 2 * 2  # attention k/v caches of 4 layers, key + scale caches of 2 F
    assert [c.layer for c in result.caches if c.dropped] == [1, 2]


@pytest.mark.parametrize("make", [glm, deepseek_v32], ids=["GlmMoeDsa", "DeepseekV32"])
def test_hf_models_keep_no_s_indexer_op(make, one_thread):
    """HF's own DSA models, prefill and a decode step with a DynamicCache."""
    from transformers import DynamicCache
    net, ids = make(), random_ids(seq=12)
    cache = DynamicCache(config=net.config)
 # capturing runs the graph: the prefill fills the cache the decode step then reads
    graphs = ic_compile.capture_graphs(net, {"input_ids": ids, "cache": cache, "use_cache": True})
    graphs += ic_compile.capture_graphs(net, {"input_ids": ids[:, :1], "cache": cache, "use_cache": True})
    for graph in graphs:
        result = ic_compile.rewrite(graph, "FSSF")
        assert s_layer_leftovers(net, result, "FSSF") == {1: [], 2: []}


def is_symbolic(value) -> bool:
    """A SymInt, or a tensor with a symbolic size: what a recompile with dynamic shapes hands a graph."""
    if isinstance(value, torch.Tensor):
        return not all(isinstance(size, int) for size in value.shape)
    return isinstance(value, torch.SymInt)


@pytest.mark.parametrize("style", [pytest.param(s, marks=() if s == "community" else SLOW) for s in dsa_styles.STYLES])
def test_dynamic_decode_matches_hooks(style, one_thread):
    """Default dynamic=None: the second call recompiles with symbolic lengths and serves every later
    step. The plan must hold there too, and no S-layer indexer op stays in any graph (the community
    style's attribute cache grows by a symbolic length: handed out as torch.empty of that length)."""
    net, want, got = run_both(style, "eager", dynamic=None)
    assert_close(want, got)
    results = ic_compile.backend.last_results
    assert len(results) <= 3 and all(r.changed for r in results)
    assert any(is_symbolic(example_value(p)) for r in results for p in r.gm.graph.find_nodes(op="placeholder"))
    assert [s_layer_leftovers(net, r) for r in results] == [{1: [], 2: []}] * len(results)
