"""Top-k scattered into a mask + dense SDPA  ->  `ic::sparse_attention` over the selected keys.

Matched (HF sdpa path, DESIGN §3), per layer:
    index_mask = ones(B,S,T).scatter(-1, idx.long(), False).unsqueeze(1)
    attn_mask  = attention_mask & ~index_mask          (or attention_mask.masked_fill(index_mask, min))
    out        = scaled_dot_product_attention(q[B,H,S,D], k[B,Hk,T,D], v[B,Hk,T,Dv], attn_mask, scale=c)
where idx comes from a lowered indexer (`scatter_safe_indices` of `lowered_indexer`), so the raw
indices (-1 = nothing selected) are known valid. Queries are the last S of T positions (HF caches):
the op's causal check replaces the causal part of `attention_mask`; selected keys already satisfy its
padding part (the indexer used the same mask). Anything else is left alone.

When k and v are MLA heads expanded from a shared latent (`match_latent_kv`), the attention runs in the
absorbed form `ic::sparse_mla` instead: kv_b_proj's key half is folded into q and its value half applied
to the latent output, so each selected key is one [Dl+dr] row read once for all heads (the per-head
form gathers H separate [dn+dr] and [dv] rows per key: ~1 FLOP/byte, memory-bound). The latent and
rope (a KV cache's two buffers) go to the op apart: a cat of them would copy the whole cache of every
layer at each decode step, while the attention reads only the K selected rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from .graph_ops import LAYOUT_OPS, op_name, take_location
from .lower_indexer import scatter_safe_indices
from .match_latent_kv import match_latent_kv

if TYPE_CHECKING:
    from .manager import PassContext


def lower_sparse_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: each SDPA masked by a lowered indexer's scattered top-k -> sparse attention
    (counted in ctx.report)."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic.*
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.nn.functional.scaled_dot_product_attention:
            indices = _selected_indices(node)
            if indices is not None:
                absorbed = _replace(gm, node, indices)
                ctx.report.attention_absorbed += absorbed
                ctx.report.attention_lowered += 1
                ctx.counters["lower_sparse_attention.absorbed_mla" if absorbed else "lower_sparse_attention.per_head"] += 1
    return gm


def lowered_sparse_attention(q, k, v, indices, scale):
    """q [B,H,S,D], k [B,Hk,T,D], v [B,Hk,T,Dv], indices [B,S,K] -> [B,H,S,Dv] like SDPA."""
    out = torch.ops.ic.sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        indices, float(scale), True)  # [B,S,H,Dv]
    return out.transpose(1, 2)


# Queries per absorbed-attention chunk at long prefill: each chunk's [B,chunk,H,Dl] query and output
# latents are alive only during that chunk (unchunked at 200K they are 2 x 4.1 GB at once).
_QUERY_CHUNK = 16384


def lowered_absorbed_mla(q, latent, rope, weight, indices, scale, nope_dim: int):
    """q [B,H,S,dn+dr], latent [B,1,T,Dl], rope [B,1,T,dr], weight [H*(dn+dv),Dl], indices [B,S,K]
    -> [B,H,S,dv], equal to SDPA over the expanded heads restricted to the selected keys.
    A static S above _QUERY_CHUNK runs in query chunks (rows are independent; a symbolic S, as in
    dynamic decode, runs whole). Chunk [s0, s1) sees the keys up to its own last query, T - S + s1,
    so the op's causal horizon (T' - S' + s) stays each query's own position."""
    S, T = q.shape[2], latent.shape[2]
    if not isinstance(S, int) or S <= _QUERY_CHUNK:
        return _absorbed_mla(q, latent, rope, weight, indices, scale, nope_dim)
    chunks = []
    for s0 in range(0, S, _QUERY_CHUNK):
        s1 = min(S, s0 + _QUERY_CHUNK)
        visible = T - S + s1  # keys the chunk's queries may see (views: no copy)
        chunks.append(_absorbed_mla(q[:, :, s0:s1], latent[:, :, :visible], rope[:, :, :visible], weight,
                                    indices[:, s0:s1], scale, nope_dim))
    return torch.cat(chunks, dim=2)  # [B,H,S,dv]


def _absorbed_mla(q, latent, rope, weight, indices, scale, nope_dim: int):
    heads, latent_dim = q.shape[1], latent.shape[-1]
    weight = weight.view(heads, -1, latent_dim)  # [H, dn+dv, Dl]
    q_latent = torch.einsum("bhsd,hdc->bshc", q[..., :nope_dim], weight[:, :nope_dim])  # [B,S,H,Dl]
    q_rope = q[..., nope_dim:].transpose(1, 2)  # [B,S,H,dr]
    # key row = [latent | rope], read by the op from both buffers ([B,T,Dl], [B,T,dr]): no cache copy;
    # query row = [q_latent | q_rope] likewise (a cat would be a [B,S,H,Dl+dr] copy: 4.3 GiB at 200K)
    out_latent = torch.ops.ic.sparse_mla(q_latent, latent[:, 0], indices, float(scale), latent_dim, True,
                                         rope[:, 0], q_rope)  # [B,S,H,Dl]
    return torch.einsum("bshc,hvc->bhsv", out_latent, weight[:, nope_dim:])  # [B,H,S,dv]


def _selected_indices(sdpa: fx.Node) -> fx.Node | None:
    kwargs = dict(sdpa.kwargs)
    if kwargs.get("dropout_p", 0.0) != 0.0 or kwargs.get("is_causal", False) or len(sdpa.args) > 3:
        return None
    mask = kwargs.get("attn_mask")
    if not isinstance(mask, fx.Node):
        return None
    index_mask = _index_mask_of(mask)
    if index_mask is None:
        return None
    scatter = _through_layout(index_mask)
    if op_name(scatter) != "scatter" or len(scatter.args) < 4 or scatter.args[3] is not False:
        return None
    safe = _through_layout(scatter.args[2])
    if safe.op != "call_function" or safe.target is not scatter_safe_indices:
        return None
    return safe.args[0]  # raw int32 indices, -1 = empty slot


def _index_mask_of(mask: fx.Node) -> fx.Node | None:
    if op_name(mask) == "and":
        inverted = [a for a in mask.args if isinstance(a, fx.Node) and op_name(a) == "invert"]
        return inverted[0].args[0] if len(inverted) == 1 else None
    if op_name(mask) == "masked_fill":
        return mask.args[1]
    return None


def _through_layout(node: fx.Node) -> fx.Node:
    while op_name(node) in LAYOUT_OPS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _replace(gm: fx.GraphModule, sdpa: fx.Node, indices: fx.Node) -> bool:
    """SDPA -> the absorbed MLA form when k/v are expanded latents, else the per-head form."""
    q, k, v = sdpa.args[:3]
    scale = sdpa.kwargs.get("scale")
    if scale is None:
        head_dim = q.meta["example_value"].shape[-1]
        scale = float(head_dim) ** -0.5
    latent_kv = match_latent_kv(k, v, reader=sdpa)
    if latent_kv is None:
        target, args = lowered_sparse_attention, (q, k, v, indices, scale)
    else:
        target = lowered_absorbed_mla
        args = (q, latent_kv.latent, latent_kv.rope, latent_kv.weight, indices, scale, latent_kv.nope_dim)
    with gm.graph.inserting_before(sdpa):
        new = gm.graph.call_function(target, args)
    take_location(new, sdpa)
    sdpa.replace_all_uses_with(new)
    return latent_kv is not None  # the expanded k/v (and the key buffer's writes) are left to DCE
