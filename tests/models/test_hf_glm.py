"""HF GlmMoeDsa: compiled(plan) == the same weights in a model built with index_topk_pattern=plan."""

import pytest
import torch

import ic_compile
from tiny_models import PLANS, glm, glm_with_plan, prefill_and_decode, random_ids

pytest.importorskip("transformers")


def compiled(model, plan, lowering="eager", **options):
    return torch.compile(model, backend="indexcache", options={"plan": plan, "lowering": lowering, **options})


@pytest.mark.parametrize("plan", PLANS)
def test_prefill_matches_native_plan_eager_lowering(plan):
    model, ids = glm(), random_ids()
    with torch.no_grad():
        want = glm_with_plan(model, plan)(ids, use_cache=False).logits
        got = compiled(model, plan)(ids, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("plan", ["FSFS", "FFSF"])
def test_prefill_matches_native_plan_inductor(plan):
    model, ids = glm(), random_ids()
    with torch.no_grad():
        want = glm_with_plan(model, plan)(ids, use_cache=False).logits
        got = compiled(model, plan, "inductor", verify=True)(ids, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4


def test_plan_really_changes_the_answer():
    """Guards the oracle tests: with topk < seq, sharing must change logits vs all-F."""
    model, ids = glm(), random_ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        shared = compiled(model, "FSSS")(ids, use_cache=False).logits
    assert (full - shared).abs().max().item() > 1e-3


@pytest.mark.parametrize("plan,lowering", [("FSFS", "eager"), ("FFSF", "inductor")])
def test_decode_matches_native_plan(plan, lowering):
    model, ids, steps = glm(), random_ids(seq=12), random_ids(seq=3, seed=2)
    want, oracle_cache = prefill_and_decode(glm_with_plan(model, plan), ids, steps)
    got, cache = prefill_and_decode(compiled(model, plan, lowering), ids, steps)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4
    # S layers never wrote their indexer key cache, like the native model
    for layer, role in enumerate(plan):
        keys = cache.layers[layer].indexer_keys
        if role == "S":
            assert keys is None or keys.numel() == 0
        else:
            assert keys.shape[1] == ids.shape[1] + steps.shape[1]


def _left_padded_generate_kwargs() -> dict:
    """Greedy HF `generate` arguments for a batch of two, the second row left-padded by 5 tokens."""
    ids = random_ids(batch=2, seq=12)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0
    return dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("kernels", [False, True], ids=["graph", "fused_ops"])
def test_generate_with_left_padding_matches_native_plan(kernels):
    """The user's flow: a batch with a left-padded row through HF `generate` (greedy, KV cache),
    our backend compiling `forward`; tokens equal the native plan's, logits at every step close."""
    plan, kwargs = "FSFS", _left_padded_generate_kwargs()
    want = glm_with_plan(glm(), plan).generate(**kwargs)
    model = glm()
    model.forward = torch.compile(model.forward, backend="indexcache",
                                  options={"plan": plan, "kernels": kernels})
    got = model.generate(**kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for w, g in zip(want.logits, got.logits):
        assert (w - g).abs().max().item() < 1e-4


def test_generate_with_static_cache_and_cudagraphs_option_matches_native_plan():
    """The decode recipe of the README through HF `generate`: forward compiled with
    cudagraphs=True, a StaticCache from ic_compile.static_cache (made after compiling: its token
    runs eagerly, so the cache tensors are static addresses), a left-padded batch. (On CPU Inductor
    runs no CUDA graphs; tests/test_lower_indexer.py has the GPU version.)"""
    plan, kwargs = "FSFS", _left_padded_generate_kwargs()
    native = glm_with_plan(glm(), plan)
    want = native.generate(**kwargs, cache=ic_compile.static_cache(native, 2, 24))
    model = glm()
    model.forward = torch.compile(model.forward, backend="indexcache", options={"plan": plan, "cudagraphs": True})
    cache = ic_compile.static_cache(model, 2, 24)
    assert all(getattr(t, "_dynamo_static_input_type", None)
               for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))
    ic_compile.backend.last_results.clear()
    got = model.generate(**kwargs, cache=cache, disable_compile=True)  # no HF compile around ours (CUDA)
    assert [r.changed for r in ic_compile.backend.last_results] == [True, True]  # prefill, decode: ours
    assert torch.equal(got.sequences, want.sequences)
    for w, g in zip(want.logits, got.logits):
        assert (w - g).abs().max().item() < 1e-4


def test_bf16_runs_and_matches():
    model, ids = glm(dtype=torch.bfloat16), random_ids()
    with torch.no_grad():
        want = glm_with_plan(model, "FSFS")(ids, use_cache=False).logits.float()
        got = compiled(model, "FSFS")(ids, use_cache=False).logits.float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 1e-2


def test_eager_attention_path_matches():
    model, ids = glm(attn="eager"), random_ids()
    with torch.no_grad():
        want = glm_with_plan(model, "FSSF")(ids, use_cache=False).logits
        got = compiled(model, "FSSF")(ids, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4


def test_entry_point_backend_needs_no_import():
    import subprocess
    import sys
    code = ("import torch, torch._dynamo; from torch._dynamo.backends.registry import lookup_backend;"
            "import sys; fn = lookup_backend('indexcache'); print(fn.__module__);"
            "print('ic_compile' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ic_compile.backend", "True"]


def test_explain_reports_layers_and_removed_nodes():
    model, ids = glm(), random_ids()
    report = ic_compile.explain(model, {"input_ids": ids, "use_cache": False}, plan="FSFS")
    data = report.to_dict()
    assert [(l["layer"], l["role"], l["source"]) for l in data["layers"]] == [
        (0, "F", 0), (1, "S", 0), (2, "F", 2), (3, "S", 2)]
    assert data["removed_nodes"] > 0
    assert data["removed_nodes"] == sum(l["removed_nodes"] for l in data["layers"])
    assert "FSFS" in str(report) and "model.layers.1.self_attn.indexer" in str(report)


def test_explain_with_cache_reports_dropped_key_cache():
    from transformers import DynamicCache
    model, ids = glm(), random_ids()
    report = ic_compile.explain(model, {"input_ids": ids, "use_cache": True,
                                        "cache": DynamicCache(config=model.config)}, plan="FSSF")
    assert report.key_cache_dropped == [1, 2] and report.key_cache_kept == []


def _kernels_asked(monkeypatch):
    """(model, HF's FSFS plan of it, the model compiled with kernels=True), the backend's one-time
    warnings re-armed."""
    monkeypatch.setattr(ic_compile.backend, "_warned_kernels_off", set())
    model = glm()
    torch._dynamo.reset()
    ic_compile.backend.last_results.clear()
    run = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": "eager", "kernels": True})
    return model, glm_with_plan(model, "FSFS"), run


def test_kernels_under_autocast_fall_back_loudly(monkeypatch):
    """kernels=True called under torch.autocast: our ops have no autocast rules (the CPU references
    raised on the bf16 logits autocast made), so the graph keeps the model's own ops with one warning
    saying why; prefill and decode equal HF's own plan under the same autocast."""
    model, oracle, run = _kernels_asked(monkeypatch)
    ids, more = random_ids(batch=1, seq=12), random_ids(batch=1, seq=8, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="under torch.autocast"):
        got = prefill_and_decode(run, ids, more)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = prefill_and_decode(oracle, ids, more)[0]
    results = [r for r in ic_compile.backend.last_results if r.changed]
    assert results and not any(r.kernels.lowered or r.kernels.decode_linears for r in results)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w)


def test_autocast_entered_in_the_graph_is_seen():
    """A model that enters autocast itself (a node of the traced graph) counts too; one that turns it
    off (HF's rotary embedding does) does not."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    def inner(x, enabled):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            return x @ x

    for enabled in (True, False):
        torch.compile(lambda x: inner(x, enabled), backend=capture)(torch.randn(4, 4))
    assert [ic_compile.backend._under_autocast(gm, ex) for gm, ex in graphs] == [True, False]


def test_kernels_with_gradients_fall_back_loudly(monkeypatch):
    """kernels=True in a graph compiled with gradients on (training): our ops have no backward, so the
    graph keeps the model's own ops (the plan still applies), with one warning saying why; the
    gradients equal those of HF's own plan."""
    model, oracle, run = _kernels_asked(monkeypatch)
    ids = random_ids(batch=1, seq=3)  # few enough rows that the decode-only ops would be used
    with pytest.warns(UserWarning, match="compiled with gradients on"):
        run(ids, use_cache=False).logits.sum().backward()
    oracle(ids, use_cache=False).logits.sum().backward()
    (result,) = ic_compile.backend.last_results
    assert result.changed and not result.kernels.lowered and not result.kernels.decode_linears
    theirs = dict(oracle.named_parameters())  # HF's plan has no S-layer indexer weights
    compared = 0
    for name, mine in model.named_parameters():
        if name in theirs and theirs[name].grad is not None:
            torch.testing.assert_close(mine.grad, theirs[name].grad, msg=name)
            compared += 1
    assert compared > 20
