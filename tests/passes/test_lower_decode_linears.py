"""Bias-free linears of one few-token input become one ic::multi_linear call (passes/lower_decode_linears.py,
CPU reference here): HF GLM-DSA decode graphs group q_a / kv_a / the indexer's wk (F layers), q_b / the
indexer's wq_b, the dense MLP's gate / up; at one token every other linear is taken alone (o_proj, the
routers' fp32 logits of a bf16 weight, ...) up to a weight size; prefill graphs, linears with a bias and
symbolic shapes are left alone; prefill and 8 decode steps equal HF's own plan."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tiny_models
from ic_compile.backend import last_results
from ic_compile.passes import lower_decode_linears
from ic_compile.passes.fold_rms_norm import lowered_norm_multi_linear
from ic_compile.passes.lower_decode_linears import lowered_multi_linear

pytest.importorskip("transformers")


def _compiled(model, lowering="eager", **options):
    torch._dynamo.reset()
    last_results.clear()
    return torch.compile(model, backend="indexcache",
                         options={"plan": "FSFS", "lowering": lowering, "kernels": True, **options})


def _logits_gap(want_model, got_model, steps=8, batch=2):
    ids, more = tiny_models.random_ids(batch, seq=20), tiny_models.random_ids(batch, seq=steps, seed=5)
    want = tiny_models.prefill_and_decode(want_model, ids, more)[0]
    got = tiny_models.prefill_and_decode(got_model, ids, more)[0]
    return max((w.float() - g.float()).abs().max().item() for w, g in zip(want, got))


def _groups(result):
    return [sorted(path.rsplit(".", 1)[-1] for path in group) for group in result.kernels.decode_linears]


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_hf_decode_groups(lowering):
    model = tiny_models.glm()
    assert _logits_gap(tiny_models.glm_with_plan(model, "FSFS"), _compiled(model, lowering)) < 1e-4
    results = [r for r in last_results if r.changed]
    prefill = [r for r in results if not r.kernels.decode_linears]
    decode = [r for r in results if r.kernels.decode_linears]
    assert len(prefill) == 1 and decode  # 20 prompt tokens: cuBLAS keeps the prefill's GEMMs
    f_layer = [["kv_a_proj_with_mqa", "q_a_proj", "wk"], ["q_b_proj", "wq_b"]]
    for result in decode:
        # layer 0 (F, dense MLP), 1 (S), 2 (F), 3 (S): the S layers have no indexer left to merge
        assert _groups(result) == [*f_layer, ["gate_proj", "up_proj"], ["kv_a_proj_with_mqa", "q_a_proj"],
                                   *f_layer, ["kv_a_proj_with_mqa", "q_a_proj"]], _groups(result)
        # (fold_rms_norm turns a call whose input is a norm read by it alone into one with the norm inside)
        calls = [n for n in result.gm.graph.nodes if n.target in (lowered_multi_linear, lowered_norm_multi_linear)]
        assert len(calls) == 7  # two rows: a linear without siblings keeps cuBLAS
        assert not any(n.op == "call_function" and getattr(n.target, "__name__", "") == "linear"
                       and n.args[0] is call.args[0] for call in calls for n in result.gm.graph.nodes)


def _linears_left(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "linear"]


def test_one_token_takes_lone_linears():
    """Batch 1: every linear of the decode graph runs in the op, the lone ones one per launch."""
    model = tiny_models.glm()
    assert _logits_gap(tiny_models.glm_with_plan(model, "FSFS"), _compiled(model), batch=1) < 1e-4
    decode = [r for r in last_results if r.changed and r.kernels.decode_linears]
    assert decode
    for result in decode:
        lone = [path for group in result.kernels.decode_linears if len(group) == 1 for path in group]
        assert lone == ["model.layers.0.self_attn.indexer.weights_proj", "model.layers.0.self_attn.o_proj",
                        "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_b_proj",
                        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate",
                        "model.layers.2.self_attn.indexer.weights_proj", "model.layers.2.self_attn.o_proj",
                        "model.layers.2.mlp.gate", "model.layers.3.self_attn.q_b_proj",
                        "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.gate", "lm_head"], lone
        assert not _linears_left(result.gm)


class _RouterAndProjection(nn.Module):
    """A router's fp32 logits of a bf16 weight (HF: linear(h.float(), W.float())), an fp32 linear of the
    same fp32 input (another weight dtype: its own launch) and a bf16 projection."""

    def __init__(self, width=64, experts=8, rows=96):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, width, dtype=torch.bfloat16))
        self.fp32_proj = nn.Linear(width, 16, bias=False)
        self.proj = nn.Linear(width, rows, bias=False, dtype=torch.bfloat16)

    def forward(self, h):  # h [1,1,width] bf16 -> [1,experts] fp32, [1,16] fp32, [1,1,rows] bf16
        h32 = h.reshape(-1, h.shape[-1]).float()
        return F.linear(h32, self.weight.float()), self.fp32_proj(h32), self.proj(h)


def _pass_backend(graphs: list):
    """A torch.compile backend running the pass alone on Dynamo's graph; appends (gm, its groups)."""
    from ic_compile.passes.lower_indexer import LoweringReport
    from ic_compile.passes.manager import PassContext

    def backend(gm, example_inputs):
        ctx = PassContext(kernels=True)
        ctx.report = LoweringReport()
        lower_decode_linears.lower_decode_linears(gm, ctx)
        gm.recompile()
        graphs.append((gm, ctx.report.decode_linears))
        return gm.forward

    return backend


def test_fp32_logits_of_a_bf16_weight_and_the_size_limit(monkeypatch):
    """The pass on Dynamo's graph of the module: the op reads the bf16 router weight and upcasts it
    (the same fp32 sums as the module's), the fp32 weight of the same input goes to a launch of its own;
    a lone weight above the size limit keeps cuBLAS."""
    module, h = _RouterAndProjection(), torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = module(h)
        # the root module's own linear is named by its node ("linear"), the projection by its path
        for limit, lowered in ((1 << 20, ["fp32_proj", "linear", "proj"]), (96 * 64 * 2 - 1, ["fp32_proj", "linear"])):
            monkeypatch.setattr(lower_decode_linears, "_LONE_MAX_BYTES", limit)
            graphs = []
            torch._dynamo.reset()
            got = torch.compile(module, backend=_pass_backend(graphs))(h)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            ((gm, groups),) = graphs
            assert sorted(path.rsplit(".", 1)[-1] for group in groups for path in group) == lowered, groups
            assert all(len(group) == 1 for group in groups)  # fp32 and bf16 weights of h32: two launches
            assert len(_linears_left(gm)) == 3 - len(lowered)


class _WrittenBetween(nn.Module):
    """Two projections of x with x updated in place between them (hand-written code's `x += ...`)."""

    def __init__(self, width=64):
        super().__init__()
        self.q = nn.Linear(width, 32, bias=False)
        self.k = nn.Linear(width, 16, bias=False)

    def forward(self, x):
        x = x * 1.0  # an intermediate (Dynamo keeps in-place writes to it in the graph)
        q = self.q(x)
        x.add_(1.0)
        return q, self.k(x)


def test_input_written_in_place_is_left_alone():
    """One read at the first linear would give the second one the value before the write."""
    module, x = _WrittenBetween(), torch.randn(1, 64)
    with torch.no_grad():
        want = module(x.clone())
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend=_pass_backend(graphs))(x.clone())
    assert [groups for _, groups in graphs] == [[]], graphs
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
