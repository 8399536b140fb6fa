"""Top-k selection over masked fp32 score rows: radix select, one program per row.

    out[b, r, :] = the `topk` largest finite scores[b, r, :limit_r], as column indices in
                   descending score order, -1 padded (int32)          (-inf = not allowed)

torch.topk over the indexer's [chunk, width] fp32 score buffer cost as much as computing the
scores (4.4 ms per layer at 16K, 143 ms at 128K on the H200, docs/benchmarks.md). Here:
  1. radix passes: each float maps to an integer key with the same order; pass p takes the
     histogram of the next DIGIT_BITS bits of the keys whose higher bits equal the prefix found
     so far, and the bin holding the k-th largest extends the prefix. After ceil(32/DIGIT_BITS)
     passes the prefix is the k-th largest key itself (`thr`), and `need` says how many keys
     equal to `thr` to take (ties: the lowest columns).
  2. one compaction pass writes the columns of keys > thr, then the first `need` keys == thr,
     into the output slots (positions from a running cumsum).
  3. the picks are sorted by (score desc, column asc): tl.sort of packed int64 keys.
A row is read only up to its causal horizon (`limit_r = min(width, limit_base + r)`), so a
causal chunk reads about half of its buffer; each pass re-reads the row (L2-resident for
moderate widths). Reference: `reference.topk_indices_from_scores` (torch.topk).
"""
from __future__ import annotations

import torch

from ._triton_utils import cdiv, interpreting, launch_interpreted, new_output, next_pow2, tl, triton, use_triton_for
from .reference import topk_indices_from_scores

_EMPTY = tl.constexpr(-(2**63)) if tl is not None else None  # packed value of an empty slot (sorts last)


def _order_key(x):
    """fp32 -> uint32 with the same order (negative floats: all bits flipped; else sign set)."""
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


if triton is not None:  # a JIT helper (interpreted launches route it to the interpreter)
    _order_key = triton.jit(_order_key)


def _topk_select_kernel(
    scores_ptr, out_ptr,
    n_rows, width, limit_base,  # row r reads columns [0, width), or [0, min(width, limit_base + r)) if CAUSAL_LIMIT
    ss_b, ss_r, ss_c,  # scores [B, n_rows, width] fp32
    so_b, so_r, so_k,  # out [B, n_rows, TOPK] int32
    TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr,
    CAUSAL_LIMIT: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program: 1 on the GPU; more only to vectorise the interpreter
):
    BINS: tl.constexpr = 1 << DIGIT_BITS
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    b = tl.program_id(1).to(tl.int64)
    row_ptr = scores_ptr + b * ss_b + rows.to(tl.int64) * ss_r  # [BLOCK_R]
    out_row = out_ptr + b * so_b + rows.to(tl.int64) * so_r
    limit = tl.where(rows < n_rows, width, 0)  # [BLOCK_R] columns to read per row
    if CAUSAL_LIMIT:
        limit = tl.minimum(limit, limit_base + rows)
    cols = tl.arange(0, BLOCK)
    bins = tl.arange(0, BINS)
    hist_bin = tl.arange(0, BLOCK_R)[:, None] * BINS  # [BLOCK_R, 1] offset of each row's histogram

    # 1. radix passes: prefix = the top bits of the k-th largest key, need = picks left among them.
    prefix = tl.zeros([BLOCK_R], tl.uint32)
    need = tl.full([BLOCK_R], TOPK, tl.int32)
    n_valid = tl.zeros([BLOCK_R], tl.int32)
    for p in tl.static_range((32 + DIGIT_BITS - 1) // DIGIT_BITS):
        shift = (32 - (p + 1) * DIGIT_BITS) * (32 > (p + 1) * DIGIT_BITS)
        prev_shift = 32 - p * DIGIT_BITS
        hist = tl.zeros([BLOCK_R * BINS], tl.int32)
        for c0 in range(0, tl.max(limit, 0), BLOCK):
            c = c0 + cols[None, :]  # [1, BLOCK]
            x = tl.load(row_ptr[:, None] + c * ss_c, mask=c < limit[:, None], other=float("-inf"))
            key = _order_key(x)  # [BLOCK_R, BLOCK]
            ok = x > float("-inf")
            if p > 0:
                ok = ok & ((key >> prev_shift) == prefix[:, None])
            digit = ((key >> shift) & ((1 << (prev_shift - shift)) - 1)).to(tl.int32)
            hist += tl.histogram(tl.reshape(hist_bin + digit, [BLOCK_R * BLOCK]), BLOCK_R * BINS,
                                 mask=tl.reshape(ok, [BLOCK_R * BLOCK]))
        hist2 = tl.reshape(hist, [BLOCK_R, BINS])
        n_cand = tl.sum(hist2, 1)
        if p == 0:
            n_valid = n_cand
        at_least = n_cand[:, None] - tl.cumsum(hist2, 1) + hist2  # candidates with digit >= bin
        sel = tl.max(tl.where(at_least >= need[:, None], bins[None, :], -1), 1)  # -1: pass 0, < TOPK keys
        need -= tl.sum(tl.where(bins[None, :] > sel[:, None], hist2, 0), 1)
        prefix = (prefix << (prev_shift - shift)) | tl.maximum(sel, 0).to(tl.uint32)
    take_all = n_valid <= TOPK  # every finite score is picked
    thr = tl.where(take_all, 0x007FFFFF, prefix).to(tl.uint32)  # 0x007FFFFF = key of -inf
    need = tl.where(take_all, 0, need)
    n_gt = tl.minimum(n_valid, TOPK) - need

    # 2. compaction: keys > thr fill slots [0, n_gt), the first `need` keys == thr slots [n_gt, TOPK).
    base_gt = tl.zeros([BLOCK_R], tl.int32)
    base_eq = tl.zeros([BLOCK_R], tl.int32)
    for c0 in range(0, tl.max(limit, 0), BLOCK):
        c = c0 + cols[None, :]
        x = tl.load(row_ptr[:, None] + c * ss_c, mask=c < limit[:, None], other=float("-inf"))
        key = _order_key(x)
        ok = x > float("-inf")
        gt = (ok & (key > thr[:, None])).to(tl.int32)
        eq = (ok & (key == thr[:, None])).to(tl.int32)
        rank_gt = base_gt[:, None] + tl.cumsum(gt, 1) - 1
        rank_eq = base_eq[:, None] + tl.cumsum(eq, 1) - 1
        slot = tl.where(gt != 0, rank_gt, n_gt[:, None] + rank_eq)
        tl.store(out_row[:, None] + slot * so_k, c, mask=(gt != 0) | ((eq != 0) & (rank_eq < need[:, None])))
        base_gt += tl.sum(gt, 1)
        base_eq += tl.sum(eq, 1)
    tl.debug_barrier()  # the picks written above are read back by other threads

    # 3. sort the picks: packed = (signed key << 32) | (2^31 - 1 - column), descending.
    j = tl.arange(0, TOPK_PAD)[None, :]
    filled = j < tl.minimum(n_valid, TOPK)[:, None]  # [BLOCK_R, TOPK_PAD]
    picked = tl.load(out_row[:, None] + j * so_k, mask=filled, other=0)
    x = tl.load(row_ptr[:, None] + picked.to(tl.int64) * ss_c, mask=filled, other=0.0)
    signed_key = (_order_key(x) ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64)
    packed = tl.where(filled, (signed_key << 32) | (2147483647 - picked).to(tl.int64), _EMPTY)
    packed = tl.sort(packed, 1, descending=True)
    picked = tl.where(packed == _EMPTY, -1, 2147483647 - (packed & 0xFFFFFFFF)).to(tl.int32)
    tl.debug_barrier()
    tl.store(out_row[:, None] + j * so_k, picked, mask=(j < TOPK) & (rows < n_rows)[:, None])


_JIT: dict = {}


def _jit_kernel():
    if "jit" not in _JIT:
        _JIT["jit"] = triton.jit(_topk_select_kernel)
    return _JIT["jit"]


def topk_select_triton(
    scores: torch.Tensor, topk: int, limit_base: int | None = None,
    block: int | None = None, digit_bits: int = 11, num_warps: int = 8, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """scores [B, R, W] fp32 (-inf = not allowed) -> int32 [B, R, topk], descending, -1 padded.

    limit_base: row r only has columns [0, min(W, limit_base + r)) allowed (a causal chunk whose
    first row sees limit_base keys); the rest is not read. None = whole rows.
    """
    B, R, W = scores.shape
    assert scores.dtype == torch.float32, scores.dtype
    out = new_output((B, R, topk), torch.int32, scores.device) if out is None else out
    args = (scores, out, R, W, 0 if limit_base is None else limit_base, *scores.stride(), *out.stride())
    consts = dict(TOPK=topk, TOPK_PAD=next_pow2(topk), DIGIT_BITS=digit_bits, CAUSAL_LIMIT=limit_base is not None)
    if interpreting(scores):  # whole (short) rows, many rows per program: few interpreted ops
        block_r = min(next_pow2(R), 16)
        consts.update(BLOCK=block or min(next_pow2(W), 256), BLOCK_R=block_r)
        launch_interpreted(_topk_select_kernel, (cdiv(R, block_r), B), *args, **consts)
    else:
        _jit_kernel()[(R, B)](*args, **consts, BLOCK=block or 1024, BLOCK_R=1, num_warps=num_warps)
    return out


def topk_select(scores: torch.Tensor, topk: int, limit_base: int | None = None,
                use_triton: bool | None = None) -> torch.Tensor:
    """Top-k columns of each row of masked fp32 scores [B, R, W]; see topk_select_triton."""
    if use_triton_for(scores, use_triton):
        return topk_select_triton(scores, topk, limit_base)
    if limit_base is not None:  # the reference reads whole rows: hide the columns past each horizon
        W = scores.shape[-1]
        horizon = limit_base + torch.arange(scores.shape[1], device=scores.device)
        scores = scores.masked_fill(torch.arange(W, device=scores.device) >= horizon[:, None], float("-inf"))
    return topk_indices_from_scores(scores, topk)


__all__ = ["topk_select", "topk_select_triton"]
