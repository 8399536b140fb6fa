"""A plan-compiled model never runs un-rewritten frames unnoticed: past Dynamo's recompile limit a
frame falls back to its original code (every indexer full). With default settings a decode loop
does not get there; when it does, the backend raises."""

import pytest
import torch

import dsa_styles as ds
import ic_compile
from ic_compile.frames import RecompileLimitError, RecompileLimitWarning
from ic_compile.reference import shared_indexer_hooks
from tiny_models import deepseek_v32, prefill_and_decode, random_ids

STEPS = 10


def test_default_decode_loop_matches_hooks_at_every_step(one_thread, recwarn):
    """Default options, default torch.compile (dynamic=None): prefill + 10 decode steps, each equal
    to the forward-hook oracle, in a few compiles (prefill, first decode, symbolic decode) — far
    from the recompile limit (8), however long the loop runs."""
    model, ids, steps = deepseek_v32(), random_ids(seq=12), random_ids(seq=STEPS, seed=3)
    with shared_indexer_hooks(model, "FSSF"):
        want, _ = prefill_and_decode(model, ids, steps)
    ic_compile.backend.last_results.clear()
    got, _ = prefill_and_decode(torch.compile(model, backend="indexcache", options={"plan": "FSSF"}), ids, steps)
    assert len(got) == STEPS + 1
    assert [round((w - g).abs().max().item(), 4) for w, g in zip(want, got)] == [0.0] * (STEPS + 1)
    assert all(r.changed for r in ic_compile.backend.last_results)
    assert len(ic_compile.backend.last_results) <= 3
    assert not [w for w in recwarn if issubclass(w.category, RecompileLimitWarning)]


def test_static_shapes_past_the_recompile_limit_raise(one_thread):
    """dynamic=False: every decode step is a new shape, so a new compile; the limit (3 here, 8 by
    default) is reached after a few steps. The last allowed compile warns; the next one raises
    instead of silently running the model without the plan."""
    net, prompt, steps = ds.model("community"), ds.tokens(), ds.tokens(seq=STEPS, seed=2)
    fast = torch.compile(net, backend="indexcache", options={"plan": "FSFS", "lowering": "eager"}, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=3):
        with pytest.warns(RecompileLimitWarning, match=r"compiled 3 times, torch._dynamo.config.recompile_limit; "
                                                       r"the next new shape will raise RecompileLimitError"):
            with pytest.raises(RecompileLimitError) as error:
                ds.prefill_and_decode(fast, net, prompt, steps)
    text = str(error.value)
    assert "hit torch._dynamo.config.recompile_limit (3)" in text
    assert "'forward'" in text and "plan FSFS" in text
    assert "every indexer full, the plan silently ignored" in text
    assert "dynamic=None" in text and "mark_dynamic" in text


def test_recompile_limit_of_other_frames_keeps_dynamo_behaviour(one_thread):
    """A frame without a plan (no indexer) past the limit falls back as Dynamo always did."""
    def double(x):
        return x * 2

    fast = torch.compile(double, backend="indexcache", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), pytest.warns(UserWarning, match="no lightning indexer"):
        outs = [fast(torch.ones(n)) for n in range(1, 5)]
    assert [o.sum().item() for o in outs] == [2.0, 4.0, 6.0, 8.0]
