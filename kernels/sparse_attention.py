"""Top-k sparse attention: each query attends only to its selected keys (DSA main attention).

Two layouts, one Triton kernel (`_sparse_attention_kernel`):
  * MHA/GQA  `sparse_attention`: q [B,S,Hq,Dqk], k [B,T,Hk,Dqk], v [B,T,Hk,Dv];
    query head h uses kv head h // (Hq // Hk).
  * MLA absorbed `sparse_mla` (FlashMLA sparse mode): q [B,S,H,Dl+Dr], kv [B,T,Dl+Dr]
    -> treated as Hk = 1, k = kv, v = kv[..., :dv]; when dv is the leading power-of-two
    part of the key (512 of 576) the gathered key tile is reused as the value tile (V_FROM_K),
    so each selected latent row is read once. Or kv [B,T,Dl] (latent) + rope [B,T,Dr], a KV
    cache's two buffers: the key row is [kv | rope], read from both (never concatenated: at
    decode a cat would copy the whole cache per layer and step to read K of its T rows).
indices [B,S,K] (int32/int64): -1 = none; with causal=True an index > (T - S) + s is ignored.

Design: a program owns one query x BLOCK_H heads of one kv head (the heads are the M rows
of the tensor-core dots). It walks its index list in BLOCK_K blocks: gathers the selected
rows (masked loads, invalid rows never touch memory), logits = q . k^T with the key split
into a power-of-two part D_A and a padded tail D_B (576 = 512 + 64), each with its own base
pointer and strides (the tail: a view of the same rows, or MLA's rope buffer), online softmax in fp32
(exp2 domain), acc += p . v. A query with no valid key outputs zeros.
Decode / few programs: the index list is split over `num_splits` programs (flash-decoding);
each writes its normalised partial output and log-sum-exp, and `_combine_splits_kernel` (a second
launch, one program per (query, head, value chunk)) merges them. At decode the split programs are
bound by their own tensor-core work (~2.7 us per 64-key block at 20 heads on an H100), so many short
splits win, and their combine must be spread over many programs: done by the last split alone (an
earlier design, one launch) it cost about as much as the attention.
"""
from __future__ import annotations

import torch

from ._triton_utils import (
    HAS_TRITON,
    cdiv,
    dot_precision,
    interpreting,
    launch_config,
    launch_interpreted,
    new_output,
    next_pow2,
    num_sms,
    tl,
    triton,
    upcast_dots,
    use_triton_for,
)
from .reference import sparse_attention_ref, sparse_mla_ref

LOG2E = 1.4426950408889634


def _sparse_attention_kernel(
    q_ptr, qb_ptr, k_ptr, kb_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr,
    S, T, Hk, G, K, D_B, DV, scale_log2,  # G = Hq // Hk query heads per kv head
    sq_b, sq_s, sq_h, sq_d,  # q: the query's leading D_A columns
    sqb_b, sqb_s, sqb_h, sqb_d,  # qb: the query's D_B tail columns (a view of q, or MLA's q rope part)
    sk_b, sk_t, sk_h, sk_d,  # k: the key's leading D_A columns
    skb_b, skb_t, skb_h, skb_d,  # kb: the key's D_B tail columns (a view of k, or another tensor: MLA rope)
    sv_b, sv_t, sv_h, sv_d,
    si_b, si_s, si_k,
    so_b, so_s, so_h, so_split, so_d,
    sl_b, sl_s, sl_h, sl_split,
    D_A: tl.constexpr, D_B_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, V_FROM_K: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: fp32 dot operands (see upcast_dots)
):
    """o[b,s,h,split,:] = softmax-weighted values over this split's valid indices (normalised), and
    with WRITE_LSE the split's log-sum-exp (log2 domain) for _combine_splits_kernel.
    (Over our ~80-line function size: the online-softmax loop carries the running max, sum and
    accumulator, which helper calls would have to pass back and forth.)"""
    # program -> (b, s, kv head, head block); head blocks of one query are neighbours (L2 reuse)
    pid = tl.program_id(0)
    HB = tl.cdiv(G, BLOCK_H)  # head blocks per kv head
    hb = pid % HB
    hk = (pid // HB) % Hk
    bs = pid // (HB * Hk)
    b = (bs // S).to(tl.int64)
    s = bs % S
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)

    g = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] head within the group
    h_ok = g < G
    h = hk * G + g
    q_row = q_ptr + b * sq_b + s.to(tl.int64) * sq_s + h * sq_h  # [BLOCK_H]
    da = tl.arange(0, D_A)
    q_a = tl.load(q_row[:, None] + da[None, :] * sq_d, mask=h_ok[:, None], other=0.0)  # [BLOCK_H, D_A]
    if UPCAST_DOT:
        q_a = q_a.to(tl.float32)
    if D_B_PAD > 0:  # padded tail of the key dim (e.g. the 64 rope dims of 576)
        db = tl.arange(0, D_B_PAD)  # column within the tail
        db_ok = db < D_B
        qb_row = qb_ptr + b * sqb_b + s.to(tl.int64) * sqb_s + h * sqb_h  # [BLOCK_H]
        q_b = tl.load(qb_row[:, None] + db[None, :] * sqb_d, mask=h_ok[:, None] & db_ok[None, :], other=0.0)
        if UPCAST_DOT:
            q_b = q_b.to(tl.float32)
    dv = tl.arange(0, DV_PAD)
    dv_ok = dv < DV

    # this split's slice [k_lo, k_hi) of the index list, in whole BLOCK_K blocks
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), num_splits) * BLOCK_K
    k_lo = split * per_split
    k_hi = tl.minimum(K, k_lo + per_split)
    last_key = (T - S) + s  # causal horizon of this query
    idx_row = idx_ptr + b * si_b + s.to(tl.int64) * si_s

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros((BLOCK_H,), tl.float32)  # running denominator
    acc = tl.zeros((BLOCK_H, DV_PAD), tl.float32)
    kk = k_lo + tl.arange(0, BLOCK_K)
    ids_next = tl.load(idx_row + kk * si_k, mask=kk < k_hi, other=-1)  # [BLOCK_K] the first block's
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # the block's indices were loaded one iteration ahead: the gather's addresses then come from
        # a loop-carried value, not a load of this iteration, so the software pipeliner gives the
        # gathered tiles num_stages - 1 buffers and overlaps the next gather with this block's dots
        # (an index load in the same iteration left the tiles one buffer: gather and dots in turn)
        ids = ids_next
        kk = k0 + BLOCK_K + tl.arange(0, BLOCK_K)
        ids_next = tl.load(idx_row + kk * si_k, mask=kk < k_hi, other=-1)
        valid = (ids >= 0) & (ids < T)
        if CAUSAL:
            valid = valid & (ids <= last_key)
        k_row = k_ptr + b * sk_b + ids.to(tl.int64) * sk_t + hk * sk_h  # [BLOCK_K]
        k_a = tl.load(k_row[:, None] + da[None, :] * sk_d, mask=valid[:, None], other=0.0)  # [BLOCK_K, D_A]
        if UPCAST_DOT:
            k_a = k_a.to(tl.float32)
        logits = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_K]
        if D_B_PAD > 0:
            kb_row = kb_ptr + b * skb_b + ids.to(tl.int64) * skb_t + hk * skb_h  # [BLOCK_K]
            k_b = tl.load(kb_row[:, None] + db[None, :] * skb_d, mask=valid[:, None] & db_ok[None, :], other=0.0)
            if UPCAST_DOT:
                k_b = k_b.to(tl.float32)
            logits += tl.dot(q_b, tl.trans(k_b), input_precision=DOT_PRECISION)
        logits = tl.where(valid[None, :], logits * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: keep p = 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(logits - m_safe[:, None])  # [BLOCK_H, BLOCK_K]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_FROM_K:
            v_t = k_a  # value = leading D_A columns of the gathered key rows (DV == D_A)
        else:
            v_row = v_ptr + b * sv_b + ids.to(tl.int64) * sv_t + hk * sv_h
            v_t = tl.load(v_row[:, None] + dv[None, :] * sv_d, mask=valid[:, None] & dv_ok[None, :], other=0.0)
            if UPCAST_DOT:
                v_t = v_t.to(tl.float32)
        p_v = p.to(v_ptr.dtype.element_ty)  # probabilities rounded like the GPU's 16-bit MMA input
        if UPCAST_DOT:
            p_v = p_v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v_t, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no valid key -> zeros
    o_row = o_ptr + b * so_b + s.to(tl.int64) * so_s + h * so_h + split * so_split
    tl.store(o_row[:, None] + dv[None, :] * so_d, o.to(o_ptr.dtype.element_ty),
             mask=h_ok[:, None] & dv_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        lse_row = lse_ptr + b * sl_b + s.to(tl.int64) * sl_s + h * sl_h  # [BLOCK_H]
        tl.store(lse_row + split * sl_split, lse, mask=h_ok)


def _combine_splits_kernel(
    o_ptr, lse_ptr, out_ptr, S, Hq, DV, num_splits,
    so_b, so_s, so_h, so_split, so_d,
    sl_b, sl_s, sl_h, sl_split,
    sf_b, sf_s, sf_h, sf_d,
    SPLIT_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b,s,h,d] = sum_p w_p o[b,s,h,p,d] / sum_p w_p, w_p = 2^(lse_p - max_p lse_p), for one
    (b, s, h) and BLOCK_D value columns (an empty split: lse -inf, weight 0; no valid key anywhere:
    zeros)."""
    row = tl.program_id(0)  # (b * S + s) * Hq + h
    h = row % Hq
    s = ((row // Hq) % S).to(tl.int64)
    b = (row // (Hq * S)).to(tl.int64)
    o_row = o_ptr + b * so_b + s * so_s + h * so_h
    lse_row = lse_ptr + b * sl_b + s * sl_s + h * sl_h
    out_row = out_ptr + b * sf_b + s * sf_s + h * sf_h
    sp = tl.arange(0, SPLIT_PAD)
    sp_ok = sp < num_splits
    lse = tl.load(lse_row + sp * sl_split, mask=sp_ok, other=float("-inf"))  # [SPLIT_PAD]
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.math.exp2(lse - lse_max)  # [SPLIT_PAD]
    denom = tl.sum(weight, axis=0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DV
    part = tl.load(o_row + sp[:, None] * so_split + d[None, :] * so_d, mask=sp_ok[:, None] & d_ok[None, :],
                   other=0.0)  # [SPLIT_PAD, BLOCK_D]
    acc = tl.sum(part * weight[:, None], axis=0)  # [BLOCK_D]
    tl.store(out_row + d * sf_d, (acc / denom).to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------- launch configs

def _configs(d_total: int, block_hs: tuple[int, ...]):
    """sm_90 candidates (checked by AOT compiles for sm_90: smem, registers, spills).

    BLOCK_K 32/64; 4 or 8 warps (8 split the [BLOCK_H, 512] fp32 accumulator of wide MLA keys over
    two warpgroups, needed at BLOCK_H = 64; 4 won at BLOCK_H <= 32, H = 20: 10.6 vs 15.9 ms at 16K on
    the H200). Stages: narrow keys (<= 256) 2-3; wide keys 2. With the indices loaded one block
    ahead, 3 stages double-buffer the gathered tiles (2 stages: one buffer); those wide-key configs
    are right (test_three_stage_mla_configs_on_gpu) but were no faster on an H100 at 16K, 20 heads
    (BLOCK_K 32: 12.8 vs 13.0 ms; BLOCK_K 64: 15.4 vs 11.8; bench/sweep_sparse_mla.py --stages 2 3),
    so they are not candidates. No 1-stage configs: never fastest in the sweep, and a kernel of the
    same shape (gathered tile reused as the value operand) gave wrong output on the H200 with 1
    stage (docs/benchmarks.md, "tried, measured slower, not adopted").
    """
    stages = (2,) if d_total > 256 else (2, 3)
    return [triton.Config({"BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bh in block_hs for bk in (32, 64) for w in (4, 8) for st in stages]


def _block_h_candidates(G: int) -> tuple[int, ...]:
    """Padded group (>= 16 rows, mma.sync) / 32 rows / 64 rows (wgmma M)."""
    return tuple(sorted({min(64, max(16, next_pow2(G))), 64} | ({32} if G >= 32 else set())))


_TUNED: dict = {}
_MIN_SPLIT_KEYS = 32


def _jit_kernel():
    if "jit" not in _TUNED:
        _TUNED["jit"] = triton.jit(_sparse_attention_kernel)
    return _TUNED["jit"]


def _jit_combine():
    if "combine" not in _TUNED:
        _TUNED["combine"] = triton.jit(_combine_splits_kernel)
    return _TUNED["combine"]


def _tuned_kernel(d_total: int, G: int):
    key = (d_total > 256, _block_h_candidates(G))
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(
            _configs(d_total, key[1]),
            key=["G", "D_A", "D_B_PAD", "DV_PAD", "CAUSAL", "V_FROM_K", "WRITE_LSE"],
        )(_jit_kernel())
    return _TUNED[key]


def _interpreter_meta(G: int) -> dict:
    return {"BLOCK_H": min(64, max(16, next_pow2(G))), "BLOCK_K": 16}


# --------------------------------------------------------------------------- host side

def _key_split(dqk: int) -> tuple[int, int, int]:
    """Key dim -> (D_A power of two <= dqk, tail D_B, tail padded D_B_PAD (0 or >= 16))."""
    d_a = 1 << (dqk.bit_length() - 1)
    return d_a, dqk - d_a, _tail_pad(dqk - d_a)


def _tail_pad(d_b: int) -> int:
    """The key tail's padded width D_B_PAD: 0 (no tail) or a power of two >= 16 (tl.dot's minimum)."""
    return max(16, next_pow2(d_b)) if d_b else 0


def _default_splits(programs: int, K: int, device: torch.device) -> int:
    """Split the index list when there are too few programs to fill the GPU (decode), down to
    _MIN_SPLIT_KEYS keys a split (a split's time is its blocks' tensor-core work and latency, so
    shorter splits over more SMs win while the merge stays cheap: one query, 20 heads, 2048 keys on an
    H100, kernel + merge from a CUDA graph: 64 splits of 32 keys 9.1 us, 32 of 64 keys 10.9 us;
    bench/sweep_sparse_mla.py --decode-splits)."""
    return max(1, min(cdiv(2 * num_sms(device), programs), cdiv(K, _MIN_SPLIT_KEYS)))


def sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
    scale: float, causal: bool = True, num_splits: int | None = None, config=None,
) -> torch.Tensor:
    """Triton path for both layouts (CPU tensors run in the Triton interpreter). -> [B,S,Hq,Dv].

    config: a triton.Config to launch instead of autotuning (bench/sweep_sparse_mla.py)."""
    d_a = _key_split(q.shape[3])[0]  # _launch checks that k's columns fit q's
    return _launch(q[..., :d_a], q[..., d_a:], k[..., :d_a], k[..., d_a:], v, indices, scale, causal, num_splits,
                   config)


def _launch(
    q: torch.Tensor, q_tail: torch.Tensor, k: torch.Tensor, k_tail: torch.Tensor, v: torch.Tensor,
    indices: torch.Tensor, scale: float, causal: bool, num_splits: int | None, config,
) -> torch.Tensor:
    """The kernel on query rows [q | q_tail] and key rows [k | k_tail]: q [B,S,Hq,D_A], k [B,T,Hk,D_A]
    (D_A a power of two), q_tail [B,S,Hq,D_B], k_tail [B,T,Hk,D_B] (any tensors: views of the same
    rows, or MLA's separate rope parts)."""
    B, S, Hq, d_a = q.shape
    T, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    K = indices.shape[-1]
    d_b = q_tail.shape[3]
    d_b_pad = _tail_pad(d_b)
    assert Hq % Hk == 0 and k.shape == (B, T, Hk, d_a) and k_tail.shape == (B, T, Hk, d_b) \
        and q_tail.shape == (B, S, Hq, d_b) and v.shape[:3] == (B, T, Hk) and d_a == next_pow2(d_a), \
        (q.shape, q_tail.shape, k.shape, k_tail.shape, v.shape)
    assert indices.shape[:2] == (B, S), (indices.shape, q.shape)
    q_tail, k, k_tail, v = q_tail.to(q.dtype), k.to(q.dtype), k_tail.to(q.dtype), v.to(q.dtype)
    if d_b == 0:
        q_tail, k_tail = q, k  # never read (D_B_PAD = 0): any valid pointers, not empty views
    v_from_k = Dv == d_a and v.data_ptr() == k.data_ptr() and v.stride() == k.stride()
    programs_per_block_h = B * S * Hk  # x head blocks (BLOCK_H is tuned)
    splits = num_splits or _default_splits(programs_per_block_h * cdiv(G, 64), K, q.device)
    out = new_output((B, S, Hq, Dv), q.dtype, q.device)
    if splits > 1:  # fp32 partials + log-sum-exps, merged into `out` by _combine_splits
        o = new_output((B, S, Hq, splits, Dv), torch.float32, q.device)
        lse = new_output((B, S, Hq, splits), torch.float32, q.device)
        o_strides, lse_strides = o.stride(), lse.stride()
    else:  # the programs write `out` directly (o_ptr); lse unused
        o = lse = out
        o_strides = (*out.stride()[:3], 0, out.stride(3))
        lse_strides = (0, 0, 0, 0)
    args = (
        q, q_tail, k, k_tail, v, indices, o, lse,
        S, T, Hk, G, K, d_b, Dv, float(scale) * LOG2E,
        *q.stride(), *q_tail.stride(), *k.stride(), *k_tail.stride(), *v.stride(), *indices.stride(), *o_strides,
        *lse_strides,
    )
    consts = {"D_A": d_a, "D_B_PAD": d_b_pad, "DV_PAD": max(16, next_pow2(Dv)),
              "CAUSAL": bool(causal), "V_FROM_K": v_from_k, "WRITE_LSE": splits > 1,
              "DOT_PRECISION": dot_precision(q.dtype), "UPCAST_DOT": upcast_dots(q)}

    def grid(meta):
        return (programs_per_block_h * cdiv(G, meta["BLOCK_H"]), splits)

    if interpreting(q):
        launch_interpreted(_sparse_attention_kernel, grid, *args, **consts, **_interpreter_meta(G))
    elif config is not None:
        launch_config(_jit_kernel(), grid, args, consts, config)
    else:
        _tuned_kernel(d_a + d_b, G)[grid](*args, **consts)
    if splits > 1:
        _combine_splits(o, lse, out)
    return out


def _combine_splits(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """out [B,S,Hq,Dv] <- the split partials o [B,S,Hq,P,Dv] (fp32) weighted by their lse [B,S,Hq,P]."""
    B, S, Hq, splits, Dv = o.shape
    block_d = min(64, max(16, next_pow2(Dv)))
    grid = (B * S * Hq, cdiv(Dv, block_d))
    args = (o, lse, out, S, Hq, Dv, splits, *o.stride(), *lse.stride(), *out.stride())
    consts = {"SPLIT_PAD": next_pow2(splits), "BLOCK_D": block_d}
    if interpreting(o):
        launch_interpreted(_combine_splits_kernel, grid, *args, **consts)
    else:
        _jit_combine()[grid](*args, **consts, num_warps=2)


def sparse_mla_triton(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
    causal: bool = True, num_splits: int | None = None, config=None, rope: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLA absorbed form: one shared key row per token, value = the row's first dv columns. -> [B,S,H,dv].

    kv [B,T,Dl+Dr] holds the whole row; or kv [B,T,Dl] the latent and rope [B,T,Dr] its rope part
    (a cache's two buffers, any strides): the row [kv | rope] is then read from both, never
    concatenated, when Dl is the key's power-of-two part (Dr < Dl, e.g. 576 = 512 + 64) and
    dv <= Dl. Otherwise (the kernel's key split can't sit at Dl) they are concatenated first:
    correct, but a copy of the whole cache per call. Likewise q [B,S,H,Dl+Dr], or q [B,S,H,Dl] and
    q_rope [B,S,H,Dr] (at a 200K prefill the concatenated q alone is 4.3 GiB)."""
    dr = rope.shape[-1] if rope is not None else q_rope.shape[-1] if q_rope is not None else 0
    dl = kv.shape[-1] if rope is not None else kv.shape[-1] - dr  # latent width
    apart = dr > 0 and _rope_apart(dl, dr, dv)
    if not apart:
        kv = kv if rope is None else torch.cat((kv, rope), dim=-1)  # [B,T,Dl+Dr]
        q = q if q_rope is None else torch.cat((q, q_rope), dim=-1)  # [B,S,H,Dl+Dr]
        return sparse_attention_triton(q, kv[:, :, None, :], kv[:, :, None, :dv], indices, scale, causal, num_splits,
                                       config)
    q, q_rope = (q[..., :dl], q[..., dl:]) if q_rope is None else (q, q_rope)
    k, k_rope = (kv[..., :dl], kv[..., dl:]) if rope is None else (kv, rope)
    v = k[:, :, None, :dv]  # [B,T,1,dv] (same storage as the key: V_FROM_K when dv = Dl)
    return _launch(q, q_rope, k[:, :, None, :], k_rope[:, :, None, :], v, indices, scale, causal, num_splits,
                   config)


def _rope_apart(dl: int, dr: int, dv: int) -> bool:
    """Can the kernel read the latent [.., Dl] and rope [.., Dr] as its key's D_A and D_B parts?"""
    return _key_split(dl + dr)[0] == dl and dv <= dl


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
    scale: float, causal: bool = True, use_triton: bool | None = None,
) -> torch.Tensor:
    """Top-k sparse attention (MHA/GQA). q [B,S,Hq,Dqk], k [B,T,Hk,Dqk], v [B,T,Hk,Dv],
    indices [B,S,K] -> [B,S,Hq,Dv] (q's dtype). use_triton: see indexer_topk."""
    if use_triton_for(q, use_triton):
        return sparse_attention_triton(q, k, v, indices, scale, causal)
    return sparse_attention_ref(q, k, v, indices, scale, causal)


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
    causal: bool = True, use_triton: bool | None = None, rope: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLA absorbed sparse attention. q [B,S,H,Dl+Dr], kv [B,T,Dl+Dr], indices [B,S,K] -> [B,S,H,dv].
    rope [B,T,Dr]: kv is then the latent [B,T,Dl] alone, key row = [kv | rope]; q_rope [B,S,H,Dr]: q is
    then [B,S,H,Dl], query row = [q | q_rope] (see sparse_mla_triton)."""
    if use_triton_for(q, use_triton):
        return sparse_mla_triton(q, kv, indices, scale, dv, causal, rope=rope, q_rope=q_rope)
    return sparse_mla_ref(q, kv, indices, scale, dv, causal, rope, q_rope)


__all__ = ["sparse_attention", "sparse_mla", "sparse_attention_triton", "sparse_mla_triton", "HAS_TRITON"]
