"""Indexer detection on hand-written variants; routers, non-indexers and unsure graphs."""


import pytest
import torch
from torch import nn

import ic_compile
from ic_compile.passes.detect_indexers import detect_indexers
from tiny_models import glm, random_ids


class Indexer(nn.Module):
    """One lightning indexer written in a chosen style."""

    def __init__(self, style, dim=16, heads=2, head_dim=8, k=3):
        super().__init__()
        self.style, self.heads, self.head_dim, self.k = style, heads, head_dim, k
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.ww = nn.Linear(dim, heads, bias=False)

    def forward(self, x):  # x [B, T, dim]
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim)  # [B,T,H,D]
        k = self.wk(x)  # [B,T,D]
        w = self.ww(x)  # [B,T,H]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        if self.style == "einsum_clamp_sum":
            s = torch.einsum("bshd,btd->bsht", q, k).clamp_min(0) * 0.5
            scores = (s * w[..., None]).sum(dim=2)
            scores = scores.masked_fill(~causal, float("-inf"))
        elif self.style == "matmul_relu_bmm":
            s = torch.relu(torch.matmul(q.float() * 0.5, k.transpose(-1, -2).float().unsqueeze(1)))
            scores = torch.matmul(w.float().unsqueeze(-2), s).squeeze(-2)
            scores = scores + torch.zeros(t, t).masked_fill(~causal, float("-inf"))
        elif self.style == "operator_clamp":
            s = torch.clamp(q.transpose(1, 2) @ k.unsqueeze(1).transpose(-1, -2), min=0)  # [B,H,T,T]
            scores = (s * w.transpose(1, 2)[..., None]).sum(1)
            scores = torch.where(causal, scores, torch.full_like(scores, float("-inf")))
        elif self.style == "no_relu":  # attention-like score: we do not know this one
            scores = torch.einsum("bshd,btd->bst", q, k)
        return scores.topk(self.k, dim=-1).indices


class Model(nn.Module):
    def __init__(self, styles, dim=16):
        super().__init__()
        self.layers = nn.ModuleList(Indexer(s, dim) for s in styles)
        self.router = nn.Linear(dim, 4)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x):
        out = 0
        for layer in self.layers:
            idx = layer(x)  # [B,T,k]
            picked = torch.gather(x, 1, idx[..., :1].expand(-1, -1, x.shape[-1]))
            x = x + self.mix(picked)
            experts = self.router(x).sigmoid().topk(2, dim=-1).indices  # a MoE-router topk
            out = out + experts.float().sum()
        return x, out


def graph_of(model, x):
    return ic_compile.capture_graphs(model, (x,))[0]


@pytest.mark.parametrize("style", ["einsum_clamp_sum", "matmul_relu_bmm", "operator_clamp"])
def test_variants_are_detected_and_routers_are_not(style):
    model, x = Model([style] * 3), torch.randn(2, 8, 16)
    detection = detect_indexers(graph_of(model, x))
    assert detection.confident
    assert [m.layer for m in detection.matches] == [0, 1, 2]
    assert len(detection.other_topk) == 3  # one router topk per layer, untouched


@pytest.mark.parametrize("style", ["einsum_clamp_sum", "matmul_relu_bmm", "operator_clamp"])
def test_variants_match_hooks_oracle(style):
    from ic_compile.reference import shared_indexer_hooks
    torch.manual_seed(0)
    model, x = Model([style] * 3), torch.randn(2, 8, 16)
    with torch.no_grad(), shared_indexer_hooks(model, "FSF", list(model.layers)):
        want = model(x)[0]
    with torch.no_grad():
        got = torch.compile(model, backend="indexcache", options={"plan": "FSF", "lowering": "eager"})(x)[0]
        full = model(x)[0]
    assert (got - want).abs().max() < 1e-5 and (full - want).abs().max() > 1e-4


def test_unknown_variant_leaves_graph_unchanged_and_warns():
    model, x = Model(["einsum_clamp_sum", "no_relu"]), torch.randn(2, 8, 16)
    with pytest.warns(ic_compile.DetectionUncertainWarning, match="product of two activations with no ReLU"):
        result = ic_compile.rewrite(graph_of(model, x), "FS")
    assert not result.changed and result.gm is result.original
    with pytest.raises(ic_compile.PlanError, match="left this graph unchanged"):
        ic_compile.rewrite(graph_of(model, x), "FS", strict=True)


def test_model_without_indexer_is_an_error():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(ic_compile.NoIndexerFoundError, match="no lightning indexer found"):
        ic_compile.explain(model, (torch.randn(2, 16),), plan="FS")
    fast = torch.compile(model, backend="indexcache", options={"plan": "FS"})
    with pytest.raises(Exception, match="Is this a DSA model"):
        fast(torch.randn(2, 16))


def test_no_plan_warns_that_nothing_is_shared():
    import ic_compile.backend as backend
    backend._warned_no_plan = False
    model, x = Model(["einsum_clamp_sum"] * 2), torch.randn(2, 8, 16)
    with pytest.warns(UserWarning, match="nothing is shared"):
        torch.compile(model, backend="indexcache", options={"lowering": "eager"})(x)


def test_hf_router_topk_untouched_and_one_indexer_per_f_layer():
    model, ids = glm(), random_ids()
    graph = ic_compile.capture_graphs(model, {"input_ids": ids, "use_cache": False})[0]
    before = detect_indexers(graph)
    routers = len(before.other_topk)
    assert routers == 3 * 3  # 3 MoE layers, 3 topk calls each (group scores, groups, experts)
    result = ic_compile.rewrite(graph, "FSSF")
    after = detect_indexers(result.gm)
    assert [m.layer for m in after.matches] == [0, 3]
    assert len(after.other_topk) == routers


def test_bad_options_and_plans_are_clear_errors():
    model, x = Model(["einsum_clamp_sum"] * 4), torch.randn(2, 8, 16)
    cases = [({"plan": "FSS"}, "has 3 layers but 4 indexer layers were detected"),
             ({"plan": "SFFF"}, "first indexer layer must be 'F'"),
             ({"plan": "FXSF"}, r"unknown characters \['X'\]"),
             ({"plan": "FSSF", "lowring": "eager"}, r"unknown indexcache option\(s\) \['lowring'\]"),
             ({"plan": "FSSF", "lowering": "tvm"}, "lowering='tvm' is not one of"),
             ({"plan": "FSSF", "indexer_mask": "tree"}, r"indexer_mask='tree' is not one of \('auto', 'ranges', 'dense'\)")]
    for options, message in cases:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            torch.compile(model, backend="indexcache", options=options)(x)


def traced_indexer(q, k, w, router_logits):  # q [B,S,H,D], k [B,T,D], w [B,S,H]
    scores = (torch.einsum("bshd,btd->bsht", q, k).relu() * w[..., None]).sum(dim=2)  # [B,S,T]
    return scores.topk(2, dim=-1).indices, router_logits.sigmoid().topk(2, dim=-1).indices


def router_only(x):
    return x.sigmoid().topk(2, dim=-1).indices


def test_detect_pass_fills_the_context_and_counts():
    from torch import fx

    from ic_compile.passes.detect_indexers import detect
    from ic_compile.passes.manager import PassContext

    ctx = PassContext()
    detect(fx.symbolic_trace(traced_indexer), ctx)
    assert len(ctx.detection.matches) == 1 and len(ctx.detection.other_topk) == 1 and not ctx.stopped
    assert ctx.counters["detect.indexers"] == 1 and ctx.counters["detect.other_topk"] == 1

    ctx = PassContext()
    detect(fx.symbolic_trace(router_only), ctx)  # nothing to rewrite: the pipeline ends here
    assert ctx.stopped.startswith("no lightning indexer found in a graph of 5 nodes (1 topk calls")
