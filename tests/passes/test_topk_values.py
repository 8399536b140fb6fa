"""Indexers whose top-k *values* are used too (a model weighting or dropping picks by score): the
F indexer still becomes one fused call, ic::indexer_topk_scored, whose picked scores stand in for
the values -- in the model's dtype, and in empty slots (a row with fewer allowed keys than topk)
the model's own masked value: -inf, a where's fill, an additive mask's finfo.min."""

import pytest
import torch

import ic_compile
from ic_compile.passes.lower_indexer import lowered_indexer
from tiny_models import TOPK, ValuesModel


@pytest.mark.parametrize("mask_style", ["fill", "additive", "where"])
@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_values_used_lowered_and_equal(mask_style, lowering):
    torch.manual_seed(0)
    model, x = ValuesModel(mask_style).eval(), torch.randn(2, 12, 16)
    graph = ic_compile.capture_graphs(model, (x,))[0]
    result = ic_compile.rewrite(graph, "FF", kernels=True)
    calls = [n for n in result.gm.graph.nodes if n.target is lowered_indexer]
    assert result.kernels.lowered == [0, 1] and all(n.kwargs.get("scored") for n in calls)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="indexcache", options={"plan": "FF", "lowering": lowering,
                                                                  "kernels": True})(x)
    for w, g in zip(want[1:], got[1:]):  # the values: dtype, -inf / fill in empty slots, scores
        assert g.dtype == w.dtype and torch.equal(torch.isinf(g), torch.isinf(w))
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_values_of_a_shared_layer_are_its_f_sources():
    """An S layer reading values gets the F layer's picked scores, as the hooks oracle gives."""
    from ic_compile.reference import shared_indexer_hooks

    torch.manual_seed(0)
    model, x = ValuesModel("fill").eval(), torch.randn(2, 12, 16)
    with torch.no_grad(), shared_indexer_hooks(model, "FS", list(model.layers)):
        want = model(x)
    with torch.no_grad():
        got = torch.compile(model, backend="indexcache", options={"plan": "FS", "lowering": "eager",
                                                                  "kernels": True})(x)
    torch.testing.assert_close(got[2], got[1])  # S's values are F's
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_style,reason", [("tensor", "fill is a tensor"), ("shifted", "constant is added")])
def test_values_the_op_cannot_give_are_not_lowered(mask_style, reason):
    """where(allowed, scores, <a tensor>): the values in empty slots cannot be told; a constant added to
    the scores: the op's values would lack it. Left alone, with the reason."""
    model, x = ValuesModel(mask_style), torch.randn(1, 12, 16)
    with pytest.warns(ic_compile.UnloweredIndexerWarning, match=reason):
        result = ic_compile.rewrite(ic_compile.capture_graphs(model, (x,))[0], "FF", kernels=True)
    assert result.kernels.lowered == []
    assert all(reason in why for why in result.kernels.skipped.values())
