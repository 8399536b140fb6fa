"""Decode under dynamic shapes: every layer's key length may carry its own symbol (HF DynamicCache,
attribute caches grown by cat), so each layer traces its own `min(index_topk, T)` node. Sharing
needs equal values, not equal symbols; a real mismatch is an error that shows the values."""

import dataclasses

import pytest
import torch

import dsa_styles as ds
from ic_compile.plan import PlanError
from tiny_models import glm, glm_with_plan, prefill_and_decode, random_ids

STEPS = 10


def compiled(net, plan, lowering, dynamic):
    return torch.compile(net, backend="indexcache", options={"plan": plan, "lowering": lowering}, dynamic=dynamic)


def max_errors(want, got):
    return [(w - g).abs().max().item() for w, g in zip(want, got)]


@pytest.mark.parametrize("dynamic,lowering", [(True, "eager"), (None, "inductor")])
def test_per_layer_cache_lengths_decode_matches_hooks(dynamic, lowering, one_thread):
    """Community style: each layer's key cache is its own attribute, its length its own symbol, and
    the indexer selects min(index_topk, that length) keys (before the fix: PlanError 'k=sym_min_1
    ... k=sym_min')."""
    net, prompt, steps = ds.model("community"), ds.tokens(), ds.tokens(seq=STEPS, seed=2)
    want = ds.hooked_prefill_and_decode(net, "FSFS", prompt, steps)
    got = ds.prefill_and_decode(compiled(net, "FSFS", lowering, dynamic), net, prompt, steps)
    assert len(got) == STEPS + 1
    assert max(max_errors(want, got)) < 1e-4


def test_glm_dynamic_decode_matches_native_plan(one_thread):
    model, ids, steps = glm(), random_ids(seq=12), random_ids(seq=STEPS, seed=2)
    want, _ = prefill_and_decode(glm_with_plan(model, "FSSF"), ids, steps)
    got, _ = prefill_and_decode(compiled(model, "FSSF", "eager", True), ids, steps)
    assert max(max_errors(want, got)) < 1e-4


def test_different_k_under_dynamic_shapes_names_the_values(one_thread):
    """Layer 1 keeps 5 keys, its source layer 0 keeps 6: both are min(index_topk, T) of a symbolic
    T, a real mismatch. The error gives the values, not the sym_min node names."""
    net, prompt = ds.model("community"), ds.tokens()
    net.layers[1].attn.indexer.args = dataclasses.replace(net.layers[1].attn.indexer.args, index_topk=5)
    with pytest.raises(Exception, match=r"layer 1 selects k=5 \(symbolic .*\) keys but its source layer 0 "
                                        r"selects k=6 \(symbolic .*\); sharing needs the same k"):
        ds.prefill_and_decode(compiled(net, "FSFS", "eager", True), net, prompt, ds.tokens(seq=1, seed=2))


def test_different_k_static_is_still_an_error(one_thread):
    net, prompt = ds.model("community"), ds.tokens()
    net.layers[1].attn.indexer.args = dataclasses.replace(net.layers[1].attn.indexer.args, index_topk=5)
    with pytest.raises(Exception, match=r"layer 1 selects k=5 keys but its source layer 0 selects k=6"):
        with torch.no_grad():
            compiled(net, "FSFS", "eager", False)(prompt, 0)
    assert issubclass(PlanError, ValueError)
