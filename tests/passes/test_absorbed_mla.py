"""Absorbed MLA lowering: the k/v matcher (match_latent_kv) and the absorbed computation itself."""

import pytest
import torch
import torch.nn.functional as F

import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
from ic_compile.passes.graph_ops import op_name
from ic_compile.passes.lower_sparse_attention import lowered_absorbed_mla
from ic_compile.passes.match_latent_kv import match_latent_kv

B, T, H, DL, DN, DV, DR = 2, 9, 3, 16, 8, 12, 4


def mla_cat(q, latent, rope, weight):
    """DeepSeek-style expansion, key built with cat."""
    kv = F.linear(latent, weight).view(B, T, -1, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    k = torch.cat((k_nope, rope.expand(-1, H, -1, -1)), dim=-1)
    return F.scaled_dot_product_attention(q, k, v)


def mla_buffer(q, latent, rope, weight):
    """HF 5.x `expand_kv`: key filled into a new_empty buffer by two copy_."""
    kv = F.linear(latent, weight).view(B, T, -1, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    k = kv.new_empty(B, H, T, DN + DR)
    k[..., :DN].copy_(k_nope)
    k[..., DN:].copy_(rope.expand(-1, H, -1, -1))
    return F.scaled_dot_product_attention(q, k, v)


def per_head_rope(q, latent, rope, weight):
    """Rope key differs per head: not a shared latent row, must not be absorbed."""
    kv = F.linear(latent, weight).view(B, T, -1, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    k = torch.cat((k_nope, rope.expand(-1, H, -1, -1) * torch.arange(1.0, H + 1)[:, None, None]), dim=-1)
    return F.scaled_dot_product_attention(q, k, v)


def latent_written_after_expansion(q, latent, rope, weight):
    """The latent's storage changes between the expansion and the attention (a cache written in
    place, say): absorbed attention would read the new values, so it must not be absorbed."""
    kv = F.linear(latent, weight).view(B, T, -1, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    k = torch.cat((k_nope, rope.expand(-1, H, -1, -1)), dim=-1)
    latent[..., :2].zero_()
    return F.scaled_dot_product_attention(q, k, v)


def rope_written_after_expansion(q, latent, rope, weight):
    kv = F.linear(latent, weight).view(B, T, -1, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    k = torch.cat((k_nope, rope.expand(-1, H, -1, -1)), dim=-1)
    rope.mul_(2)
    return F.scaled_dot_product_attention(q, k, v)


def latent_written_before_expansion(q, latent, rope, weight):
    """Written before the linear: both forms read the same values, absorbing is fine."""
    latent[..., :2].zero_()
    return mla_cat(q, latent, rope, weight)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, DN + DR, generator=g), torch.randn(B, 1, T, DL, generator=g),
            torch.randn(B, 1, T, DR, generator=g), torch.randn(H * (DN + DV), DL, generator=g) / 4)


def traced(fn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs())
    return graphs[0]


def sdpa_args(gm):
    sdpa = next(n for n in gm.graph.nodes if op_name(n) == "scaled_dot_product_attention")
    return sdpa.args[1], sdpa.args[2]


@pytest.mark.parametrize("fn", [mla_cat, mla_buffer])
def test_matcher_finds_the_shared_latent(fn):
    gm = traced(fn)
    found = match_latent_kv(*sdpa_args(gm))
    assert found is not None and found.nope_dim == DN
    assert found.latent.op == "placeholder"


def test_matcher_rejects_per_head_rope():
    assert match_latent_kv(*sdpa_args(traced(per_head_rope))) is None


def _sdpa(gm):
    return next(n for n in gm.graph.nodes if op_name(n) == "scaled_dot_product_attention")


@pytest.mark.parametrize("fn", [latent_written_after_expansion, rope_written_after_expansion])
def test_matcher_rejects_latent_written_before_the_attention(fn):
    gm = traced(fn)
    write = next(n for n in gm.graph.nodes if op_name(n) in ("zero_", "mul_"))
    assert match_latent_kv(*sdpa_args(gm), reader=write) is not None  # read before the write: fine
    assert match_latent_kv(*sdpa_args(gm), reader=_sdpa(gm)) is None


def test_matcher_accepts_latent_written_before_the_expansion():
    gm = traced(latent_written_before_expansion)
    assert match_latent_kv(*sdpa_args(gm), reader=_sdpa(gm)) is not None


def _selected_attention_case(S: int):
    """The last S of T queries, K causal picks each (the first rows have fewer: -1 slots) -> the
    lowering's inputs and SDPA over the expanded heads restricted to the picks."""
    q, latent, rope, weight = inputs(seed=3)
    q = q[:, :, T - S:]
    K = 5
    g = torch.Generator().manual_seed(4)
    idx = torch.full((B, S, K), -1)
    for b in range(B):
        for s in range(S):
            picks = torch.randperm(T - S + s + 1, generator=g)[:K]
            idx[b, s, : len(picks)] = picks
    allowed = torch.zeros(B, S, T, dtype=torch.bool)
    allowed.scatter_(-1, torch.where(idx >= 0, idx, idx[..., :1]).long(), True)  # slot 0 is always a pick
    scale = (DN + DR) ** -0.5
    kv = F.linear(latent, weight).view(B, T, -1, DN + DV).transpose(1, 2)
    k_nope, v = torch.split(kv, [DN, DV], dim=-1)
    k = torch.cat((k_nope, rope.expand(-1, H, -1, -1)), dim=-1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    return (q, latent, rope, weight, idx.to(torch.int32), scale, DN), want


def test_absorbed_equals_expanded_attention_over_selected_keys():
    args, want = _selected_attention_case(S=T)
    torch.testing.assert_close(lowered_absorbed_mla(*args), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("S", [T, 6], ids=["all_queries", "last_queries"])
def test_absorbed_in_query_chunks_equals_whole(S, monkeypatch):
    """Long prefill runs in query chunks (each sees the keys up to its own last query): same rows."""
    import ic_compile.passes.lower_sparse_attention as lowering

    args, want = _selected_attention_case(S)
    whole = lowered_absorbed_mla(*args)
    monkeypatch.setattr(lowering, "_QUERY_CHUNK", 4)  # S = 9 -> chunks [0,4) [4,8) [8,9); S = 6 -> two
    chunked = lowered_absorbed_mla(*args)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, want, rtol=1e-5, atol=1e-5)


def _sources(node, placeholders):
    """The placeholders `node` is computed from (through any ops)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return {p.name for p in placeholders if p in seen}


def test_absorbed_mla_hands_the_op_latent_and_rope_apart():
    """The op reads the key row from the two cache buffers: a cat of latent and rope would copy the
    whole cache of each layer at every decode step; the query's latent and rope parts go apart too
    (their cat is a [B,S,H,576] copy: 4.3 GiB at a 200K prefill). No cat is left at all."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, latent, rope, weight = inputs()
    idx = torch.zeros(B, T, 5, dtype=torch.int32)
    gm = make_fx(lambda q, latent, rope, weight, idx: lowered_absorbed_mla(q, latent, rope, weight, idx, 0.3, DN))(
        q, latent, rope, weight, idx)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    latent_ph, rope_ph = placeholders[1].name, placeholders[2].name
    cats = [n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert cats == []
    (op,) = [n for n in gm.graph.nodes if n.target is torch.ops.ic.sparse_mla.default]
    kv, rope_arg = op.args[1], op.kwargs.get("rope", op.args[6] if len(op.args) > 6 else None)
    assert _sources(kv, placeholders) == {latent_ph} and _sources(rope_arg, placeholders) == {rope_ph}
