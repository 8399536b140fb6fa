"""Every way the indexer's dims can be written reaches the fused op (passes/indexer_layout.py): the
heads found where they are reduced, not from shapes or the query's producers; the lowered graph's
top-k indices equal the model's own."""

import pytest
import torch
from torch import nn

import ic_compile
from ic_compile.passes.indexer_layout import relabel

H, D, DIM, K = 4, 8, 16, 6


def scores_of(form, q, k, w):
    """[B,S,T] scores from q [B,S,H,D], k [B,T,D], w [B,S,H], written as `form`."""
    if form == "einsum_weights":  # head sum as an einsum with the weights
        return torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q, k).relu(), w)
    if form == "einsum_head_major":
        return (torch.einsum("bshd,btd->bhst", q, k).relu() * w.transpose(1, 2)[..., None]).sum(1)
    if form == "einsum_head_major_weights":
        return torch.einsum("bhst,bsh->bst", torch.einsum("bshd,btd->bhst", q, k).relu(), w)
    if form == "no_batch":  # per sequence, vLLM's reference style: [H, S, T] scores
        scores = torch.einsum("mhd,nd->hmn", q[0], k[0]).relu()
        return (scores * w[0].transpose(0, 1).unsqueeze(-1)).sum(0)[None]
    if form == "matmul_indexed_keys":  # k[:, None] and a head sum over dim -2
        return (torch.matmul(q, k[:, None].transpose(-1, -2)).relu() * w[..., None]).sum(-2)
    if form == "matmul_mT":  # k.mT, HF's weights matmul
        return torch.matmul(w.unsqueeze(-2), (q @ k.mT.unsqueeze(1)).relu()).squeeze(-2)
    if form == "head_major_matmul":  # q.transpose(1, 2) @ keys: [B,H,S,T]
        scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).unsqueeze(1)).clamp(min=0)
        return (scores * w.transpose(1, 2).unsqueeze(-1)).sum(dim=1)
    if form == "twice_transposed_query":  # [B,S,H,D] reached through two transposes (DeepSeek-V4's rope)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        return (torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)).relu() * w.unsqueeze(-1)).sum(dim=2)
    if form == "merged_heads":  # q as [B, S*H, D]: queries and heads merged into one dim of the product
        B, S = q.shape[:2]
        return (torch.bmm(q.reshape(B, S * H, D), k.transpose(1, 2)).view(B, S, H, -1).relu() * w[..., None]).sum(2)
    if form == "merged_heads_no_batch":  # [S*H, D] @ [D, T], the weights summed by a matmul
        scores = torch.mm(q[0].reshape(-1, D), k[0].t()).view(q.shape[1], H, -1).relu()
        return torch.matmul(w[0].unsqueeze(-2), scores).squeeze(-2)[None]
    if form == "weights_before_relu":  # relu(w·x) is w·relu(x) only for w >= 0: not lowered
        return (torch.einsum("bshd,btd->bsht", q, k) * w[..., None]).relu().sum(2)
    if form == "shifted":  # a constant subtracted after the head sum: the same keys rank first
        return (torch.einsum("bshd,btd->bsht", q, k).relu() * w[..., None]).sum(2) - 1.0
    raise ValueError(form)


class Indexer(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.q, self.k, self.w = (nn.Linear(DIM, n, bias=False) for n in (H * D, D, H))

    def forward(self, x):
        B, T, _ = x.shape
        scores = scores_of(self.form, self.q(x).view(B, T, H, D), self.k(x), self.w(x).sigmoid())
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).topk(min(K, T), dim=-1).indices


class Model(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.layers = nn.ModuleList(Indexer(form) for _ in range(2))
        self.mix = nn.Linear(DIM, DIM)

    def forward(self, x):
        picks = []
        for layer in self.layers:
            idx = layer(x)  # [B,T,K], in descending score order: returned, so the order counts
            x = x + self.mix(torch.gather(x, 1, idx[..., :1].expand(-1, -1, x.shape[-1])))
            picks.append(idx)
        return x, *picks


LOWERED = ["einsum_weights", "einsum_head_major", "einsum_head_major_weights", "no_batch", "matmul_indexed_keys",
           "matmul_mT", "head_major_matmul", "twice_transposed_query", "merged_heads", "merged_heads_no_batch", "shifted"]


@pytest.mark.parametrize("form", LOWERED)
@pytest.mark.parametrize("seq", [4, 10], ids=["S_equals_H", "S_10"])  # S == H: shapes cannot tell them apart
def test_form_lowers_and_picks_the_models_keys(form, seq):
    torch.manual_seed(0)
    batch = 1 if "no_batch" in form else 2
    model, x = Model(form).eval(), torch.randn(batch, seq, DIM)
    result = ic_compile.rewrite(ic_compile.capture_graphs(model, (x,))[0], "FF", kernels=True)
    assert result.kernels.lowered == [0, 1], result.kernels.skipped
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="indexcache", options={"plan": "FF", "lowering": "eager",
                                                                  "kernels": True})(x)
    allowed = torch.arange(want[1].shape[-1]) <= torch.arange(seq)[:, None]  # [S,K]: slot < row's keys
    for w, g in zip(want[1:], got[1:]):  # the slots past a row's allowed keys hold masked keys (any)
        assert torch.equal(g[..., allowed], w[..., allowed])
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("form,reason", [("weights_before_relu", "weights applied before the ReLU")])
def test_form_not_taken_stays_and_is_said(form, reason):
    model, x = Model(form), torch.randn(2, 10, DIM)
    with pytest.warns(ic_compile.UnloweredIndexerWarning, match=r"layers \[0, 1\] run as the model wrote them"):
        result = ic_compile.rewrite(ic_compile.capture_graphs(model, (x,))[0], "FF", kernels=True)
    assert result.kernels.lowered == [] and result.changed
    assert all(reason in why for why in result.kernels.skipped.values())


def test_relabel_is_views_in_the_wanted_order():
    x = torch.randn(2, 3, 1, 5)
    assert torch.equal(relabel(x, "bh1s", "bsh"), x[:, :, 0].transpose(1, 2))
    y = relabel(torch.randn(3, 5), "hs", "bsh")
    assert y.shape == (1, 5, 3)
    assert relabel(torch.randn(1, 5, 6), "bst", "st").shape == (5, 6)  # a size-1 batch dropped


@pytest.mark.parametrize("form", ["no_batch", "head_major_matmul", "einsum_weights"])
def test_form_under_inductor_with_symbolic_lengths(form, one_thread):
    """One compile (dynamic=True) serves every length: the layouts' views take symbolic sizes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model(form).eval()
    ic_compile.backend.last_results.clear()
    run = torch.compile(model, backend="indexcache", dynamic=True,
                        options={"plan": "FF", "lowering": "inductor", "kernels": True})
    for seq in (9, 13):
        x = torch.randn(1, seq, DIM)
        with torch.no_grad():
            want, got = model(x), run(x)
        allowed = torch.arange(want[1].shape[-1]) <= torch.arange(seq)[:, None]
        for w, g in zip(want[1:], got[1:]):
            assert torch.equal(g[..., allowed], w[..., allowed])
    assert len(ic_compile.backend.last_results) == 1 and ic_compile.backend.last_results[0].kernels.lowered == [0, 1]


def test_explain_says_which_f_layers_the_fused_op_takes():
    """ic explain (CPU, before deploying): per F layer, whether the fused op takes its indexer, and why not."""
    x = torch.randn(1, 10, DIM)
    taken = ic_compile.explain(Model("head_major_matmul"), (x,), plan="FS")
    assert taken.fused_op == {0: ""} and "fused op" not in str(taken)
    left = ic_compile.explain(Model("weights_before_relu"), (x,), plan="FF")
    assert set(left.fused_op) == {0, 1} and all("before the ReLU" in why for why in left.fused_op.values())
    assert "F layer 1 runs as the model wrote it, not in the fused op: head weights applied before the ReLU" in str(left)
