"""Absorbed-MLA sparse attention with the *keys* as the tensor-core M rows (prefill form).

    o[b,s,h,:] = softmax_t(q[b,s,h] . kv[b,t] * scale) . kv[b,t,:dv]   over t in indices[b,s] (-1 = none)

Same op as `sparse_attention.sparse_mla_triton`; different tiling. There the heads are the M
rows of both dots, and 20 heads (GLM-5 / the 30B shape) pad to 32 rows: too few for Hopper's
wgmma (M = 64 per warpgroup), so Triton falls back to mma.sync and spills registers (AOT sm_90:
255 regs, 160 B stack). Here each program still owns one query x BLOCK_H heads, but computes
transposed tiles:
    logits^T [BLOCK_K, BLOCK_H] = kv_tile [BLOCK_K, 512|64] . q^T [512|64, BLOCK_H]   (M = keys)
    acc^T    [512, BLOCK_H]    += kv_tile^T [512, BLOCK_K] . p^T [BLOCK_K, BLOCK_H]   (M = 512)
so both dots have M >= 64 whatever the head count, q^T stays in shared memory instead of
registers, and the gathered [BLOCK_K, 576] rows serve as keys and (first 512 columns) values.
The online softmax runs down the columns (one per head). Only the V_FROM_K case (dv = the
power-of-two part of the key) and no key split (prefill); decode keeps the split kernel.
Reference: `reference.sparse_mla_ref`.
"""
from __future__ import annotations

import torch

from ._triton_utils import cdiv, dot_precision, interpreting, launch_config, launch_interpreted, new_output
from ._triton_utils import next_pow2, tl, triton, upcast_dots

LOG2E = 1.4426950408889634


def _sparse_mla_keys_major_kernel(
    q_ptr, kv_ptr, idx_ptr, o_ptr,
    S, T, H, K, D_B, scale_log2,  # q [B,S,H,D_A+D_B], kv [B,T,D_A+D_B], idx [B,S,K], o [B,S,H,D_A]
    sq_b, sq_s, sq_h, sq_d,
    skv_b, skv_t, skv_d,
    si_b, si_s, si_k,
    so_b, so_s, so_h, so_d,
    D_A: tl.constexpr, D_B_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: fp32 dot operands (see upcast_dots)
):
    pid = tl.program_id(0)
    HB = tl.cdiv(H, BLOCK_H)  # head blocks of one query are neighbours (L2 reuse of its rows)
    hb = pid % HB
    b = (pid // HB // S).to(tl.int64)
    s = (pid // HB) % S
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = h < H
    q_col = q_ptr + b * sq_b + s.to(tl.int64) * sq_s + h * sq_h  # [BLOCK_H]
    da = tl.arange(0, D_A)
    db = D_A + tl.arange(0, D_B_PAD)
    db_ok = db < D_A + D_B
    q_a = tl.load(q_col[None, :] + da[:, None] * sq_d, mask=h_ok[None, :], other=0.0)  # q^T [D_A, BLOCK_H]
    q_b = tl.load(q_col[None, :] + db[:, None] * sq_d, mask=h_ok[None, :] & db_ok[:, None], other=0.0)
    if UPCAST_DOT:
        q_a = q_a.to(tl.float32)
        q_b = q_b.to(tl.float32)

    last_key = (T - S) + s  # causal horizon of this query
    idx_row = idx_ptr + b * si_b + s.to(tl.int64) * si_s
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max per head (log2 domain)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((D_A, BLOCK_H), tl.float32)  # o^T
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_row + kk * si_k, mask=kk < K, other=-1)  # [BLOCK_K]
        valid = (ids >= 0) & (ids < T)
        if CAUSAL:
            valid = valid & (ids <= last_key)
        row = kv_ptr + b * skv_b + ids.to(tl.int64) * skv_t  # [BLOCK_K]
        kv_a = tl.load(row[:, None] + da[None, :] * skv_d, mask=valid[:, None], other=0.0)  # [BLOCK_K, D_A]
        kv_b = tl.load(row[:, None] + db[None, :] * skv_d, mask=valid[:, None] & db_ok[None, :], other=0.0)
        if UPCAST_DOT:
            kv_a = kv_a.to(tl.float32)
            kv_b = kv_b.to(tl.float32)
        logits = tl.dot(kv_a, q_a, input_precision=DOT_PRECISION)  # [BLOCK_K, BLOCK_H]
        logits += tl.dot(kv_b, q_b, input_precision=DOT_PRECISION)
        logits = tl.where(valid[:, None], logits * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: keep p = 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(logits - m_safe[None, :])  # [BLOCK_K, BLOCK_H]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        p_v = p.to(kv_ptr.dtype.element_ty)  # probabilities rounded like the GPU's 16-bit MMA input
        if UPCAST_DOT:
            p_v = p_v.to(tl.float32)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(kv_a), p_v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[None, :]  # [D_A, BLOCK_H]; no valid key -> zeros
    o_col = o_ptr + b * so_b + s.to(tl.int64) * so_s + h * so_h
    tl.store(o_col[None, :] + da[:, None] * so_d, o.to(o_ptr.dtype.element_ty), mask=h_ok[None, :])


def _configs(H: int):
    """sm_90 (AOT-compiled, triton 3.6, H = 20): BLOCK_K = 64 keys = wgmma M; BLOCK_H = N (heads
    padded to >= 16, at most 32: at 64 the [512, 64] fp32 accumulator spills). 8 warps split the
    [512, BLOCK_H] accumulator (4 warps: 255 regs + spills); 2 stages: 207 regs, 189 KB smem,
    gathers by cp.async; 1 stage: 240 regs. BLOCK_K = 128 needs 340 KB smem at 2 stages."""
    block_h = min(32, max(16, next_pow2(H)))
    return [triton.Config({"BLOCK_H": block_h, "BLOCK_K": 64}, num_warps=8, num_stages=st) for st in (2, 1)]


_TUNED: dict = {}


def _jit_kernel():
    if "jit" not in _TUNED:
        _TUNED["jit"] = triton.jit(_sparse_mla_keys_major_kernel)
    return _TUNED["jit"]


def _tuned_kernel(H: int):
    if H not in _TUNED:
        _TUNED[H] = triton.autotune(_configs(H), key=["H", "D_A", "D_B_PAD", "CAUSAL"])(_jit_kernel())
    return _TUNED[H]


def supports(q: torch.Tensor, kv: torch.Tensor, dv: int) -> bool:
    """This tiling needs dv = the power-of-two part of the key width (512 of 576)."""
    dqk = kv.shape[-1]
    return dv == 1 << (dqk.bit_length() - 1) and dqk - dv <= 256


def sparse_mla_keys_major(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int,
    causal: bool = True, config=None,
) -> torch.Tensor:
    """q [B,S,H,Dl+Dr], kv [B,T,Dl+Dr], indices [B,S,K] -> [B,S,H,dv] (q's dtype); dv = Dl (see supports)."""
    B, S, H, dqk = q.shape
    T, K = kv.shape[1], indices.shape[-1]
    assert kv.shape == (B, T, dqk) and indices.shape[:2] == (B, S) and supports(q, kv, dv), \
        (q.shape, kv.shape, indices.shape, dv)
    kv = kv.to(q.dtype)
    d_b = dqk - dv
    o = new_output((B, S, H, dv), q.dtype, q.device)
    args = (q, kv, indices, o, S, T, H, K, d_b, float(scale) * LOG2E,
            *q.stride(), *kv.stride(), *indices.stride(), *o.stride())
    consts = {"D_A": dv, "D_B_PAD": max(16, next_pow2(d_b)), "CAUSAL": bool(causal),
              "DOT_PRECISION": dot_precision(q.dtype), "UPCAST_DOT": upcast_dots(q)}

    def grid(meta):
        return (B * S * cdiv(H, meta["BLOCK_H"]),)

    if interpreting(q):
        meta = config.kwargs if config is not None else {"BLOCK_H": min(32, max(16, next_pow2(H))), "BLOCK_K": 16}
        launch_interpreted(_sparse_mla_keys_major_kernel, grid, *args, **consts, **meta)
    elif config is not None:
        launch_config(_jit_kernel(), grid, args, consts, config)
    else:
        _tuned_kernel(H)[grid](*args, **consts)
    return o


__all__ = ["sparse_mla_keys_major", "supports"]
