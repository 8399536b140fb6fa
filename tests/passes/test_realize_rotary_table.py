"""passes/realize_rotary_table.py: HF GLM-DSA's rotary cos / sin are computed by one kernel per compiled
graph instead of inside every layer's RoPE kernel (Inductor's real generated code is read), answers
unchanged over a prefill and 8 decode steps; a table with a single user, eager lowering and a torch
without the realize op leave the graph as it was."""

import re

import pytest
import torch
from torch import fx
from torch._inductor.utils import run_and_get_code

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes import realize_rotary_table as pass_module
from ic_compile.passes.manager import PassContext

pytest.importorskip("transformers")


def _trig_sites(code: str, fn: str) -> int:
    """Places the generated code evaluates fn (C++: `tmp.cos()` vectorised or `std::cos(tmp)`; Triton:
    `libdevice.cos(tmp)` / `tl_math.cos(tmp)`)."""
    return len(re.findall(rf"\b{fn}\(|\.{fn}\(\)", code))


def _compile_and_run(model, lowering="inductor", steps=8):
    torch._dynamo.reset()
    last_results.clear()
    fn = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": lowering, "kernels": True})
    ids, more = tiny_models.random_ids(1, seq=20), tiny_models.random_ids(1, seq=steps, seed=5)
    (logits, _), codes = run_and_get_code(lambda: tiny_models.prefill_and_decode(fn, ids, more))
    want = tiny_models.prefill_and_decode(tiny_models.glm_with_plan(model, "FSFS"), ids, more)[0]
    gap = max((w - g).abs().max().item() for w, g in zip(want, logits))
    return gap, codes


def test_hf_glm_trig_once_per_graph(monkeypatch):
    model = tiny_models.glm()
    gap, codes = _compile_and_run(model)
    assert gap < 1e-4
    assert codes and all(_trig_sites(code, "cos") == 1 and _trig_sites(code, "sin") == 1 for code in codes), \
        [(_trig_sites(c, "cos"), _trig_sites(c, "sin")) for c in codes]
    assert [r.counters["realize_rotary_table.realized"] for r in last_results if r.changed] == [2] * len(codes)

    monkeypatch.setattr(pass_module, "_realize_op", lambda: None)  # a torch without the op: nothing done
    gap, codes = _compile_and_run(model, steps=1)
    assert gap < 1e-4
    assert all(_trig_sites(code, "cos") > 1 for code in codes)  # each layer's RoPE kernel computes its own


def test_eager_lowering_has_no_realize():
    _compile_and_run(tiny_models.glm(), lowering="eager", steps=1)
    assert not any(r.counters["realize_rotary_table.realized"] for r in last_results)


def test_single_user_table_left_fused():
    """A cos used once (a per-layer table) stays inside its consumer's kernel; a shared sin (through a
    constant scale and a cast) is realized where that chain ends."""
    def per_layer_and_shared(x, position):
        own = (position * 2.0).cos() * x  # one user
        shared = (0.5 * (position * 3.0).sin()).to(torch.float32)  # the scale first: either order
        return own + shared * x, shared - x

    gm = fx.symbolic_trace(per_layer_and_shared)
    for node in gm.graph.nodes:  # the pass reads example values
        node.meta["val"] = torch.empty(4)
    ctx = PassContext(kernels=True)
    pass_module.realize_rotary_table(gm, ctx)
    gm.recompile()
    realized = [n for n in gm.graph.nodes if n.target is torch.ops._inductor_test.realize.default]
    assert ctx.counters["realize_rotary_table.realized"] == 1 and len(realized) == 1
    assert realized[0].args[0].target == "to" and len(realized[0].users) == 2
    x, position = torch.randn(4), torch.randn(4)
    for got, want in zip(gm(x, position), per_layer_and_shared(x, position)):
        torch.testing.assert_close(got, want)
