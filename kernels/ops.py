"""torch.library custom ops in namespace ``ic`` (importing this module registers them).

    ic::indexer_topk(Tensor q, Tensor k, Tensor w, SymInt topk, Tensor? mask=None, bool causal=True,
                     bool sorted=True, Tensor? key_range=None, bool check=True,
                     str indexer_precision="bf16", Tensor? new_keys=None, Tensor? new_key_pos=None,
                     Tensor? k_scale=None) -> Tensor
    ic::indexer_topk_scored(<the same>) -> (Tensor, Tensor)
        (also the picked keys' scores, fp32 [B,S,topk], -inf in -1 slots: for models using topk values)
        (new_keys / new_key_pos: k is the model's key cache, into which it has just written new_keys at
        new_key_pos along dim 1; with indexer_precision="fp8" the op keeps an fp8 copy of that cache,
        quantising only those rows: kernels/fp8_key_cache.py. k_scale [B,T]: scores times k_scale[b,t];
        with "fp8" and e4m3 k, its scales, as an e4m3 q's are in w: a model's own fp8 indexer)
    ic::sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, float scale, bool causal=True) -> Tensor
    ic::sparse_mla(Tensor q, Tensor kv, Tensor indices, float scale, int dv, bool causal=True,
                   Tensor? rope=None, Tensor? q_rope=None) -> Tensor
        (rope given: kv is the latent [B,T,Dl] and rope [B,T,Dr] the rest of each key row, e.g. a
        KV cache's two buffers, read apart by the kernel instead of concatenated per call; q_rope
        likewise for the query rows: q [B,S,H,Dl], q_rope [B,S,H,Dr])

Registration: ``torch.library.custom_op`` + ``register_fake`` (not ``triton_op``).
``triton_op`` registers the op body itself as the fake kernel and inlines (decomposes) the
body into the graph under torch.compile. Our bodies contain host-side logic that depends on
concrete sizes -- the query-chunk loop bounding the [chunk, T] score buffer with a torch.topk
per chunk, split-K heuristics from B*S and the SM count, autotune buckets -- which would
guard/specialise on every symbolic size under ``dynamic=True``; and the CPU branch would be
traced as the reference. Inductor cannot fuse into user Triton kernels anyway, so an opaque
op costs only the Python launch (removable with CUDA graphs). The fake impls below are
shape-only, so the ops trace with fully symbolic B, S, T, K.

Device dispatch (one impl for every device): CUDA + triton -> Triton kernels; anything else
(CPU, no triton) -> the pure-torch references. IC_KERNELS_TRITON=1/0 overrides (see
_triton_utils). Importing never needs triton.
"""
from __future__ import annotations

import torch

from .fp8_key_cache import fp8_key_mirror
from .indexer_topk import decode_form
from .indexer_topk import indexer_topk as _indexer_topk
from .key_range import assert_key_range_async, check_key_range
from .mask_within_causal import mask_within_causal
from .moe_experts import Route as _Route
from .moe_experts import moe_experts as _moe_experts
from .moe_experts import moe_route_experts as _moe_route_experts
from .moe_router import moe_route as _moe_route
from .multi_linear import multi_linear as _multi_linear
from .sparse_attention import sparse_attention as _sparse_attention
from .sparse_attention import sparse_mla as _sparse_mla

NAMESPACE = "ic"

# SymInt topk: models ask for min(index_topk, T) keys; an `int` argument would specialise that to its
# traced value (a guard in torch.compile, and in torch.export a runtime assert that ONNX drops: the
# exported graph then padded short prompts' rows with -1 instead of selecting fewer keys).
_INDEXER_TOPK_SCHEMA = ("(Tensor q, Tensor k, Tensor w, SymInt topk, Tensor? mask=None, bool causal=True, "
                        "bool sorted=True, Tensor? key_range=None, bool check=True, "
                        "str indexer_precision=\"bf16\", Tensor? new_keys=None, Tensor? new_key_pos=None, "
                        "Tensor? k_scale=None) -> Tensor")
_INDEXER_TOPK_SCORED_SCHEMA = _INDEXER_TOPK_SCHEMA.replace("-> Tensor", "-> (Tensor, Tensor)")
_SPARSE_ATTENTION_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor indices, float scale, bool causal=True) -> Tensor"
_SPARSE_MLA_SCHEMA = ("(Tensor q, Tensor kv, Tensor indices, float scale, int dv, bool causal=True, "
                      "Tensor? rope=None, Tensor? q_rope=None) -> Tensor")
_MOE_EXPERTS_SCHEMA = ("(Tensor hidden, Tensor topk_index, Tensor topk_weights, Tensor gate_up, Tensor down, "
                       "float? swiglu_limit=None, Tensor? shared_gate=None, Tensor? shared_up=None, "
                       "Tensor? shared_down=None) -> Tensor")
_MOE_ROUTE_EXPERTS_SCHEMA = ("(Tensor hidden, Tensor logits, Tensor? bias, int top_k, int n_group, int topk_group, "
                             "bool renormalize, float scale, Tensor gate_up, Tensor down, float? swiglu_limit=None, "
                             "Tensor? shared_gate=None, Tensor? shared_up=None, Tensor? shared_down=None) -> Tensor")
_MULTI_LINEAR_SCHEMA = ("(Tensor x, Tensor[] weights, Tensor? norm_weight=None, float eps=0.0, Tensor? residual=None, "
                        "bool scale_then_round=False, bool write_normed=False, bool write_sum=False, "
                        "ScalarType? out_dtype=None) -> Tensor[]")
_MOE_ROUTE_SCHEMA = ("(Tensor logits, Tensor? bias, int top_k, int n_group, int topk_group, bool renormalize, "
                     "float scale) -> (Tensor, Tensor)")


@torch.library.custom_op(f"{NAMESPACE}::indexer_topk", mutates_args=(), schema=_INDEXER_TOPK_SCHEMA)
def indexer_topk(q, k, w, topk, mask=None, causal=True, sorted=True, key_range=None, check=True,
                 indexer_precision="bf16", new_keys=None, new_key_pos=None, k_scale=None):
    """q [B,S,H,D], k [B,T,D], w [B,S,H] -> int32 [B,S,topk] (-1 padded). sorted=False: rows
    may come in any order (the lowering asks for that when every consumer ignores order).

    Allowed keys: causal (t <= T - S + s), and either a bool `mask` [B|1,S|1,T] or `key_range`
    int32 [B,S,3] = (lo, hi, count): t allowed iff lo <= t <= hi (count 0: none). A key_range
    that is not one contiguous run per row (count != hi - lo + 1) raises NotAKeyRangeError.
    When the mask / ranges allow exactly the causal rows, the causal path runs alone; ranges that
    stay within them (e.g. a left-padded batch) run with the causal rule added (same answer).
    Decode-sized calls (decode_form) skip the dense mask's causal check: the causal path would skip
    no key tile there, and the check is a device sync (decode is host-bound without CUDA graphs).
    (Not the choice between mask and key_range, which the caller made: this one follows the
    kernel's form, from S and H at the call, and S is symbolic in a graph under dynamic shapes.)
    check=False (the lowering's choice under CUDA graphs), or a call while a CUDA graph is being
    captured: neither check runs (each is a device sync, which a graph cannot hold, and a path chosen
    from one call's data would be replayed for other data): the mask or ranges are read as given, on
    the general path -- the same answer, without the causal skips -- and the ranges' contiguity is
    asserted on the device (torch._assert_async: a device-side assert, not a silent wrong answer).
    indexer_precision="fp8": DeepSeek-V3.2's fp8 indexer (q, k quantised to e4m3 per token and head,
    kernels/fp8_indexer.py); "bf16" (default): the scores of q and k as given.
    new_keys [b,n,D] / new_key_pos [n] (fp8 only): the rows of the key cache k the model has just
    written; the scores then read the op's fp8 copy of k, into which only those rows are quantised
    (kernels/fp8_key_cache.py), not k itself.
    k_scale fp32 [B,T]: scores times k_scale[b, t] (DeepSeek's fp8_index times its key-scale cache);
    with "fp8" and e4m3 k (and q, its scales folded into w), the scales the model quantised them with."""
    return _indexer_topk_call(q, k, w, topk, mask, causal, sorted, key_range, check, indexer_precision, new_keys,
                              new_key_pos, k_scale)


def _indexer_topk_call(q, k, w, topk, mask, causal, sorted, key_range, check, indexer_precision, new_keys,
                       new_key_pos, k_scale, scores_out=None):
    """ic::indexer_topk's body; scores_out fp32 [B,S,topk]: also the picked keys' scores (the scored op)."""
    S, T = q.shape[1], k.shape[1]
    precision = {} if indexer_precision == "bf16" else {"indexer_precision": indexer_precision}  # bf16: as before
    if scores_out is not None:
        precision["scores_out"] = scores_out
    if new_keys is not None and indexer_precision != "fp8":
        raise ValueError("ic::indexer_topk: new_keys (the op's fp8 copy of a key cache) needs "
                         f"indexer_precision='fp8', got {indexer_precision!r}")
    if new_keys is not None:
        if new_key_pos is None or k_scale is not None:
            raise ValueError("ic::indexer_topk: new_keys needs new_key_pos, and the op's own fp8 copy of the keys "
                             "(not k_scale)")
        k, k_scale = fp8_key_mirror(k, new_keys, new_key_pos)
    if k_scale is not None:
        precision["k_scale"] = k_scale
    if mask is not None and key_range is not None:
        raise ValueError("ic::indexer_topk: pass either mask or key_range, not both")
    if not check or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        if key_range is not None:
            assert_key_range_async(key_range)
        return _indexer_topk(q, k, w, topk, mask, causal, sorted=sorted, key_range=key_range, **precision)
    if key_range is not None:
        plain_causal, within_causal = check_key_range(key_range, S, T, causal)
        if plain_causal:
            key_range = None  # plain causal rows: no range read
        causal = causal or within_causal  # same keys; causal chunks and rows stop at the diagonal
    if not causal and mask is not None and not decode_form(S, q.shape[2]) and mask_within_causal(mask, S, T):
        causal = True  # same answer, and key blocks above the diagonal are skipped
    return _indexer_topk(q, k, w, topk, mask, causal, sorted=sorted, key_range=key_range, **precision)


@indexer_topk.register_fake
def _(q, k, w, topk, mask=None, causal=True, sorted=True, key_range=None, check=True, indexer_precision="bf16",
      new_keys=None, new_key_pos=None, k_scale=None):
    B, S = q.shape[0], q.shape[1]
    return q.new_empty((B, S, topk), dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::indexer_topk_scored", mutates_args=(), schema=_INDEXER_TOPK_SCORED_SCHEMA)
def indexer_topk_scored(q, k, w, topk, mask=None, causal=True, sorted=True, key_range=None, check=True,
                        indexer_precision="bf16", new_keys=None, new_key_pos=None, k_scale=None):
    """ic::indexer_topk, and the picked keys' scores: (int32 [B,S,topk], fp32 [B,S,topk]), -inf in -1
    slots. The scores are the ones the selection compared (read back from its score buffer), for
    models that use their top-k's values."""
    scores_out = q.new_empty((q.shape[0], q.shape[1], topk), dtype=torch.float32)
    indices = _indexer_topk_call(q, k, w, topk, mask, causal, sorted, key_range, check, indexer_precision,
                                 new_keys, new_key_pos, k_scale, scores_out)
    return indices, scores_out


@indexer_topk_scored.register_fake
def _(q, k, w, topk, mask=None, causal=True, sorted=True, key_range=None, check=True, indexer_precision="bf16",
      new_keys=None, new_key_pos=None, k_scale=None):
    B, S = q.shape[0], q.shape[1]
    return q.new_empty((B, S, topk), dtype=torch.int32), q.new_empty((B, S, topk), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::sparse_attention", mutates_args=(), schema=_SPARSE_ATTENTION_SCHEMA)
def sparse_attention(q, k, v, indices, scale, causal=True):
    """q [B,S,Hq,Dqk], k [B,T,Hk,Dqk], v [B,T,Hk,Dv], indices [B,S,K] -> [B,S,Hq,Dv]."""
    return _sparse_attention(q, k, v, indices, scale, causal)


@sparse_attention.register_fake
def _(q, k, v, indices, scale, causal=True):
    B, S, Hq = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((B, S, Hq, v.shape[3]))


@torch.library.custom_op(f"{NAMESPACE}::sparse_mla", mutates_args=(), schema=_SPARSE_MLA_SCHEMA)
def sparse_mla(q, kv, indices, scale, dv, causal=True, rope=None, q_rope=None):
    """q [B,S,H,Dl+Dr], kv [B,T,Dl+Dr], indices [B,S,K] -> [B,S,H,dv]. rope [B,T,Dr]: kv is then the
    latent [B,T,Dl] alone, key row = [kv | rope]; q_rope [B,S,H,Dr]: q is then [B,S,H,Dl] (no copy of
    either on the Triton path)."""
    return _sparse_mla(q, kv, indices, scale, dv, causal, rope=rope, q_rope=q_rope)


@sparse_mla.register_fake
def _(q, kv, indices, scale, dv, causal=True, rope=None, q_rope=None):
    B, S, H = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((B, S, H, dv))


@torch.library.custom_op(f"{NAMESPACE}::moe_experts", mutates_args=(), schema=_MOE_EXPERTS_SCHEMA)
def moe_experts(hidden, topk_index, topk_weights, gate_up, down, swiglu_limit=None, shared_gate=None,
                shared_up=None, shared_down=None):
    """hidden [T,H], topk_index [T,k] (int; outside [0, E): no expert), topk_weights [T,k],
    gate_up [E,2I,H], down [E,H,I] -> [T,H]: sum_j w[t,j] * down[e] @ (silu(g) * u), (g, u) =
    (gate_up[e] @ hidden[t]).chunk(2); swiglu_limit L: g capped at L, u clamped to [-L, L] first
    (DeepSeek-V4). shared_gate / shared_up [IS,H], shared_down [H,IS]: a shared expert, + shared_down @
    (silu(shared_gate @ x) * (shared_up @ x)) per token (capped by swiglu_limit too). For decode-sized
    T (each token reads its experts' weights)."""
    shared = None if shared_gate is None and shared_up is None and shared_down is None \
        else (shared_gate, shared_up, shared_down)
    return _moe_experts(hidden, topk_index, topk_weights, gate_up, down, swiglu_limit=swiglu_limit, shared=shared)


@moe_experts.register_fake
def _(hidden, topk_index, topk_weights, gate_up, down, swiglu_limit=None, shared_gate=None, shared_up=None,
      shared_down=None):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op(f"{NAMESPACE}::moe_route_experts", mutates_args=(), schema=_MOE_ROUTE_EXPERTS_SCHEMA)
def moe_route_experts(hidden, logits, bias, top_k, n_group, topk_group, renormalize, scale, gate_up, down,
                      swiglu_limit=None, shared_gate=None, shared_up=None, shared_down=None):
    """moe_experts(hidden, *moe_route(logits, bias, ...)[::-1], gate_up, down, ...) with the routing
    done in the experts' first launch (kernels/moe_experts.py, route=) -> [T,H]."""
    shared = None if shared_gate is None and shared_up is None and shared_down is None \
        else (shared_gate, shared_up, shared_down)
    route = _Route(logits, bias, top_k, n_group, topk_group, renormalize, scale)
    return _moe_route_experts(hidden, route, gate_up, down, swiglu_limit=swiglu_limit, shared=shared)


@moe_route_experts.register_fake
def _(hidden, logits, bias, top_k, n_group, topk_group, renormalize, scale, gate_up, down, swiglu_limit=None,
      shared_gate=None, shared_up=None, shared_down=None):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op(f"{NAMESPACE}::moe_route", mutates_args=(), schema=_MOE_ROUTE_SCHEMA)
def moe_route(logits, bias, top_k, n_group, topk_group, renormalize, scale):
    """logits [T,E] -> (weights fp32 [T,top_k], ids int64 [T,top_k]): group-limited sigmoid routing,
    DeepSeek-V3's (kernels/moe_router.py)."""
    return _moe_route(logits, bias, top_k, n_group, topk_group, renormalize, scale)


@moe_route.register_fake
def _(logits, bias, top_k, n_group, topk_group, renormalize, scale):
    T = logits.shape[0]
    return logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int64)


@torch.library.custom_op(f"{NAMESPACE}::multi_linear", mutates_args=(), schema=_MULTI_LINEAR_SCHEMA)
def multi_linear(x, weights, norm_weight=None, eps=0.0, residual=None, scale_then_round=False, write_normed=False,
                 write_sum=False, out_dtype=None):
    """x [T,K], weights [N_i,K] (nn.Linear weights, no bias) -> [x @ W_i^T] ([T,N_i] each, x's dtype or
    out_dtype), in one launch for decode-sized T (kernels/multi_linear.py); with norm_weight [K], of
    RMSNorm(x + residual) instead, then (write_normed, write_sum) the normed rows and x + residual."""
    return _multi_linear(x, list(weights), norm_weight=norm_weight, eps=eps, residual=residual,
                         scale_then_round=scale_then_round, write_normed=write_normed, write_sum=write_sum,
                         out_dtype=out_dtype)


@multi_linear.register_fake
def _(x, weights, norm_weight=None, eps=0.0, residual=None, scale_then_round=False, write_normed=False,
      write_sum=False, out_dtype=None):
    products = [x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype or x.dtype) for w in weights]
    return products + [torch.empty_like(x, memory_format=torch.contiguous_format)
                       for _ in range(write_normed + write_sum)]


__all__ = ["indexer_topk", "indexer_topk_scored", "sparse_attention", "sparse_mla", "moe_experts", "moe_route",
           "moe_route_experts", "multi_linear", "NAMESPACE"]
