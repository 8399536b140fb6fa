"""A small, readable DeepSeek-Sparse-Attention (DSA) model with IndexCache.

gpt-fast style: the whole model in one file, the static KV cache is a module,
shapes are in comments.  Shape letters:
    B batch, S query tokens, T key slots (T == S without a cache, T == max_seq_length
    with one), H attention heads, K selected keys per query (top-k), C kv_lora_rank,
    R qk_rope_head_dim, E routed experts, N tokens (B * S).

A DSA layer runs a *lightning indexer*, I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]),
masks it causally, keeps the top-k keys per query and attends only to those.
IndexCache: `index_topk_pattern` (e.g. "FSSF") marks each layer Full (runs its own
indexer) or Shared (skips it and reuses the top-k of the nearest earlier F layer).

The indexer is written in a deliberately different code variant from HuggingFace's
(einsum, clamp_min, weighted sum over heads, scale after ReLU, half-split rope,
bool mask) so that graph passes are tested against more than one spelling.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .dsa_config import CONFIGS, ModelArgs  # both part of this module's API (__all__): one import for a user


# ---------------------------------------------------------------- helpers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def precompute_rope(seq_len: int, rope_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin: [seq_len, R] in the half-split layout (frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2).float() / rope_dim)  # [R/2]
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)  # [seq_len, R/2]
    angles = torch.cat([angles, angles], dim=-1)  # [seq_len, R]
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, S, R] or [B, S, H, R]; cos, sin: [S, R] rows for x's positions."""
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


def causal_mask(positions: Tensor, n_keys: int) -> Tensor:
    """positions [S] -> bool [S, T]: True where key_pos <= query_pos."""
    key_pos = torch.arange(n_keys, device=positions.device)
    return key_pos[None, :] <= positions[:, None]


def gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """rows [B, T, D], index [B, S, K] -> [B, S, K, D] with out[b,s,k] = rows[b, index[b,s,k]]."""
    batch = torch.arange(rows.shape[0], device=rows.device)[:, None, None]  # [B, 1, 1]
    return rows[batch, index.long()]


# ---------------------------------------------------------------- static cache

class KVCache(nn.Module):
    """Per-layer static cache: MLA latent + shared rope key, plus indexer keys on F layers."""

    def __init__(self, max_batch_size: int, max_seq_length: int, kv_lora_rank: int,
                 rope_dim: int, index_head_dim: int | None, dtype: torch.dtype,
                 device: torch.device | None = None):
        super().__init__()
        shape = (max_batch_size, max_seq_length)
        kw = dict(dtype=dtype, device=device)
        self.register_buffer("kv_latent", torch.zeros(*shape, kv_lora_rank, **kw),
                             persistent=False)  # [B, T, C]
        self.register_buffer("k_rope", torch.zeros(*shape, rope_dim, **kw),
                             persistent=False)  # [B, T, R]
        index_k = None if index_head_dim is None else torch.zeros(*shape, index_head_dim, **kw)
        self.register_buffer("index_k", index_k, persistent=False)  # [B, T, index_head_dim]

    def update(self, input_pos: Tensor, kv_latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """input_pos [S], kv_latent [B, S, C], k_rope [B, S, R] -> full [B, T, C], [B, T, R]."""
        B = kv_latent.shape[0]
        latent_cache, rope_cache = self.kv_latent[:B], self.k_rope[:B]
        latent_cache.index_copy_(1, input_pos, kv_latent.to(latent_cache.dtype))
        rope_cache.index_copy_(1, input_pos, k_rope.to(rope_cache.dtype))
        return latent_cache, rope_cache

    def update_index_keys(self, input_pos: Tensor, k: Tensor) -> Tensor:
        """input_pos [S], k [B, S, D] -> full indexer keys [B, T, D]."""
        if self.index_k is None:
            raise RuntimeError("this cache belongs to a Shared layer and has no indexer keys")
        key_cache = self.index_k[: k.shape[0]]
        key_cache.index_copy_(1, input_pos, k.to(key_cache.dtype))
        return key_cache


# ---------------------------------------------------------------- attention

class Indexer(nn.Module):
    """Lightning indexer: picks the top-k keys for every query."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.rope_dim, self.topk = args.qk_rope_head_dim, args.index_topk
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.weights_proj = nn.Linear(args.dim, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Half-split rope on the first R dims of the last axis."""
        x_rope, x_pass = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(x_rope, cos, sin), x_pass], dim=-1)

    def forward(self, x: Tensor, q_latent: Tensor, cos: Tensor, sin: Tensor,
                positions: Tensor, kv_cache: KVCache | None) -> Tensor:
        """x [B, S, dim], q_latent [B, S, q_lora_rank] -> topk key ids [B, S, K] int32."""
        B, S, _ = x.shape
        q = self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim)  # [B, S, IH, ID]
        q = self.rope(q, cos, sin)
        k = self.rope(self.k_norm(self.wk(x)), cos, sin)  # [B, S, ID]
        if kv_cache is not None:
            k = kv_cache.update_index_keys(positions, k)  # [B, T, ID]
        head_weights = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B, S, IH]

        scores = torch.einsum("bshd,btd->bsht", q.float(), k.float())  # [B, S, IH, T]
        scores = scores.clamp_min(0) * self.softmax_scale  # ReLU, then scale
        index_scores = (scores * head_weights[..., None]).sum(dim=2)  # [B, S, T]

        allowed = causal_mask(positions, k.shape[1])  # [S, T] bool
        index_scores = index_scores.masked_fill(~allowed, float("-inf"))
        n_keep = min(self.topk, k.shape[1])
        return index_scores.topk(n_keep, dim=-1).indices.to(torch.int32)  # [B, S, K]

    def index_scores(self, x: Tensor, q_latent: Tensor, cos: Tensor, sin: Tensor,
                     positions: Tensor) -> Tensor:
        """Training path (no cache): the masked indexer scores I [B, S, T] (-inf above the
        causal diagonal) that forward() takes the top-k of.  Same maths as forward()."""
        B, S, _ = x.shape
        q = self.rope(self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim), cos, sin)
        k = self.rope(self.k_norm(self.wk(x)), cos, sin)  # [B, T, ID]
        head_weights = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B, S, IH]
        scores = torch.einsum("bshd,btd->bsht", q.float(), k.float())  # [B, S, IH, T]
        scores = scores.clamp_min(0) * self.softmax_scale
        index_scores = (scores * head_weights[..., None]).sum(dim=2)  # [B, S, T]
        allowed = causal_mask(positions, k.shape[1])  # [S, T]
        return index_scores.masked_fill(~allowed, float("-inf"))


class Attention(nn.Module):
    """MLA with DSA sparse attention; runs its indexer on F layers, reuses prev_topk on S."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.nope_dim, self.rope_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = args.v_head_dim, args.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim),
                               bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, args.dim, bias=False)
        self.indexer = Indexer(args) if args.pattern[layer_id] == "F" else None
        self.kv_cache: KVCache | None = None
        self.softmax_scale = qk_dim ** -0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                prev_topk: Tensor | None, use_cache: bool) -> tuple[Tensor, Tensor]:
        """x [B, S, dim] -> (out [B, S, dim], topk [B, S, K])."""
        B, S, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))  # [B, S, q_lora_rank]
        q = self.wq_b(q_latent).view(B, S, self.n_heads, -1)  # [B, S, H, nope + R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)

        kv_latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_latent = self.kv_norm(kv_latent)  # [B, S, C]
        k_rope = apply_rope(k_rope, cos, sin)  # [B, S, R], one head shared by all
        cache = self.kv_cache if use_cache else None
        if cache is not None:
            kv_latent, k_rope = cache.update(positions, kv_latent, k_rope)  # [B, T, C], [B, T, R]

        if self.indexer is not None:
            topk = self.indexer(x, q_latent, cos, sin, positions, cache)
        elif prev_topk is None:
            raise ValueError(f"layer {self.layer_id} is Shared ('S') but got no prev_topk; "
                             f"an S layer needs an earlier F layer's top-k")
        else:
            topk = prev_topk
        out = self.sparse_attention(q_nope, q_rope, kv_latent, k_rope, topk, positions)
        return self.wo(out.flatten(2)), topk

    def forward_aux(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                    prev_topk: Tensor | None, role: str, dense: bool, with_index_scores: bool,
                    detach_indexer_input: bool, with_probs: bool = True
                    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Training path (no cache): attention as a masked dense softmax so that the full
        probability map is available.  Used by ic_compile.tools.training; forward() is unchanged.

        role "F": run this layer's indexer, "S": use prev_topk.  dense=True: attend to every
        causal key (indexer not used for selection).  The indexer reads detached inputs when
        detach_indexer_input, so its loss only trains indexer weights.
        with_probs=False uses F.scaled_dot_product_attention (no [B, H, S, T] map; probs None).
        -> (out [B, S, dim], topk [B, S, K] or None, index scores [B, S, T] or None,
            attention probabilities [B, H, S, T] or None)."""
        B, S, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))  # [B, S, q_lora_rank]
        q = self.wq_b(q_latent).view(B, S, self.n_heads, -1)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        kv_latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_latent = self.kv_norm(kv_latent)  # [B, T, C]
        k_rope = apply_rope(k_rope, cos, sin)  # [B, T, R]

        index_scores, topk = None, prev_topk
        if role == "F" and (with_index_scores or not dense):
            if self.indexer is None:
                raise ValueError(f"layer {self.layer_id} has no indexer but the plan makes it F")
            xi, qi = (x.detach(), q_latent.detach()) if detach_indexer_input else (x, q_latent)
            index_scores = self.indexer.index_scores(xi, qi, cos, sin, positions)  # [B, S, T]
            if not dense:
                n_keep = min(self.indexer.topk, index_scores.shape[-1])
                topk = index_scores.detach().topk(n_keep, dim=-1).indices.to(torch.int32)
        allowed = causal_mask(positions, kv_latent.shape[1])[None]  # [1, S, T]
        if not dense:
            if topk is None:
                raise ValueError(f"layer {self.layer_id} is S but got no top-k from an F layer")
            selected = torch.zeros(B, S, kv_latent.shape[1], dtype=torch.bool, device=x.device)
            selected.scatter_(-1, topk.long(), True)
            allowed = allowed & selected  # [B, S, T]

        w_kv_b = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, -1)
        w_k_nope, w_v = w_kv_b.split([self.nope_dim, self.v_dim], dim=1)
        q_absorbed = torch.einsum("bshd,hdc->bshc", q_nope, w_k_nope)  # [B, S, H, C]
        if not with_probs:  # fused attention; one latent key/value head shared by all heads
            q_all = torch.cat([q_absorbed, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, C + R]
            k_all = torch.cat([kv_latent, k_rope], dim=-1)[:, None]  # [B, 1, T, C + R]
            k_all = k_all.expand(-1, self.n_heads, -1, -1)
            v_all = kv_latent[:, None].expand(-1, self.n_heads, -1, -1)  # [B, H, T, C]
            out_latent = F.scaled_dot_product_attention(
                q_all, k_all.type_as(q_all), v_all.type_as(q_all), attn_mask=allowed[:, None],
                scale=self.softmax_scale).transpose(1, 2)  # [B, S, H, C]
            out = torch.einsum("bshc,hvc->bshv", out_latent.type_as(w_v), w_v)
            return self.wo(out.flatten(2)), topk, index_scores, None
        scores = (torch.einsum("bshc,btc->bhst", q_absorbed, kv_latent)
                  + torch.einsum("bshr,btr->bhst", q_rope, k_rope))  # [B, H, S, T]
        scores = scores.float() * self.softmax_scale
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)  # [B, H, S, T]
        out_latent = torch.einsum("bhst,btc->bshc", probs.type_as(kv_latent), kv_latent)
        out = torch.einsum("bshc,hvc->bshv", out_latent, w_v)  # [B, S, H, V]
        return self.wo(out.flatten(2)), topk, index_scores, probs

    def sparse_attention(self, q_nope: Tensor, q_rope: Tensor, kv_latent: Tensor,
                         k_rope: Tensor, topk: Tensor, positions: Tensor) -> Tensor:
        """Gather-style (FlashMLA-like) attention over the K selected keys of each query.

        q_nope [B, S, H, nope], q_rope [B, S, H, R], kv_latent [B, T, C], k_rope [B, T, R],
        topk [B, S, K] -> [B, S, H, V].  wkv_b is absorbed into q and the output, so only
        the latent rows are gathered.
        """
        w_kv_b = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, -1)
        w_k_nope, w_v = w_kv_b.split([self.nope_dim, self.v_dim], dim=1)  # [H, nope, C], [H, V, C]
        q_absorbed = torch.einsum("bshd,hdc->bshc", q_nope, w_k_nope)  # [B, S, H, C]

        latent_sel = gather_rows(kv_latent, topk)  # [B, S, K, C]
        rope_sel = gather_rows(k_rope, topk)  # [B, S, K, R]
        scores = (torch.einsum("bshc,bskc->bshk", q_absorbed, latent_sel)
                  + torch.einsum("bshr,bskr->bshk", q_rope, rope_sel))  # [B, S, H, K]
        scores = scores.float() * self.softmax_scale
        # top-k may pick causally masked keys when fewer than K are allowed: drop those slots
        valid = topk <= positions[None, :, None]  # [B, S, K]
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).type_as(q_nope)  # [B, S, H, K]

        out_latent = torch.einsum("bshk,bskc->bshc", probs, latent_sel)  # [B, S, H, C]
        return torch.einsum("bshc,hvc->bshv", out_latent, w_v)  # [B, S, H, V]


# ---------------------------------------------------------------- feed-forward

class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus a shared expert.

    Every expert runs on every token and the chosen outputs are gathered: static shapes,
    no graph breaks, but E / n_activated times the FLOPs of a grouped kernel.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, dim, inter = args.n_routed_experts, args.dim, args.moe_inter_dim
        self.n_activated = args.n_activated_experts
        self.gate = nn.Linear(dim, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, inter, dim))  # expert gate proj
        self.w2 = nn.Parameter(torch.empty(E, dim, inter))  # expert down proj
        self.w3 = nn.Parameter(torch.empty(E, inter, dim))  # expert up proj
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=0.02)
        self.shared_experts = MLP(dim, args.n_shared_experts * inter)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, dim] -> (weights [N, k] summing to 1, expert ids [N, k])."""
        scores = self.gate(x).float().softmax(dim=-1)  # [N, E]
        weights, expert_ids = torch.topk(scores, self.n_activated, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.type_as(x), expert_ids

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, dim]
        weights, expert_ids = self.route(x)  # [N, k], [N, k]
        hidden = F.silu(torch.einsum("nd,eid->nei", x, self.w1)) \
            * torch.einsum("nd,eid->nei", x, self.w3)  # [N, E, inter]
        expert_out = torch.einsum("nei,edi->ned", hidden, self.w2)  # [N, E, dim]
        index = expert_ids[..., None].expand(-1, -1, shape[-1])  # [N, k, dim]
        chosen = expert_out.gather(1, index)  # [N, k, dim]
        routed = (chosen * weights[..., None]).sum(dim=1)  # [N, dim]
        return (routed + self.shared_experts(x)).view(shape)


# ---------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        dense = layer_id < args.n_dense_layers
        self.ffn = MLP(args.dim, args.inter_dim) if dense else MoE(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                prev_topk: Tensor | None, use_cache: bool) -> tuple[Tensor, Tensor]:
        h, topk = self.attn(self.attn_norm(x), cos, sin, positions, prev_topk, use_cache)
        x = x + h
        x = x + self.ffn(self.ffn_norm(x))
        return x, topk

    def forward_aux(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                    prev_topk: Tensor | None, **kw) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """Training path; see Attention.forward_aux."""
        h, topk, index_scores, probs = self.attn.forward_aux(self.attn_norm(x), cos, sin, positions,
                                                             prev_topk, **kw)
        x = x + h
        x = x + self.ffn(self.ffn_norm(x))
        return x, topk, index_scores, probs


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = precompute_rope(args.max_seq_len, args.qk_rope_head_dim, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, R]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_batch_size, self.max_seq_length = -1, -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int,
                     dtype: torch.dtype | None = None) -> None:
        """(Re)allocate zeroed static caches; afterwards call forward(idx, input_pos)."""
        if max_seq_length > self.args.max_seq_len:
            raise ValueError(f"max_seq_length {max_seq_length} > args.max_seq_len "
                             f"{self.args.max_seq_len}")
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        weight = self.output.weight
        for layer in self.layers:
            attn = layer.attn
            index_dim = self.args.index_head_dim if attn.indexer is not None else None
            attn.kv_cache = KVCache(max_batch_size, max_seq_length, self.args.kv_lora_rank,
                                    self.args.qk_rope_head_dim, index_dim,
                                    dtype or weight.dtype, weight.device)

    def forward(self, idx: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """idx [B, S] int64, input_pos [S] (None: plain causal prefill) -> logits [B, S, vocab]."""
        use_cache = input_pos is not None
        if use_cache and self.layers[0].attn.kv_cache is None:
            raise RuntimeError("input_pos given but no caches: call setup_caches() first")
        positions = input_pos if use_cache else torch.arange(idx.shape[1], device=idx.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [S, R]
        x = self.tok_embeddings(idx)  # [B, S, dim]
        topk = None  # [B, S, K], threaded from F layers to the S layers after them
        for layer in self.layers:
            x, topk = layer(x, cos, sin, positions, topk, use_cache)
        return self.output(self.norm(x))  # [B, S, vocab]

    def forward_aux(self, idx: Tensor, *, pattern: str | None = None, dense: bool = False,
                    with_index_scores: bool = True, with_probs: bool = True,
                    detach_indexer_input: bool = True) -> tuple[Tensor, dict]:
        """Training forward (no cache) that also returns what indexer distillation needs.

        pattern: F/S per layer (default: the model's own); dense=True attends to all causal
        keys (DeepSeek's dense stage / warm-up).  Attention is computed as a masked dense
        softmax, so it matches forward() up to float rounding.
        -> (logits [B, S, vocab], {"index_scores": {layer: [B, S, T]} (F layers),
            "attention_probs": {layer: [B, H, S, T]}, "topk": {layer: [B, S, K]} (F layers)})."""
        pattern = pattern or self.args.pattern
        if len(pattern) != len(self.layers) or set(pattern) - {"F", "S"} or pattern[0] != "F":
            raise ValueError(f"pattern {pattern!r}: need one 'F'/'S' per layer "
                             f"({len(self.layers)}), starting with 'F'")
        positions = torch.arange(idx.shape[1], device=idx.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.tok_embeddings(idx)
        aux: dict = {"index_scores": {}, "attention_probs": {}, "topk": {}}
        topk = None
        for i, layer in enumerate(self.layers):
            x, new_topk, index_scores, probs = layer.forward_aux(
                x, cos, sin, positions, topk, role=pattern[i], dense=dense,
                with_index_scores=with_index_scores, detach_indexer_input=detach_indexer_input,
                with_probs=with_probs)
            if index_scores is not None:
                aux["index_scores"][i] = index_scores
            if pattern[i] == "F" and new_topk is not None:
                aux["topk"][i] = new_topk
            if with_probs:
                aux["attention_probs"][i] = probs
            topk = new_topk
        return self.output(self.norm(x)), aux


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Deterministic init: norms -> ones / zeros, everything else ~ N(0, std).

    Each parameter draws from a generator seeded by (seed, its name), so models that
    differ only in which layers have an indexer get identical values for shared names.
    """
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                param.fill_(1.0 if param_name == "weight" else 0.0)
                continue
            name = f"{module_name}.{param_name}"
            gen = torch.Generator(device=param.device)
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            nn.init.normal_(param, mean=0.0, std=std, generator=gen)
    return model


__all__ = ["ModelArgs", "CONFIGS", "RMSNorm", "KVCache", "Indexer", "Attention", "MLP",
           "MoE", "Block", "Transformer", "init_weights", "precompute_rope", "apply_rope",
           "rotate_half", "causal_mask", "gather_rows"]
