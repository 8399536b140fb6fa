"""Pure-torch references for the ic-compile kernels (fp32 math, chunked over queries).

These define the semantics the Triton kernels are tested against, and are the
implementation used on CPU / when Triton is unavailable. Their loop-free, out-of-place parts
(`mask_indexer_scores`, `sparse_attention_rows`) are also what ic_compile/export.py decomposes
the custom ops into for ONNX, over all queries at once (no query-chunk loop: under a symbolic
sequence length its trip count would be specialised; no in-place op: torch.export's
run_decompositions rejects them).

Conventions shared by all ops:
  * queries are the LAST S positions of the T keys: query s sits at position (T - S) + s,
    so with causal=True key t is allowed for query s iff t <= (T - S) + s;
  * index -1 means "no key" (padding of a top-k row);
  * the indexer's allowed keys: the causal rule (causal=True), a bool mask broadcastable to
    [B,S,T], and/or per-query key ranges key_range int32 [B,S,3] = (lo, hi, count): key t is
    allowed iff count > 0 and lo <= t <= hi (kernels/key_range.py).
"""
from __future__ import annotations

import torch

from .key_range import range_allowed

# Largest fp32 intermediate (bytes) a reference materialises per query chunk.
_CHUNK_BYTES = 256 * 2**20


def _query_chunk(per_query_bytes: int, num_queries: int) -> int:
    """Number of queries per chunk so that a chunk's intermediate stays under _CHUNK_BYTES."""
    return max(1, min(num_queries, _CHUNK_BYTES // max(1, per_query_bytes)))


def causal_allowed(S: int, T: int, device, s_start: int = 0, s_end: int | None = None) -> torch.Tensor:
    """bool [s_end - s_start, T]: key t allowed for query s iff t <= (T - S) + s."""
    s_end = S if s_end is None else s_end
    s_pos = torch.arange(s_start, s_end, device=device) + (T - S)  # [c]
    t_pos = torch.arange(T, device=device)  # [T]
    return t_pos[None, :] <= s_pos[:, None]


def indexer_scores_ref(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Unmasked lightning-indexer scores, fp32 [B, S, T] (only for small shapes / tests).

    q [B,S,H,D], k [B,T,D], w [B,S,H]: scores[b,s,t] = sum_h w[b,s,h] * relu(q[b,s,h,:] . k[b,t,:]).
    """
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())  # [B,S,H,T]
    return torch.einsum("bsht,bsh->bst", logits.relu_(), w.float())


INDEXER_PRECISIONS = ("bf16", "fp8")


def check_indexer_precision(indexer_precision: str) -> str:
    if indexer_precision not in INDEXER_PRECISIONS:
        raise ValueError(f"indexer_precision must be one of {INDEXER_PRECISIONS}, got {indexer_precision!r}")
    return indexer_precision


def topk_indices_from_scores(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Masked fp32 scores [..., T] (-inf = not allowed) -> int32 [..., topk], descending, -1 padded."""
    T = scores.shape[-1]
    kk = min(topk, T)
    vals, idx = torch.topk(scores, kk, dim=-1, largest=True, sorted=True)  # [..., kk]
    idx = torch.where(vals == float("-inf"), torch.full_like(idx, -1), idx).to(torch.int32)
    if kk < topk:
        pad = idx.new_full((*idx.shape[:-1], topk - kk), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


def picked_scores(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The scores [..., T] at the picked keys idx [..., topk] (-1 = none: -inf) -> fp32 [..., topk]."""
    picked = scores.float().gather(-1, idx.clamp(min=0).long())
    return picked.masked_fill(idx < 0, float("-inf"))


def indexer_topk_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    key_range: torch.Tensor | None = None,
    indexer_precision: str = "bf16",
    k_scale: torch.Tensor | None = None,
    scores_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lightning-indexer top-k. q [B,S,H,D], k [B,T,D], w [B,S,H] -> int32 [B,S,topk]; scores_out
    (fp32 [B,S,topk], optional) gets the picked keys' scores (-inf in -1 slots).

    indexer_precision "fp8": the scores of DeepSeek-V3.2's fp8 indexer (q, k quantised to e4m3 with
    a scale per token and head, kernels/fp8_indexer.py); "bf16" (default): of q, k as given (fp32
    math). k_scale fp32 [B,T]: scores times k_scale[b, t] (with "fp8" and e4m3 k: k's scales).

    mask: optional bool broadcastable to [B,S,T], True = allowed; key_range: optional int32
    [B,S,3] (lo, hi, count), see the module docstring. Slots beyond the number of allowed keys
    hold -1. Rows are in descending score order.
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    if check_indexer_precision(indexer_precision) == "fp8":
        from .fp8_indexer import quantize_indexer

        q, k, w, k_scale = quantize_indexer(q, k, w, k_scale)
    out = torch.empty(B, S, topk, dtype=torch.int32, device=q.device)
    chunk = _query_chunk(B * H * T * 4, S)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        scores = indexer_scores_ref(q[:, s0:s1], k, w[:, s0:s1])  # [B,c,T]
        if k_scale is not None:
            scores.mul_(k_scale[:, None, :])
        scores = mask_indexer_scores(scores, S, mask, causal, key_range, s0)
        out[:, s0:s1] = topk_indices_from_scores(scores, topk)
        if scores_out is not None:
            scores_out[:, s0:s1] = picked_scores(scores, out[:, s0:s1])
    return out


def mask_indexer_scores(
    scores: torch.Tensor,
    S: int,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    key_range: torch.Tensor | None = None,
    s0: int = 0,
) -> torch.Tensor:
    """scores fp32 [B, c, T] of queries [s0, s0 + c) of S -> a copy with -inf where the key is not
    allowed (causal rule, `mask`, `key_range`; see indexer_topk_ref). Out of place, no loops and no
    branches on sizes: also the ONNX export's masking (symbolic S and T)."""
    B, c, T = scores.shape
    if causal:
        scores = scores.masked_fill(~causal_allowed(S, T, scores.device, s0, s0 + c), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask.expand(B, S, T)[:, s0:s0 + c], float("-inf"))
    if key_range is not None:
        scores = scores.masked_fill(~range_allowed(key_range.expand(B, S, 3)[:, s0:s0 + c], T), float("-inf"))
    return scores


def _valid_indices(indices: torch.Tensor, S: int, T: int, s0: int, s1: int, causal: bool) -> torch.Tensor:
    """bool [B, c, K]: index is a real key (0 <= i < T) and, if causal, not after the query."""
    valid = (indices >= 0) & (indices < T)
    if causal:
        s_pos = torch.arange(s0, s1, device=indices.device) + (T - S)  # [c]
        valid = valid & (indices <= s_pos[None, :, None])
    return valid


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,T,...], idx [B,c,K] (in range) -> [B,c,K,...]."""
    B, c, K = idx.shape
    flat = idx.reshape(B, c * K).long()
    rows = x[torch.arange(B, device=x.device)[:, None], flat]  # [B, c*K, ...]
    return rows.reshape(B, c, K, *x.shape[2:])


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """Top-k sparse attention (MHA/GQA). Returns [B,S,Hq,Dv] in q's dtype.

    q [B,S,Hq,Dqk], k [B,T,Hk,Dqk], v [B,T,Hk,Dv], indices [B,S,K] (int, -1 = none).
    Query head h uses kv head h // (Hq // Hk). Softmax in fp32; no valid key -> zeros.
    """
    return _sparse_attention_chunked(q, k, v, v.shape[3], indices, scale, causal)


def _sparse_attention_chunked(q, k, v, dv, indices, scale, causal):
    """sparse_attention_rows over query chunks (v None: values = the keys' first dv channels)."""
    B, S, Hq, Dqk = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    K = indices.shape[-1]
    out = torch.empty(B, S, Hq, dv, dtype=q.dtype, device=q.device)
    chunk = _query_chunk(B * K * Hk * (Dqk + dv + G) * 4, S)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        out[:, s0:s1] = sparse_attention_rows(q, k, v, indices, scale, causal, s0, s1, dv=dv)
    return out


def sparse_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    indices: torch.Tensor,
    scale: float,
    causal: bool = True,
    s0: int = 0,
    s1: int | None = None,
    dv: int | None = None,
) -> torch.Tensor:
    """sparse_attention_ref's output rows for queries [s0, s1) (default: all S), [B, s1 - s0, Hq, Dv]
    in q's dtype. v None: the values are the gathered keys' first `dv` channels (MLA: one gather of
    the latent rows). No loops and no branches on sizes, so it also traces with a symbolic S and T
    (the ONNX export's decomposition)."""
    B, S, Hq, Dqk = q.shape
    T, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    s1 = S if s1 is None else s1
    idx = indices[:, s0:s1]  # [B,c,K]
    valid = _valid_indices(idx, S, T, s0, s1, causal)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    kg = _gather_rows(k, safe).float()  # [B,c,K,Hk,Dqk]
    vg = kg[..., :dv] if v is None else _gather_rows(v, safe).float()  # [B,c,K,Hk,Dv]
    qg = q[:, s0:s1].float().reshape(B, s1 - s0, Hk, G, Dqk)
    logits = torch.einsum("bshgd,bskhd->bshgk", qg, kg) * scale  # [B,c,Hk,G,K]
    valid5 = valid[:, :, None, None, :]
    logits = logits.masked_fill(~valid5, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    p = torch.exp(logits - row_max)  # masked -> 0
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("bshgk,bskhd->bshgd", p, vg)  # [B,c,Hk,G,Dv]
    return o.reshape(B, s1 - s0, Hq, vg.shape[-1]).to(q.dtype)


def sparse_mla_ref(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    dv: int,
    causal: bool = True,
    rope: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLA absorbed-form sparse attention (FlashMLA sparse mode). Returns [B,S,H,dv].

    q [B,S,H,Dl+Dr], kv [B,T,Dl+Dr] (one latent row per token, shared by all heads),
    key = kv row, value = kv[..., :dv] (gathered once, with the key).
    rope [B,T,Dr]: kv is the latent [B,T,Dl] alone and the key row is [kv | rope]; likewise
    q_rope [B,S,H,Dr]: q is [B,S,H,Dl] and the query row is [q | q_rope].
    """
    if rope is not None:
        kv = torch.cat((kv, rope), dim=-1)  # [B,T,Dl+Dr] (the reference: a copy is fine)
    if q_rope is not None:
        q = torch.cat((q, q_rope), dim=-1)  # [B,S,H,Dl+Dr]
    return _sparse_attention_chunked(q, kv[:, :, None, :], None, dv, indices, scale, causal)


def moe_experts_ref(
    hidden: torch.Tensor,
    topk_index: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    swiglu_limit: float | None = None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Routed MoE experts (HF's GlmMoeDsaExperts.forward), plus an optional shared expert. Returns [T,H]
    in hidden's dtype.

    hidden [T,H], topk_index [T,k] (int; an index outside [0, E) -- HF's sentinel E, expert
    parallelism's -1 -- contributes nothing), topk_weights [T,k], gate_up [E,2I,H] (gate rows
    first, then up rows), down [E,H,I]:
        out[t] = sum_j w[t,j] * down[e] @ (silu(g) * u),  (g, u) = (gate_up[e] @ hidden[t]).chunk(2).
    swiglu_limit L (DeepSeek-V4's experts): g capped at L and u clamped to [-L, L] first.
    Rounding: fp32 maths; silu(g) * u is rounded to hidden's dtype (as HF's, whose g and u are
    rounded too), then the down projection, weighting and sum over j in fp32, rounded once at the
    end (HF's grouped_mm path also rounds each expert's down output before weighting it).
    One expert at a time over the tokens routed to it, like HF's eager loop.
    shared = (gate [IS,H], up [IS,H], down [H,IS]), nn.Linear weights of a shared expert (HF's
    `shared_experts` MLP; swiglu_limit caps it too, as DeepSeek-V4's): out[t] += down @ (silu(g) * u),
    (g, u) = (gate @ x[t], up @ x[t]), its silu(g) * u rounded the same way, added in fp32 before the
    one rounding (HF rounds both sums).
    """
    E, H = gate_up.shape[0], hidden.shape[1]
    valid = (topk_index >= 0) & (topk_index < E)
    out = torch.zeros(hidden.shape[0], H, dtype=torch.float32, device=hidden.device)
    for e in torch.unique(topk_index[valid]).tolist():
        tok, slot = torch.where(topk_index == e)
        g, u = (hidden[tok].float() @ gate_up[e].float().T).chunk(2, dim=-1)  # [n, I] each
        if swiglu_limit is not None:
            g, u = g.clamp(max=swiglu_limit), u.clamp(min=-swiglu_limit, max=swiglu_limit)
        act = (torch.nn.functional.silu(g) * u).to(hidden.dtype).float()
        y = act @ down[e].float().T  # [n, H]
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].float())
    if shared is not None:
        gate, up, shared_down = (w.float() for w in shared)
        g, u = hidden.float() @ gate.T, hidden.float() @ up.T  # [T, IS] each
        if swiglu_limit is not None:
            g, u = g.clamp(max=swiglu_limit), u.clamp(min=-swiglu_limit, max=swiglu_limit)
        out += (torch.nn.functional.silu(g) * u).to(hidden.dtype).float() @ shared_down.T
    return out.to(hidden.dtype)


def moe_route_ref(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1,
                  topk_group: int = 1, renormalize: bool = True, scale: float = 1.0):
    """Group-limited sigmoid routing (HF's DeepseekV3TopkRouter / GlmMoeDsaTopkRouter after the logits):
    logits [T,E] -> (weights fp32 [T,top_k], ids int64 [T,top_k]), ids by descending choice score."""
    scores = logits.float().sigmoid()
    choice = scores + bias.float() if bias is not None else scores
    T, E = choice.shape
    if n_group > 1:
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1).bool()
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def multi_linear_ref(x: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor | None = None,
                     eps: float = 0.0, residual: torch.Tensor | None = None, scale_then_round: bool = False,
                     write_normed: bool = False, write_sum: bool = False,
                     out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x [T,K], weights [N_i,K] -> [x @ W_i^T] in x's dtype (or out_dtype), fp32 sums rounded once (what a
    linear per weight gives, up to its summation order); with norm_weight, of x = rms_norm_ref(x, ...),
    then the normed rows (write_normed) and x + residual (write_sum) in x's dtype."""
    sides = []
    if norm_weight is not None:
        total = x if residual is None else x + residual
        x = rms_norm_ref(x, norm_weight, eps, residual, scale_then_round)
        sides = [x] * write_normed + [total] * write_sum
    return [(x.float() @ w.float().T).to(out_dtype or x.dtype) for w in weights] + [t.clone() for t in sides]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 scale_then_round: bool = False) -> torch.Tensor:
    """RMSNorm of h = x (+ residual, added in x's dtype) over the last dim, in x's dtype, rounded as
    HF's RMSNorm classes round (`weight * (h32 * rstd).to(dtype)`) or, scale_then_round, as
    F.rms_norm does (`(h32 * rstd * weight).to(dtype)`)."""
    h = x if residual is None else x + residual
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(h.dtype) if scale_then_round else weight * normed.to(h.dtype)
