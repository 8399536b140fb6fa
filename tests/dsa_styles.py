"""DSA models written in styles the detector was not tailored to (random weights, CPU-fast).

Every model is `forward(tokens, start_pos) -> logits` (DeepSeek's `inference/model.py` calling
convention): prefill at start_pos=0, then one token per call. The attention keeps its own KV cache
(live: the passes must keep writing it); only the indexer differs between styles:

- "official": DeepSeek-V3.2 `inference/model.py`: indexer key cache and per-key scale cache are
  module buffers written with `cache[:bsz, start_pos:end_pos] = k`, q/k Hadamard-rotated, keys
  quantised per block of 128 (`act_quant`) with the scale applied after the head sum (`fp8_index`),
  no fp8 cast (scales only);
- "fp8": the same with q/k really cast to torch.float8_e4m3fn and back, as `fp8_index` reads them;
- "scores": the indexer returns `(indices, scores)` (topk values and indices); the attention
  drops selected keys whose score is -inf; head-major scores (`q.transpose(1, 2)` @ keys:
  [B,H,S,T], summed over dim 1); gpt-fast-style `index_copy_` key buffer;
- "community": the indexer key cache is a plain module attribute, allocated on the first call
  and grown by `self.k_cache = torch.cat(...)`; the causal mask is built in the indexer with an
  in-place `triu_`, and a second such mask is built and never used.

`hooked_prefill_and_decode` is the oracle: forward hooks make each S indexer output its F source's
output (ic_compile.reference.shared_indexer_hooks), the S indexers still run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ic_compile.reference import shared_indexer_hooks

STYLES = ("official", "fp8", "scores", "community")
FP8_BLOCK = 128  # DeepSeek's act_quant block size (elements of the last axis per scale)
FP8_MAX = 448.0  # largest float8_e4m3fn value


@dataclass
class Args:
    vocab: int = 128
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 2
    head_dim: int = 16
    q_lora_rank: int = 32
    index_n_heads: int = 8  # 8, not 4: fewer exact-zero score ties (all heads ReLU'd away)
    index_head_dim: int = 32
    rope_dim: int = 8
    index_topk: int = 6  # < prompt length, so the indexer really selects
    max_batch: int = 2
    max_seq_len: int = 32


def rope_tables(args: Args) -> tuple[Tensor, Tensor]:
    """cos, sin [max_seq_len, rope_dim / 2] for interleaved rope."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, args.rope_dim, 2).float() / args.rope_dim)
    angles = torch.outer(torch.arange(args.max_seq_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved rope on all of x's last axis; x [B, S, ..., R], cos/sin [S, R/2]."""
    shape = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


def rope_part(x: Tensor, rope_dim: int, cos: Tensor, sin: Tensor) -> Tensor:
    """Rope on the first rope_dim channels (DeepSeek's indexer layout [pe | nope])."""
    pe, nope = torch.split(x, [rope_dim, x.shape[-1] - rope_dim], dim=-1)
    return torch.cat([apply_rope(pe, cos, sin), nope], dim=-1)


def hadamard(n: int) -> Tensor:
    """Sylvester Hadamard matrix scaled to be orthonormal (what hadamard_transform(x, n**-0.5) applies)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * n ** -0.5


def act_quant(x: Tensor, fp8: bool) -> tuple[Tensor, Tensor]:
    """Per-block (128 channels, or all of a shorter axis) scales: x [..., D] -> (x / scale, scale [..., D/block])."""
    block = min(FP8_BLOCK, x.shape[-1])
    blocks = x.float().unflatten(-1, (-1, block))
    scale = blocks.abs().amax(-1).clamp(min=1e-4) / FP8_MAX
    scaled = (blocks / scale[..., None]).flatten(-2)
    return (scaled.to(torch.float8_e4m3fn) if fp8 else scaled), scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


# ---------------------------------------------------------------- indexers

class OfficialIndexer(nn.Module):
    """DeepSeek-V3.2 inference/model.py's Indexer in torch math (fp8_index as einsum)."""

    def __init__(self, args: Args, fp8: bool):
        super().__init__()
        self.args, self.fp8 = args, fp8
        d, h = args.index_head_dim, args.index_n_heads
        self.wq_b = nn.Linear(args.q_lora_rank, h * d, bias=False)
        self.wk = nn.Linear(args.dim, d, bias=False)
        self.k_norm = nn.LayerNorm(d)
        self.weights_proj = nn.Linear(args.dim, h, bias=False)
        self.softmax_scale = d ** -0.5
        cache_dtype = torch.float8_e4m3fn if fp8 else torch.float32
        blocks = d // min(FP8_BLOCK, d)
        self.register_buffer("hadamard", hadamard(d), persistent=False)
        self.register_buffer("k_cache", torch.zeros(args.max_batch, args.max_seq_len, d, dtype=cache_dtype),
                             persistent=False)
        self.register_buffer("k_scale_cache", torch.zeros(args.max_batch, args.max_seq_len, blocks),
                             persistent=False)

    def forward(self, x: Tensor, qr: Tensor, start_pos: int, cos: Tensor, sin: Tensor, mask: Tensor | None):
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        q = self.wq_b(qr).unflatten(-1, (self.args.index_n_heads, -1))  # [B, S, H, D]
        q = rope_part(q, self.args.rope_dim, cos, sin)
        k = rope_part(self.k_norm(self.wk(x)), self.args.rope_dim, cos, sin)  # [B, S, D]
        q, k = q @ self.hadamard, k @ self.hadamard  # rotate_activation
        q_q, q_scale = act_quant(q, self.fp8)
        k_q, k_scale = act_quant(k, self.fp8)
        self.k_cache[:bsz, start_pos:end_pos] = k_q
        self.k_scale_cache[:bsz, start_pos:end_pos] = k_scale
        weights = self.weights_proj(x) * self.args.index_n_heads ** -0.5
        weights = weights.unsqueeze(-1) * q_scale * self.softmax_scale  # [B, S, H, 1]
        index_score = fp8_index(q_q, weights, self.k_cache[:bsz, :end_pos], self.k_scale_cache[:bsz, :end_pos])
        if mask is not None:
            index_score += mask
        return index_score.topk(min(self.args.index_topk, end_pos), dim=-1)[1]


def fp8_index(q: Tensor, weights: Tensor, k: Tensor, k_scale: Tensor) -> Tensor:
    """DeepSeek's fp8_index kernel: Σ_h weights · ReLU(q · k), times the key's scale. [B, S, T]"""
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu() * weights
    return logits.sum(dim=2) * k_scale.squeeze(-1)[:, None, :]


class ScoresIndexer(nn.Module):
    """Returns (indices, scores) of its top-k; gpt-fast-style buffer written with index_copy_."""

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        d, h = args.index_head_dim, args.index_n_heads
        self.wq_b = nn.Linear(args.q_lora_rank, h * d, bias=False)
        self.wk = nn.Linear(args.dim, d, bias=False)
        self.weights_proj = nn.Linear(args.dim, h, bias=False)
        self.register_buffer("key_buffer", torch.zeros(args.max_batch, args.max_seq_len, d), persistent=False)

    def forward(self, x: Tensor, qr: Tensor, start_pos: int, cos: Tensor, sin: Tensor, mask: Tensor | None):
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        q = rope_part(self.wq_b(qr).unflatten(-1, (self.args.index_n_heads, -1)), self.args.rope_dim, cos, sin)
        k = rope_part(F.normalize(self.wk(x), dim=-1), self.args.rope_dim, cos, sin)
        keys = self.key_buffer[:bsz]
        keys.index_copy_(1, torch.arange(start_pos, end_pos), k)
        keys = keys[:, :end_pos]
        s = torch.matmul(q.transpose(1, 2), keys.transpose(1, 2).unsqueeze(1))  # [B, H, S, T]
        s = torch.clamp(s, min=0) * self.args.index_head_dim ** -0.5
        w = self.weights_proj(x).transpose(1, 2).unsqueeze(-2)  # [B, H, 1, S]
        scores = (s * w.transpose(-1, -2)).sum(dim=1)  # [B, S, T]
        if mask is not None:
            scores = scores.masked_fill(mask < 0, float("-inf"))
        top = scores.topk(min(self.args.index_topk, end_pos), dim=-1)
        return top.indices, top.values


class CommunityIndexer(nn.Module):
    """Key cache in a plain attribute (None until the first call), causal mask from an in-place triu_."""

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        d, h = args.index_head_dim, args.index_n_heads
        self.q_proj = nn.Linear(args.q_lora_rank, h * d, bias=False)
        self.k_proj = nn.Linear(args.dim, d, bias=False)
        self.k_norm = nn.LayerNorm(d)
        self.head_gate = nn.Linear(args.dim, h, bias=False)
        self.k_cache: Tensor | None = None

    def forward(self, x: Tensor, qr: Tensor, start_pos: int, cos: Tensor, sin: Tensor, mask: Tensor | None):
        seqlen = x.shape[1]
        q = rope_part(self.q_proj(qr).view(*x.shape[:2], self.args.index_n_heads, -1), self.args.rope_dim, cos, sin)
        k = rope_part(self.k_norm(self.k_proj(x)), self.args.rope_dim, cos, sin)
        if start_pos == 0 or self.k_cache is None:
            self.k_cache = k
        else:
            self.k_cache = torch.cat([self.k_cache, k], dim=1)
        end_pos = self.k_cache.shape[1]
        causal = torch.full((seqlen, end_pos), float("-inf")).triu_(start_pos + 1)
        torch.full((seqlen, end_pos), float("-inf")).triu_(1)  # left over from a refactor: never read
        score = F.relu(torch.einsum("bshd,btd->bsht", q, self.k_cache))
        score = (score * self.head_gate(x).softmax(-1)[..., None]).sum(2) + causal
        return score.topk(min(self.args.index_topk, end_pos), dim=-1).indices


# ---------------------------------------------------------------- attention and model

class Attention(nn.Module):
    """Dense attention over the keys its indexer selects; KV cache in buffers written by slice."""

    def __init__(self, args: Args, style: str):
        super().__init__()
        self.args = args
        hd = args.n_heads * args.head_dim
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank)
        self.wq_b = nn.Linear(args.q_lora_rank, hd, bias=False)
        self.wkv = nn.Linear(args.dim, 2 * hd, bias=False)
        self.wo = nn.Linear(hd, args.dim, bias=False)
        self.indexer = make_indexer(args, style)
        shape = (args.max_batch, args.max_seq_len, args.n_heads, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x: Tensor, start_pos: int, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        qr = self.q_norm(self.wq_a(x))
        q = rope_part(self.wq_b(qr).unflatten(-1, (self.args.n_heads, -1)), self.args.rope_dim, cos, sin)
        k, v = self.wkv(x).unflatten(-1, (2, self.args.n_heads, -1)).unbind(2)
        self.k_cache[:bsz, start_pos:end_pos] = rope_part(k, self.args.rope_dim, cos, sin)
        self.v_cache[:bsz, start_pos:end_pos] = v
        index_mask = self.index_mask(self.indexer(x, qr, start_pos, cos, sin, mask), (bsz, seqlen, end_pos))
        if mask is not None:
            index_mask += mask
        scores = torch.einsum("bshd,bthd->bsht", q, self.k_cache[:bsz, :end_pos]) * self.args.head_dim ** -0.5
        probs = (scores + index_mask.unsqueeze(2)).softmax(dim=-1)
        return self.wo(torch.einsum("bsht,bthd->bshd", probs, self.v_cache[:bsz, :end_pos]).flatten(2))

    @staticmethod
    def index_mask(selected, shape) -> Tensor:
        """0 at the selected keys, -inf elsewhere; with (indices, scores), -inf-scored picks stay out."""
        indices, scores = selected if isinstance(selected, tuple) else (selected, None)
        keep = torch.zeros(indices.shape) if scores is None else torch.where(scores.isinf(), float("-inf"), 0.0)
        return torch.full(shape, float("-inf")).scatter_(-1, indices, keep)


def make_indexer(args: Args, style: str) -> nn.Module:
    if style in ("official", "fp8"):
        return OfficialIndexer(args, fp8=style == "fp8")
    if style == "scores":
        return ScoresIndexer(args)
    if style == "community":
        return CommunityIndexer(args)
    raise ValueError(f"unknown DSA style {style!r}; one of {STYLES}")


class Block(nn.Module):
    def __init__(self, args: Args, style: str):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(args.dim), RMSNorm(args.dim)
        self.attn = Attention(args, style)
        self.ffn = nn.Sequential(nn.Linear(args.dim, 2 * args.dim), nn.SiLU(), nn.Linear(2 * args.dim, args.dim))

    def forward(self, x: Tensor, start_pos: int, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: Args, style: str):
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.dim)
        self.layers = nn.ModuleList(Block(args, style) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab, bias=False)
        cos, sin = rope_tables(args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: Tensor, start_pos: int = 0) -> Tensor:
        seqlen = tokens.shape[1]
        cos, sin = self.cos[start_pos:start_pos + seqlen], self.sin[start_pos:start_pos + seqlen]
        # inference/model.py: a causal mask for prefill (start_pos 0), none for one-token decode
        mask = torch.full((seqlen, seqlen), float("-inf")).triu_(1) if seqlen > 1 else None
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        return self.head(self.norm(h))

    def reset_caches(self) -> None:
        """Start a new sequence: cache buffers zeroed (tests read which ones got written), the
        attribute caches of the community style dropped."""
        for name, buffer in self.named_buffers():
            if "cache" in name or "buffer" in name:
                buffer.zero_()
        for module in self.modules():
            if isinstance(module, CommunityIndexer):
                module.k_cache = None


def model(style: str, seed: int = 0, **overrides) -> Transformer:
    """A tiny model of `style`. fp8 gets index_head_dim 128: one 128-channel scale block per key."""
    if style == "fp8":
        overrides.setdefault("index_head_dim", FP8_BLOCK)
    torch.manual_seed(seed)
    return Transformer(Args(**overrides), style).eval()


def tokens(batch: int = 2, seq: int = 12, seed: int = 1, vocab: int = 128) -> Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(run, net: Transformer, prompt: Tensor, steps: Tensor) -> list[Tensor]:
    """Logits of a prefill (start_pos 0) and one call per column of `steps`."""
    net.reset_caches()
    with torch.no_grad():
        logits = [run(prompt, 0)]
        for t in range(steps.shape[1]):
            logits.append(run(steps[:, t:t + 1], prompt.shape[1] + t))
    return logits


def hooked_prefill_and_decode(net: Transformer, plan: str, prompt: Tensor, steps: Tensor) -> list[Tensor]:
    """The oracle: eager model, each S indexer's output replaced by its F source's (forward hooks)."""
    with shared_indexer_hooks(net, plan):
        return prefill_and_decode(net, net, prompt, steps)


# ---------------------------------------------------------------- counting what an S layer left behind

def indexer_paths(net: nn.Module) -> list[str]:
    """Module paths of the indexers, in model order (the names nn_module_stack gives their ops)."""
    from ic_compile.reference import find_indexer_modules
    indexers = {id(m) for m in find_indexer_modules(net)}
    return [name for name, m in net.named_modules() if id(m) in indexers]


def indexer_ops(gm, path: str) -> list:
    """The ops of the indexer at `path` in graph `gm`: every call under its module (nn_module_stack),
    plus every call outside it whose results are read only by such ops (its inputs' producers)."""
    from ic_compile.passes.graph_ops import module_path
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    inside = {n for n in calls if module_path(n) == path or module_path(n).startswith(path + ".")}
    for node in reversed(calls):  # users come after their producers: one backward sweep suffices
        if node not in inside and node.users and all(u in inside for u in node.users):
            inside.add(node)
    return [n for n in calls if n in inside]
