"""Row-wise top-k selection over masked fp32 scores (replaces torch.topk after the indexer).

    out[r, :] = indices of the `topk` largest finite scores[r, :n_r], -1 padded (int32);
                descending by score (sorted=True) or ascending by index (sorted=False)
    n_r       = min(W, diag_base + r % row_period + 1)   (causal rows stop at their diagonal;
                                                          row_period = rows per batch entry)

Reference: `reference.topk_indices_from_scores` (torch.topk; -inf = not allowed).

One program per row, three ways to get at most CAND candidates into registers:
  * direct   (n <= CAND): the row itself is the candidate block.
  * filtered (n >  CAND): a strided sample of SAMPLE scores (groups of GROUP contiguous ones)
    estimates a threshold expected to keep ~(topk + CAND) / 2 keys; one streaming pass writes
    the keys >= threshold to a per-row scratch (running offset + cumsum). Kept only when
    topk <= kept <= CAND, i.e. the threshold is below the topk-th score and the block fits;
    otherwise one retry with the sample rank scaled by target / kept.
  * exact    (otherwise, e.g. heavy ties): the topk-th score found by a 32-step bit search of
    full-row counting passes, then the keys above it plus the first ties go to the scratch.
The candidate block is then resolved exactly in registers: the topk-th largest key by the
same bit search (counts over the block), ties broken by lower index, and (SORTED) a bitonic
sort of (score, -index) pairs packed into int64 gives the descending order.

Scores are compared as order-preserving uint32 keys ("ukeys": fp32 bits, sign-flipped); -inf
(and NaN) are not allowed and get ukey 0, below every allowed score.
No histogram: Triton lowers tl.histogram to ballots + shared-memory atomics, which made a
radix select slower than torch.topk (docs/benchmarks.md, third run set). H200 (fourth run set,
bench/sweep_select.py): unordered 1.9x faster than torch.topk on a 16K chunk, 1.8x on a 128K
chunk; the bitonic sort (sorted=True) costs more than torch.topk, and so does one program per
row when there are few rows (decode) -- callers use torch.topk there (indexer_topk.select_topk).
"""
from __future__ import annotations

import torch

from ._triton_utils import (
    HAS_TRITON,
    interpreting,
    launch_interpreted,
    new_output,
    next_pow2,
    tl,
    triton,
)
from .reference import topk_indices_from_scores

PATH_DIRECT, PATH_FILTERED, PATH_RETRIED, PATH_EXACT = 0, 1, 2, 3


def _jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


@_jit
def _ukeys(vals):
    """fp32 [N] -> uint32 [N]: order-preserving keys, >= 1 for allowed scores; -inf / NaN -> 0."""
    bits = vals.to(tl.int32, bitcast=True)
    flipped = bits ^ (((bits >> 31) & 0x7FFFFFFF) | -2147483648)  # unsigned order == float order
    return tl.where(vals > float("-inf"), flipped, 0).to(tl.uint32, bitcast=True)


@_jit
def _kth_ukey(ukeys, k, BITS: tl.constexpr):
    """Largest v with #(ukeys >= v) >= k -- the k-th largest ukey, in its top BITS bits (the
    rest 0); 0 when fewer than k keys are allowed. One block-wide count per bit."""
    prefix = tl.zeros((), tl.uint32)
    for i in range(BITS):
        trial = prefix | (tl.full((), 0x80000000, tl.uint32) >> i)
        n_ge = tl.sum((ukeys >= trial).to(tl.int32), axis=0)
        prefix = tl.where(n_ge >= k, trial, prefix)
    return prefix


@_jit
def _row_count_ge(row_ptr, n, threshold, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """#(ukey >= threshold) over the row's first n scores (one streaming pass)."""
    count = tl.zeros((), tl.int32)
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        vals = tl.load(row_ptr + offs, mask=offs < n, other=float("-inf"))
        count += tl.sum((_ukeys(vals) >= threshold).to(tl.int32), axis=0)
    return count


@_jit
def _row_kth_ukey(row_ptr, n, k, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """_kth_ukey over a whole row: 32 counting passes (the exact fallback)."""
    prefix = tl.zeros((), tl.uint32)
    for i in range(32):
        trial = prefix | (tl.full((), 0x80000000, tl.uint32) >> i)
        prefix = tl.where(_row_count_ge(row_ptr, n, trial, BLOCK, STAGES) >= k, trial, prefix)
    return prefix


@_jit
def _sample_threshold(row_ptr, n, rank, SAMPLE: tl.constexpr, GROUP: tl.constexpr):
    """The rank-th largest ukey (top 16 bits: a threshold, not a selection) of SAMPLE of the
    row's n (> SAMPLE) scores: SAMPLE // GROUP groups of GROUP contiguous scores, evenly spread."""
    g = tl.arange(0, SAMPLE // GROUP).to(tl.int64)
    starts = g * (n - GROUP) // (SAMPLE // GROUP - 1)  # first 0, last n - GROUP
    offs = tl.reshape(starts[:, None] + tl.arange(0, GROUP)[None, :], (SAMPLE,))
    return _kth_ukey(_ukeys(tl.load(row_ptr + offs)), rank, 16)


@_jit
def _row_compact(row_ptr, n, keep_from, tie_key, ties_allowed, cand_val_ptr, cand_idx_ptr,
                 CAND: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr, TIES: tl.constexpr):
    """Stream the row, keeping (in index order) the allowed scores with ukey >= keep_from and
    (TIES) the first `ties_allowed` with ukey == tie_key; the first CAND kept go to the scratch
    (values, indices). Returns how many were kept (may exceed CAND)."""
    kept = tl.zeros((), tl.int32)
    ties = tl.zeros((), tl.int32)
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        vals = tl.load(row_ptr + offs, mask=offs < n, other=float("-inf"))
        ukeys = _ukeys(vals)
        keep = ukeys >= keep_from
        if TIES:
            tie = (ukeys == tie_key) & (ukeys > 0)
            keep = keep | (tie & (ties + tl.cumsum(tie.to(tl.int32), axis=0) <= ties_allowed))
            ties += tl.sum(tie.to(tl.int32), axis=0)
        slot = kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        ok = keep & (slot < CAND)
        tl.store(cand_val_ptr + slot, vals, mask=ok)
        tl.store(cand_idx_ptr + slot, offs, mask=ok)
        kept += tl.sum(keep.to(tl.int32), axis=0)
    return kept


@_jit
def _filter_row(row_ptr, n, rank, cand_val_ptr, cand_idx_ptr, CAND: tl.constexpr, SAMPLE: tl.constexpr,
                GROUP: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Keep the scores >= the sample's rank-th largest (scratch); returns how many were kept."""
    threshold = tl.maximum(_sample_threshold(row_ptr, n, rank, SAMPLE, GROUP), 1)
    return _row_compact(row_ptr, n, threshold, 0, 0, cand_val_ptr, cand_idx_ptr, CAND, BLOCK, STAGES, False)


def _topk_select_kernel(
    scores_ptr, out_ptr, cand_val_ptr, cand_idx_ptr, path_ptr,
    width, diag_base, row_period, topk,  # row r: scores[r, :min(width, diag_base + r % row_period + 1)]
    s_row, s_out, s_cand,
    CAND: tl.constexpr, SAMPLE: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    STAGES: tl.constexpr, SORTED: tl.constexpr,
):
    row = tl.program_id(0)
    n = tl.minimum(width, tl.maximum(diag_base + row % row_period + 1, 0))  # int32
    row_ptr = scores_ptr + row.to(tl.int64) * s_row
    cand_val = cand_val_ptr + row.to(tl.int64) * s_cand
    cand_idx = cand_idx_ptr + row.to(tl.int64) * s_cand
    c = tl.arange(0, CAND)

    path = n * 0  # PATH_*: 0 direct, 1 filtered, 2 filtered after a retry, 3 exact
    n_cand = n
    if n > CAND:  # filtered: aim the sample threshold at `target` kept keys; one corrected retry
        target = (topk + CAND) // 2
        rank = tl.minimum(tl.maximum((target * SAMPLE) // n, 1), SAMPLE)
        path += 1
        n_cand = _filter_row(row_ptr, n, rank, cand_val, cand_idx, CAND, SAMPLE, GROUP, BLOCK, STAGES)
        if (n_cand < topk) | (n_cand > CAND):  # scale the rank by how far the kept count was off
            path += 1
            rank = tl.minimum(tl.maximum((rank * target) // tl.maximum(n_cand, 1), 1), SAMPLE)
            n_cand = _filter_row(row_ptr, n, rank, cand_val, cand_idx, CAND, SAMPLE, GROUP, BLOCK, STAGES)
        if (n_cand < topk) | (n_cand > CAND):  # exact: k-th score by bit search over the row
            path = path * 0 + 3
            kth = _row_kth_ukey(row_ptr, n, topk, BLOCK, STAGES)
            n_above = _row_count_ge(row_ptr, n, kth + 1, BLOCK, STAGES)
            n_cand = _row_compact(row_ptr, n, kth + 1, kth, topk - n_above, cand_val, cand_idx, CAND, BLOCK, STAGES,
                                  True)
    tl.store(path_ptr + row, path)

    if path == 0:
        vals = tl.load(row_ptr + c, mask=c < n, other=float("-inf"))
        idx = c
    else:
        tl.debug_barrier()  # the scratch was written by other threads of this program
        vals = tl.load(cand_val + c, mask=c < n_cand, other=float("-inf"))
        idx = tl.load(cand_idx + c, mask=c < n_cand, other=0)
    ukeys = _ukeys(vals)  # [CAND]
    kth = _kth_ukey(ukeys, topk, 32)
    tie = (ukeys == kth) & (ukeys > 0)
    n_above = tl.sum((ukeys > kth).to(tl.int32), axis=0)
    picked = (ukeys > kth) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= topk - n_above))
    out_row = out_ptr + row.to(tl.int64) * s_out
    if SORTED:  # pack (ukey, -idx) into one int64 and sort descending; unpicked = int64 min, last
        unpicked = tl.full((CAND,), -1, tl.int64) << 63
        signed = (ukeys ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64)  # signed order
        packed = tl.where(picked, (signed << 32) | (0xFFFFFFFF - idx.to(tl.int64)), unpicked)
        packed = tl.sort(packed, descending=True)
        best = tl.where(packed == unpicked, -1, 0xFFFFFFFF - (packed & 0xFFFFFFFF))
        tl.store(out_row + c, best.to(tl.int32), mask=c < topk)
    else:
        n_picked = tl.sum(picked.to(tl.int32), axis=0)
        slot = tl.cumsum(picked.to(tl.int32), axis=0) - 1
        tl.store(out_row + slot, idx, mask=picked)
        tl.store(out_row + c, tl.full((CAND,), -1, tl.int32), mask=(c >= n_picked) & (c < topk))


# --------------------------------------------------------------------------- host side

_JIT: dict = {}


def _kernel():
    if "kernel" not in _JIT:
        _JIT["kernel"] = triton.jit(_topk_select_kernel)
    return _JIT["kernel"]


def candidate_capacity(topk: int) -> int:
    """CAND: candidate block size (power of two, >= 2 * topk so the filter has a margin; >= 64
    so that small topk still gets a usable sample)."""
    return max(64, next_pow2(2 * topk))


def launch_meta(topk: int, sorted: bool = True, block: int | None = None, stages: int = 1) -> dict:
    """Compile-time parameters: CAND candidates, a SAMPLE of min(CAND, 2048) scores in groups
    of GROUP, BLOCK scores per streaming step, STAGES loads in flight in the streaming loops."""
    cand = candidate_capacity(topk)
    sample = min(2048, cand)
    return dict(CAND=cand, SAMPLE=sample, GROUP=min(32, sample // 4), BLOCK=block or 4096,
                STAGES=stages, SORTED=sorted)


def topk_select(
    scores: torch.Tensor, topk: int, diag_base: int | None = None, row_period: int | None = None,
    sorted: bool = True, num_warps: int = 8, block: int | None = None, stages: int = 1,
    return_path: bool = False,
):
    """scores fp32 [R, W] (-inf = not allowed) -> int32 [R, topk] (-1 padded).

    diag_base: row r only reads its first min(W, diag_base + r % row_period + 1) scores
    (causal chunks; None = all W; row_period defaults to R). Scores beyond that are treated
    as not allowed without being read.
    return_path: also return int32 [R]: the PATH_* each row took.
    """
    R, W = scores.shape
    assert scores.dtype == torch.float32 and scores.stride(1) == 1, (scores.dtype, scores.stride())
    meta = launch_meta(topk, sorted, block, stages)
    cand = meta["CAND"]
    out = new_output((R, topk), torch.int32, scores.device)
    path = torch.empty(R, dtype=torch.int32, device=scores.device)
    needs_scratch = W > cand
    cand_val = torch.empty((R, cand) if needs_scratch else (1, 1), dtype=torch.float32, device=scores.device)
    cand_idx = torch.empty(cand_val.shape, dtype=torch.int32, device=scores.device)
    args = (scores, out, cand_val, cand_idx, path, W, W if diag_base is None else diag_base,
            row_period or max(R, 1), topk,
            scores.stride(0), out.stride(0), cand_val.stride(0))
    if R > 0:
        if interpreting(scores):
            launch_interpreted(_topk_select_kernel, (R,), *args, **meta)
        else:
            _kernel()[(R,)](*args, **meta, num_warps=num_warps)
    return (out, path) if return_path else out


def row_lengths(R: int, W: int, diag_base: int | None = None, row_period: int | None = None,
                device=None) -> torch.Tensor:
    """int64 [R]: how many leading scores row r may select from, min(W, diag_base + r % period + 1)
    clamped at 0 (the kernel's `n`; all W when diag_base is None)."""
    if diag_base is None:
        return torch.full((R,), W, dtype=torch.long, device=device)
    r = torch.arange(R, device=device) % (row_period or max(R, 1))
    return (diag_base + r + 1).clamp(0, W)


def readable_scores(scores: torch.Tensor, diag_base: int | None = None, row_period: int | None = None):
    """scores [R, W] with what topk_select does not read (beyond row_lengths) set to -inf."""
    R, W = scores.shape
    n = row_lengths(R, W, diag_base, row_period, scores.device)
    return scores.masked_fill(torch.arange(W, device=scores.device)[None, :] >= n[:, None], float("-inf"))


def topk_select_ref(scores: torch.Tensor, topk: int, diag_base: int | None = None,
                    row_period: int | None = None) -> torch.Tensor:
    """torch.topk semantics for topk_select (the not-read tail of causal rows as -inf)."""
    return topk_indices_from_scores(readable_scores(scores, diag_base, row_period), topk)


__all__ = ["topk_select", "topk_select_ref", "row_lengths", "readable_scores", "candidate_capacity",
           "launch_meta", "HAS_TRITON",
           "PATH_DIRECT", "PATH_FILTERED", "PATH_RETRIED", "PATH_EXACT"]
