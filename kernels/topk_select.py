"""Row-wise top-k selection over masked fp32 scores (replaces torch.topk after the indexer).

    out[r, :] = indices of the `topk` largest finite scores[r, :n_r], -1 padded (int32);
                descending by score (sorted=True) or ascending by index (sorted=False)
    n_r       = min(W, diag_base + r % row_period + 1)   (causal rows stop at their diagonal;
                                                          row_period = rows per batch entry)

Reference: `reference.topk_indices_from_scores` (torch.topk; -inf = not allowed).

Length: this file is over the ~450 lines our modules keep to because its five kernels share one
candidate-block layout and path codes (PATH_*) that must change together; split, each piece would
repeat them.

Three kernels, one program per row each (split so that each keeps its own register budget:
in one kernel the resolve step held 172 registers/thread and one 8-warp program per SM ran the
streaming pass -- ncu: 12.5 % occupancy, one instruction every 2.5 cycles per scheduler).
  * `_topk_filter_kernel` (only launched when W > CAND) gets at most CAND candidates per row:
    - direct   (n <= CAND): the row itself is the candidate block (nothing to do);
    - filtered (n >  CAND): a strided sample of SAMPLE scores (groups of GROUP contiguous ones)
      estimates a threshold expected to keep ~(topk + CAND) / 2 keys; one streaming pass
      writes the scores >= threshold (an fp32 compare) to a per-row scratch (running offset +
      cumsum). Kept only when topk <= kept <= CAND, i.e. the threshold is below the topk-th
      score and the block fits, or when kept <= CAND is every allowed score (rows with fewer
      than topk allowed, e.g. a short sequence in a padded batch); otherwise retries (TRIES
      passes in all) with the sample rank scaled by target / kept;
    - otherwise (e.g. heavy ties) the row is marked PATH_EXACT.
    Few wide rows (fewer rows than SMs: decode) run this step as `segments` programs per row
    instead (`_topk_segment_count_kernel`, `_topk_segment_compact_kernel`): one threshold per
    row from a 4x larger sample, each segment's count, then each segment writes its candidates
    at its predecessors' total -- the same index-ordered block; one pass, a miss goes exact.
    H200, T = 128K, CUDA graphs: 0.023 ms at B = 1, 0.037 at B = 16 (torch.topk 0.075 / 0.098).
  * `_topk_exact_kernel`, for PATH_EXACT rows: the topk-th score by a 16-step radix-4 search
    of full-row counting passes, then the keys above it plus the first ties go to the scratch.
  * `_topk_resolve_kernel` loads the candidate block into registers and resolves it exactly:
    the topk-th largest key by an interpolation search (`_kth_ukey_interpolated`: a bracket
    from the block's min and max narrowed by three interpolated trials per step, counted in one
    block reduction -- 5-9 reductions on smooth scores where the radix-4 search takes 16; 1.3x
    faster resolve on the H200), ties broken by lower index, and (SORTED) a bitonic sort of
    (score, -index) pairs packed into int64 gives the descending order.

Scores are compared as order-preserving uint32 keys ("ukeys": fp32 bits, sign-flipped); -inf
(and NaN) are not allowed and get ukey 0, below every allowed score.
No histogram: Triton lowers tl.histogram to ballots + shared-memory atomics, which made a
radix select slower than torch.topk (docs/benchmarks.md, not adopted). H200
(bench/sweep_select.py): unordered 3.4x faster than torch.topk on a 16K chunk (0.36 ms), 5.8x on
a 128K chunk (0.57 ms); the bitonic sort (sorted=True) costs more than torch.topk -- callers use
torch.topk for descending rows (indexer_topk.select_topk).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton_utils import (
    HAS_TRITON,
    interpreting,
    jit_helper,
    launch_interpreted,
    new_output,
    next_pow2,
    num_sms,
    tl,
    triton,
)
from .reference import topk_indices_from_scores

PATH_DIRECT, PATH_FILTERED, PATH_RETRIED, PATH_EXACT = 0, 1, 2, 3
if HAS_TRITON:  # the same values inside the kernels (they may only read constexpr globals)
    _PATH_DIRECT_K, _PATH_FILTERED_K, _PATH_RETRIED_K, _PATH_EXACT_K = (
        tl.constexpr(v) for v in (PATH_DIRECT, PATH_FILTERED, PATH_RETRIED, PATH_EXACT))


@jit_helper
def _ukeys(vals):
    """fp32 [N] -> uint32 [N]: order-preserving keys, >= 1 for allowed scores; -inf / NaN -> 0."""
    bits = vals.to(tl.int32, bitcast=True)
    flipped = bits ^ (((bits >> 31) & 0x7FFFFFFF) | -2147483648)  # unsigned order == float order
    return tl.where(vals > float("-inf"), flipped, 0).to(tl.uint32, bitcast=True)


@jit_helper
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@jit_helper
def _digit_trials(prefix, step):
    """The three trial keys of radix-4 step `step`: prefix with bits (31-2*step, 30-2*step) = 1, 2, 3."""
    unit = tl.full((), 0x40000000, tl.uint32) >> (2 * step)
    return prefix | unit, prefix | (2 * unit), prefix | (3 * unit)


@jit_helper
def _pick_digit(prefix, t1, t2, t3, n1, n2, n3, k):
    """The largest trial whose count (#keys >= trial) still reaches k (counts fall with the trial)."""
    return tl.where(n3 >= k, t3, tl.where(n2 >= k, t2, tl.where(n1 >= k, t1, prefix)))


@jit_helper
def _count_ge3(ukeys, t1, t2, t3, ONE_REDUCE: tl.constexpr):
    """#(ukeys >= t) for three trials. ONE_REDUCE (GPU): one block reduction of the three (one
    cross-warp exchange); else three tl.sum (the interpreter runs a custom combine per element)."""
    ge1, ge2, ge3 = (ukeys >= t1).to(tl.int32), (ukeys >= t2).to(tl.int32), (ukeys >= t3).to(tl.int32)
    if ONE_REDUCE:
        return tl.reduce((ge1, ge2, ge3), 0, _add3)
    return tl.sum(ge1, axis=0), tl.sum(ge2, axis=0), tl.sum(ge3, axis=0)


@jit_helper
def _min_max_count(ukeys, ONE_REDUCE: tl.constexpr):
    """(smallest allowed ukey, largest ukey, #allowed) of ukeys [N] (allowed = ukey >= 1)."""
    allowed = ukeys > 0
    lows = tl.where(allowed, ukeys, 0xFFFFFFFF)
    if ONE_REDUCE:
        return tl.reduce((lows, ukeys, allowed.to(tl.int32)), 0, _min_max_add)
    return tl.min(lows, axis=0), tl.max(ukeys, axis=0), tl.sum(allowed.to(tl.int32), axis=0)


@jit_helper
def _min_max_add(a_lo, a_hi, a_n, b_lo, b_hi, b_n):
    return tl.minimum(a_lo, b_lo), tl.maximum(a_hi, b_hi), a_n + b_n


@jit_helper
def _interpolated_trial(lo, hi, c_lo, c_hi, count):
    """The key in (lo, hi) where #(ukeys >= key) should be `count`, were the counts linear in the
    key between lo (c_lo) and hi (c_hi) -- an estimate; int64."""
    frac = tl.minimum(tl.maximum((c_lo - count) / (c_lo - c_hi).to(tl.float32), 0.0), 1.0)
    trial = lo + ((hi - lo).to(tl.float32) * frac).to(tl.int64)
    return tl.minimum(tl.maximum(trial, lo + 1), hi - 1)


@jit_helper
def _narrow_bracket(ukeys, k, lo, hi, c_lo, c_hi, ONE_REDUCE: tl.constexpr):
    """One step of the interpolation search: three trials near where the count crosses k (the
    middle one at k - 1/2, the others a quarter of the bracket's keys either side), counted in
    one block reduction; the bracket shrinks to the two trials (or ends) around the crossing."""
    margin = (c_lo - c_hi) // 4 + 1
    t1 = _interpolated_trial(lo, hi, c_lo, c_hi, (k + margin).to(tl.float32))  # t1 <= t2 <= t3
    t2 = _interpolated_trial(lo, hi, c_lo, c_hi, k - 0.5)
    t3 = _interpolated_trial(lo, hi, c_lo, c_hi, (k - 1 - margin).to(tl.float32))
    n1, n2, n3 = _count_ge3(ukeys, t1.to(tl.uint32), t2.to(tl.uint32), t3.to(tl.uint32), ONE_REDUCE)  # n1 >= n2 >= n3
    new_lo = tl.where(n3 >= k, t3, tl.where(n2 >= k, t2, tl.where(n1 >= k, t1, lo)))
    new_c_lo = tl.where(n3 >= k, n3, tl.where(n2 >= k, n2, tl.where(n1 >= k, n1, c_lo)))
    new_hi = tl.where(n1 < k, t1, tl.where(n2 < k, t2, tl.where(n3 < k, t3, hi)))
    new_c_hi = tl.where(n1 < k, n1, tl.where(n2 < k, n2, tl.where(n3 < k, n3, c_hi)))
    return new_lo, new_hi, new_c_lo, new_c_hi


@jit_helper
def _kth_ukey_interpolated(ukeys, k, MAX_STEPS: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """The k-th largest ukey of ukeys [N] and whether exactly k ukeys are >= it (no ties to
    break); (1, 1) when at most k are allowed (then every allowed key is picked).

    Keeps a bracket [lo, hi) with #(>= lo) = c_lo >= k > c_hi = #(>= hi), from [min, max + 1),
    and narrows it by interpolation (_narrow_bracket; ~5 steps on smooth scores where the radix
    search always takes 16) until it pins the k-th key: c_lo == k (the smallest key >= lo),
    c_hi == k - 1 (the largest key < hi) or hi == lo + 1 (lo). Ties and clusters that stall it
    for MAX_STEPS steps finish with the radix search below the bracket's common prefix."""
    lo32, hi32, n_allowed = _min_max_count(ukeys, ONE_REDUCE)
    lo = lo32.to(tl.int64)
    hi = hi32.to(tl.int64) + 1
    c_lo = n_allowed
    c_hi = n_allowed * 0
    steps = 0
    while (c_lo > k) & (c_hi != k - 1) & (hi - lo > 1) & (steps < MAX_STEPS):
        lo, hi, c_lo, c_hi = _narrow_bracket(ukeys, k, lo, hi, c_lo, c_hi, ONE_REDUCE)
        steps += 1
    if c_lo <= k:  # exactly k keys >= lo (or fewer than k allowed: all of them, from key 1 up)
        kth = tl.where(n_allowed <= k, 1, tl.min(tl.where(ukeys >= lo, ukeys, 0xFFFFFFFF), axis=0))
        exact = n_allowed * 0 + 1
    elif c_hi == k - 1:
        kth = tl.max(tl.where(ukeys.to(tl.int64) < hi, ukeys, 0), axis=0)
        exact = n_allowed * 0
    else:
        kth = _kth_ukey_below_prefix(ukeys, k, lo, hi - 1, 16, ONE_REDUCE)
        exact = n_allowed * 0
    return kth, exact


@jit_helper
def _kth_ukey_below_prefix(ukeys, k, lo, hi, STEPS: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """The radix-4 search for the k-th largest ukey, known to lie in [lo, hi] (int64): it starts
    below their common leading bits (whole 2-bit digits) and takes at most STEPS steps (fewer
    than the remaining bits: the k-th key with its lower bits cleared, a lower bound)."""
    diff = lo ^ hi
    first_step = 0
    for step in tl.static_range(16):
        first_step += ((diff >> (30 - 2 * step)) == 0).to(tl.int32)
    prefix = (lo & ~((tl.full((), 1, tl.int64) << (32 - 2 * first_step)) - 1)).to(tl.uint32)
    for step in range(first_step, tl.minimum(first_step + STEPS, 16)):
        t1, t2, t3 = _digit_trials(prefix, step)
        n1, n2, n3 = _count_ge3(ukeys, t1, t2, t3, ONE_REDUCE)
        prefix = _pick_digit(prefix, t1, t2, t3, n1, n2, n3, k)
    return prefix


@jit_helper
def _row_count_ge3(row_ptr, n, t1, t2, t3, BLOCK: tl.constexpr, STAGES: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """#(ukey >= t) for three trials over the row's first n scores (one streaming pass)."""
    n1 = tl.zeros((), tl.int32)
    n2 = tl.zeros((), tl.int32)
    n3 = tl.zeros((), tl.int32)
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        ukeys = _ukeys(tl.load(row_ptr + offs, mask=offs < n, other=float("-inf")))
        c1, c2, c3 = _count_ge3(ukeys, t1, t2, t3, ONE_REDUCE)
        n1 += c1
        n2 += c2
        n3 += c3
    return n1, n2, n3


@jit_helper
def _row_kth_ukey(row_ptr, n, k, BLOCK: tl.constexpr, STAGES: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """The k-th largest ukey of a whole row by the radix-4 search: 16 counting passes (the exact
    fallback)."""
    prefix = tl.zeros((), tl.uint32)
    for step in range(16):
        t1, t2, t3 = _digit_trials(prefix, step)
        n1, n2, n3 = _row_count_ge3(row_ptr, n, t1, t2, t3, BLOCK, STAGES, ONE_REDUCE)
        prefix = _pick_digit(prefix, t1, t2, t3, n1, n2, n3, k)
    return prefix


@jit_helper
def _row_count_ge(row_ptr, n, threshold, BLOCK: tl.constexpr, STAGES: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """#(ukey >= threshold) over the row's first n scores (one streaming pass)."""
    count, _, _ = _row_count_ge3(row_ptr, n, threshold, threshold, threshold, BLOCK, STAGES, ONE_REDUCE)
    return count


@jit_helper
def _sample_threshold(row_ptr, n, rank, steps, SAMPLE: tl.constexpr, GROUP: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """A threshold at the rank-th largest ukey of SAMPLE of the row's n (> SAMPLE) scores
    (SAMPLE // GROUP groups of GROUP contiguous scores, evenly spread), or just below it: `steps`
    radix-4 steps below the sample's common leading bits (8: 16 bits of resolution across the
    sample's own range, however large its magnitude; 16: exact); 0 when fewer than rank are allowed."""
    g = tl.arange(0, SAMPLE // GROUP).to(tl.int64)
    starts = g * (n - GROUP) // (SAMPLE // GROUP - 1)  # first 0, last n - GROUP
    offs = tl.reshape(starts[:, None] + tl.arange(0, GROUP)[None, :], (SAMPLE,))
    ukeys = _ukeys(tl.load(row_ptr + offs))
    lo, hi, n_allowed = _min_max_count(ukeys, ONE_REDUCE)
    kth = _kth_ukey_below_prefix(ukeys, rank, lo.to(tl.int64), hi.to(tl.int64), steps, ONE_REDUCE)
    return tl.where(n_allowed < rank, 0, kth)


@jit_helper
def _float_threshold(ukey):
    """The fp32 value whose ukey is `ukey` (>= 1), for float compares: every allowed score has
    ukey >= ukey(-FLT_MAX) = 0x00800000, so lower thresholds become -FLT_MAX (keeps all finite)."""
    ukey = tl.maximum(ukey, 0x00800000)
    bits = tl.where(ukey >= 0x80000000, ukey ^ 0x80000000, ~ukey)
    return bits.to(tl.float32, bitcast=True)


@jit_helper
def _compact_block(vals, offs, threshold, kept, cand_val_ptr, cand_idx_ptr, CAND: tl.constexpr):
    """Append the block's scores >= threshold (and their indices) at scratch slot `kept` on, in
    index order. vals, offs [BLOCK // 4, 4]: each thread holds whole rows of 4 contiguous scores,
    so the slots come from an in-thread prefix plus a block scan over the row counts only
    (a quarter of the elements: fewer shuffles and selects than a scan over every score)."""
    keep = (vals >= threshold).to(tl.int32)  # [R, 4]
    row_count = tl.sum(keep, axis=1)  # [R]
    row_start = kept + tl.cumsum(row_count, axis=0) - row_count  # [R] exclusive prefix
    slot = row_start[:, None] + tl.cumsum(keep, axis=1) - 1  # [R, 4]
    ok = (keep > 0) & (slot < CAND)
    tl.store(cand_val_ptr + slot, vals, mask=ok)
    tl.store(cand_idx_ptr + slot, offs, mask=ok)
    return kept + tl.sum(row_count, axis=0)


@jit_helper
def _row_compact_above(row_ptr, lo, hi, threshold, cand_val_ptr, cand_idx_ptr,
                       CAND: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Stream the row's scores [lo, hi), keeping (in index order) those >= threshold (fp32; -inf
    and NaN never pass); the first CAND kept go to the scratch. Returns how many were kept (may
    exceed CAND). Whole blocks load unmasked (vectorised), then one masked tail block."""
    kept = tl.zeros((), tl.int32)
    full_end = lo + (hi - lo) // BLOCK * BLOCK
    quad = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK // 4, 4]
    for start in tl.range(lo, full_end, BLOCK, num_stages=STAGES):
        offs = start + quad
        kept = _compact_block(tl.load(row_ptr + offs), offs, threshold, kept, cand_val_ptr, cand_idx_ptr, CAND)
    if full_end < hi:
        offs = full_end + quad
        vals = tl.load(row_ptr + offs, mask=offs < hi, other=float("-inf"))
        kept = _compact_block(vals, offs, threshold, kept, cand_val_ptr, cand_idx_ptr, CAND)
    return kept


@jit_helper
def _row_compact_ties(row_ptr, n, keep_from, tie_key, ties_allowed, cand_val_ptr, cand_idx_ptr,
                      CAND: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Stream the row, keeping (in index order) the allowed scores with ukey >= keep_from and the
    first `ties_allowed` with ukey == tie_key; the first CAND kept go to the scratch (values,
    indices). Returns how many were kept (may exceed CAND). The exact path's last pass."""
    kept = tl.zeros((), tl.int32)
    ties = tl.zeros((), tl.int32)
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        vals = tl.load(row_ptr + offs, mask=offs < n, other=float("-inf"))
        ukeys = _ukeys(vals)
        tie = (ukeys == tie_key) & (ukeys > 0)
        keep = (ukeys >= keep_from) | (tie & (ties + tl.cumsum(tie.to(tl.int32), axis=0) <= ties_allowed))
        ties += tl.sum(tie.to(tl.int32), axis=0)
        slot = kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        ok = keep & (slot < CAND)
        tl.store(cand_val_ptr + slot, vals, mask=ok)
        tl.store(cand_idx_ptr + slot, offs, mask=ok)
        kept += tl.sum(keep.to(tl.int32), axis=0)
    return kept


@jit_helper
def _filter_row(row_ptr, n, rank, steps, cand_val_ptr, cand_idx_ptr, CAND: tl.constexpr, SAMPLE: tl.constexpr,
                GROUP: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """Keep the scores >= the sample's rank-th largest (scratch). Returns how many were kept, and
    1 if the threshold was below every allowed score (all of them kept: fewer than topk is then
    the answer, e.g. a padded sequence's row), else 0."""
    ukey = tl.maximum(_sample_threshold(row_ptr, n, rank, steps, SAMPLE, GROUP, ONE_REDUCE), 1)
    kept = _row_compact_above(row_ptr, 0, n, _float_threshold(ukey), cand_val_ptr, cand_idx_ptr, CAND, BLOCK, STAGES)
    return kept, (ukey <= 0x00800000).to(tl.int32)  # 0x00800000 = ukey(-FLT_MAX)


@jit_helper
def _rescaled_rank(rank, target, kept, SAMPLE: tl.constexpr):
    """The sample rank expected to keep `target` scores, given that `rank` kept `kept` (>= 1;
    rank SAMPLE keeps the whole row); within [1, SAMPLE]."""
    return tl.minimum(tl.maximum((rank * target) // tl.maximum(kept, 1), 1), SAMPLE)


@jit_helper
def _needs_another_pass(n_cand, all_kept, topk, CAND: tl.constexpr):
    """The candidate block is not the answer yet: it overflows CAND, or it misses some of the
    top-k (fewer than topk kept while some allowed scores were not)."""
    return (n_cand > CAND) | ((n_cand < topk) & (all_kept == 0))


@jit_helper
def _row_length(row, width, diag_base, row_period):
    """How many leading scores row `row` may select from (int32; see row_lengths)."""
    return tl.minimum(width, tl.maximum(diag_base + row % row_period + 1, 0))


def _topk_filter_kernel(
    scores_ptr, cand_val_ptr, cand_idx_ptr, n_cand_ptr, path_ptr,
    width, diag_base, row_period, topk,  # row r: scores[r, :min(width, diag_base + r % row_period + 1)]
    s_row, s_cand,
    CAND: tl.constexpr, SAMPLE: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    STAGES: tl.constexpr, TRIES: tl.constexpr, ONE_REDUCE: tl.constexpr,
):
    """Per row: path[row] (PATH_*) and n_cand[row] candidates -- the row itself (direct) or the
    scratch rows cand_val / cand_idx (filtered, retried); PATH_EXACT rows are not done yet."""
    row = tl.program_id(0)
    n = _row_length(row, width, diag_base, row_period)
    row_ptr = scores_ptr + row.to(tl.int64) * s_row
    cand_val = cand_val_ptr + row.to(tl.int64) * s_cand
    cand_idx = cand_idx_ptr + row.to(tl.int64) * s_cand

    path = n * 0 + _PATH_DIRECT_K  # PATH_*: direct, filtered, filtered after a retry, exact
    n_cand = n
    if n > CAND:  # filtered: aim the sample threshold at `target` kept keys, rank rescaled per pass
        target = (topk + CAND) // 2
        rank = SAMPLE + n * 0  # rescaled by target / n before the first pass: SAMPLE * target // n
        all_kept = n * 0
        tries = n * 0
        while _needs_another_pass(n_cand, all_kept, topk, CAND) & (tries < TRIES):
            rank = _rescaled_rank(rank, target, n_cand, SAMPLE)
            steps = 8 + 8 * tl.minimum(tries, 1)  # retries: the sample's exact rank-th (coarse ones can lump)
            n_cand, all_kept = _filter_row(row_ptr, n, rank, steps, cand_val, cand_idx, CAND, SAMPLE, GROUP, BLOCK, STAGES,
                                           ONE_REDUCE)
            tries += 1
        path += tl.minimum(tries, _PATH_RETRIED_K)  # DIRECT + 1 pass = FILTERED, + more = RETRIED
        if _needs_another_pass(n_cand, all_kept, topk, CAND):
            path = path * 0 + _PATH_EXACT_K  # left to _topk_exact_kernel
    tl.store(path_ptr + row, path)
    tl.store(n_cand_ptr + row, n_cand)


@jit_helper
def _row_count_above(row_ptr, lo, hi, threshold, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """#(scores >= threshold) among the row's scores [lo, hi) (fp32 compare, as the compaction)."""
    count = tl.zeros((), tl.int32)
    for start in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        vals = tl.load(row_ptr + offs, mask=offs < hi, other=float("-inf"))
        count += tl.sum((vals >= threshold).to(tl.int32), axis=0)
    return count


@jit_helper
def _segment_threshold(row_ptr, n, topk, CAND: tl.constexpr, SAMPLE: tl.constexpr, GROUP: tl.constexpr,
                       ONE_REDUCE: tl.constexpr):
    """The segmented form's one threshold per row (ukey >= 1): the sample's rank-th largest,
    the rank aimed at (topk + CAND) / 2 kept keys (each segment's program gets the same)."""
    rank = _rescaled_rank(SAMPLE, (topk + CAND) // 2, n, SAMPLE)
    return tl.maximum(_sample_threshold(row_ptr, n, rank, 8, SAMPLE, GROUP, ONE_REDUCE), 1)


def _topk_segment_count_kernel(
    scores_ptr, seg_count_ptr, threshold_ptr,
    width, diag_base, row_period, topk, s_row, n_segs,
    CAND: tl.constexpr, SAMPLE: tl.constexpr, GROUP: tl.constexpr, SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr, STAGES: tl.constexpr, ONE_REDUCE: tl.constexpr,
):
    """The segmented filter for few wide rows (decode), pass 1 of 2; program (row, seg) owns the
    row's scores [seg * SEGMENT, +SEGMENT): seg_count[row, seg] = how many are >= the row's
    threshold (threshold[row]: its ukey, written by segment 0)."""
    row = tl.program_id(0)
    seg = tl.program_id(1)
    n = _row_length(row, width, diag_base, row_period)
    if n > CAND:
        row_ptr = scores_ptr + row.to(tl.int64) * s_row
        ukey = _segment_threshold(row_ptr, n, topk, CAND, SAMPLE, GROUP, ONE_REDUCE)
        if seg == 0:
            tl.store(threshold_ptr + row, ukey.to(tl.int32, bitcast=True))
        lo = seg * SEGMENT
        count = _row_count_above(row_ptr, lo, tl.minimum(n, lo + SEGMENT), _float_threshold(ukey), BLOCK, STAGES)
        tl.store(seg_count_ptr + row * n_segs + seg, count)


def _topk_segment_compact_kernel(
    scores_ptr, cand_val_ptr, cand_idx_ptr, n_cand_ptr, path_ptr, seg_count_ptr, threshold_ptr,
    width, diag_base, row_period, topk, s_row, s_cand, n_segs,
    CAND: tl.constexpr, SEGMENT: tl.constexpr, SEG_PAD: tl.constexpr, BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Pass 2 of the segmented filter: when the row's kept keys (all segments) make a candidate
    block (as in _topk_filter_kernel), each segment writes its own at the offset its
    predecessors' counts sum to -- the block in index order, as one program would have written
    it; otherwise the row is marked PATH_EXACT (segment 0 writes path and n_cand)."""
    row = tl.program_id(0)
    seg = tl.program_id(1)
    n = _row_length(row, width, diag_base, row_period)
    if n > CAND:
        ukey = tl.load(threshold_ptr + row).to(tl.uint32, bitcast=True)
        segs = tl.arange(0, SEG_PAD)
        counts = tl.load(seg_count_ptr + row * n_segs + segs, mask=segs < n_segs, other=0)  # [SEG_PAD]
        total = tl.sum(counts, axis=0)
        exact = _needs_another_pass(total, (ukey <= 0x00800000).to(tl.int32), topk, CAND)
        if not exact:
            before = tl.sum(tl.where(segs < seg, counts, 0), axis=0)
            lo = seg * SEGMENT
            _row_compact_above(scores_ptr + row.to(tl.int64) * s_row, lo, tl.minimum(n, lo + SEGMENT),
                               _float_threshold(ukey), cand_val_ptr + row.to(tl.int64) * s_cand + before,
                               cand_idx_ptr + row.to(tl.int64) * s_cand + before, CAND, BLOCK, STAGES)
        if seg == 0:
            tl.store(path_ptr + row, tl.where(exact, _PATH_EXACT_K, _PATH_FILTERED_K))
            tl.store(n_cand_ptr + row, total)


def _topk_exact_kernel(
    scores_ptr, cand_val_ptr, cand_idx_ptr, n_cand_ptr, path_ptr,
    width, diag_base, row_period, topk,
    s_row, s_cand,
    CAND: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr, ONE_REDUCE: tl.constexpr,
):
    """The rows the filter marked PATH_EXACT (others return at once): the topk-th score by a
    radix-4 search of counting passes over the row, then the scores above it plus the first
    ties go to the scratch. A kernel of its own so that this rare path's registers do not
    lower the filter kernel's occupancy."""
    row = tl.program_id(0)
    if tl.load(path_ptr + row) == _PATH_EXACT_K:
        n = _row_length(row, width, diag_base, row_period)
        row_ptr = scores_ptr + row.to(tl.int64) * s_row
        kth = _row_kth_ukey(row_ptr, n, topk, BLOCK, STAGES, ONE_REDUCE)
        n_above = _row_count_ge(row_ptr, n, kth + 1, BLOCK, STAGES, ONE_REDUCE)
        n_cand = _row_compact_ties(row_ptr, n, kth + 1, kth, topk - n_above, cand_val_ptr + row.to(tl.int64) * s_cand,
                                   cand_idx_ptr + row.to(tl.int64) * s_cand, CAND, BLOCK, STAGES)
        tl.store(n_cand_ptr + row, n_cand)


def _topk_resolve_kernel(
    scores_ptr, out_ptr, cand_val_ptr, cand_idx_ptr, n_cand_ptr,
    width, diag_base, row_period, topk,
    s_row, s_out, s_cand,
    CAND: tl.constexpr, SORTED: tl.constexpr, FILTERED: tl.constexpr, ONE_REDUCE: tl.constexpr,
):
    """Per row: the exact top-k of its candidate block (the row when it fits in CAND, else the
    filter kernel's scratch; FILTERED = that kernel ran)."""
    row = tl.program_id(0)
    n = _row_length(row, width, diag_base, row_period)
    c = tl.arange(0, CAND)
    if n <= CAND:  # the row itself is the block (index = position), else the filter's scratch
        vals = tl.load(scores_ptr + row.to(tl.int64) * s_row + c, mask=c < n, other=float("-inf"))
    else:
        n_cand = tl.load(n_cand_ptr + row) if FILTERED else 0
        vals = tl.load(cand_val_ptr + row.to(tl.int64) * s_cand + c, mask=c < n_cand, other=float("-inf"))
    ukeys = _ukeys(vals)  # [CAND]
    kth, no_ties = _kth_ukey_interpolated(ukeys, topk, 8, ONE_REDUCE)
    if no_ties:  # the keys >= kth are the answer (exactly topk, or every allowed one)
        picked = ukeys >= kth
    else:  # keys above kth, then the lowest-index ties up to topk
        tie = (ukeys == kth) & (ukeys > 0)
        n_above = tl.sum((ukeys > kth).to(tl.int32), axis=0)
        picked = (ukeys > kth) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= topk - n_above))
    # the candidates' indices only now: not held in registers through the search (8 warps: 80
    # registers instead of 118, 3 programs per SM instead of 2; no measurable speed change). n_cand
    # is loaded again here on purpose: loaded once before the branch it stays live through the
    # search (99 registers, 2 programs per SM; AOT sm_90, triton 3.6)
    n_scratch = tl.where(n > CAND, tl.load(n_cand_ptr + row), 0) if FILTERED else 0
    idx = tl.load(cand_idx_ptr + row.to(tl.int64) * s_cand + c, mask=picked & (c < n_scratch), other=0)
    idx = tl.where(n > CAND, idx, c)
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
_KERNELS = {"filter": _topk_filter_kernel, "exact": _topk_exact_kernel, "resolve": _topk_resolve_kernel,
            "segment_count": _topk_segment_count_kernel, "segment_compact": _topk_segment_compact_kernel}
# the rare exact path; launched over every row (rows not marked exact return at once: ~9 us per
# 2048 rows on the H200), since only the GPU knows which rows need it
# One exact row is one program's 18 serial passes over the row (at 256K a chunk's single exact row
# cost ~1 ms at 8 warps, 2048-score blocks, 3 stages; H100, bench/sweep_long.py): 6 stages keep twice
# the bytes in flight per program; 16 warps hold it to 115 registers (8 warps: 182), no spills (AOT sm_90;
# 4096-score blocks spill).
EXACT_LAUNCH = dict(num_warps=16, block=2048, stages=6)
# Rows longer than this get a 4096-score sample: the first pass aims at rank SAMPLE * target / n of
# the sample, whose relative error is ~ rank^-1/2; with 2048 samples the rank fell from 48 (128K) to
# 31 (200K) and 24 (256K), and retried / exact rows (one extra pass / 18 passes, in the launch's tail)
# made the selection 4x slower per byte at 2048 x 200K than at 2048 x 128K (bench/sweep_long.py).
LONG_ROW = 131072


def _kernel(name: str):
    if name not in _JIT:
        _JIT[name] = triton.jit(_KERNELS[name])
    return _JIT[name]


def candidate_capacity(topk: int) -> int:
    """CAND: candidate block size (power of two, >= 2 * topk so the filter has a margin; >= 64
    so that small topk still gets a usable sample)."""
    return max(64, next_pow2(2 * topk))


def launch_meta(topk: int, block: int | None = None, stages: int = 1, width: int = 0) -> dict:
    """The filter kernel's compile-time parameters: CAND candidates, a SAMPLE of min(CAND, 2048)
    scores (4096 for rows wider than LONG_ROW) in groups of GROUP, BLOCK scores per streaming step,
    STAGES loads in flight, at most TRIES filtering passes before the exact fallback."""
    cand = candidate_capacity(topk)
    sample = min(2048, cand) * (2 if width > LONG_ROW and cand >= 4096 else 1)  # filtered rows: n > CAND >= SAMPLE
    return dict(CAND=cand, SAMPLE=sample, GROUP=min(32, sample // 4), BLOCK=block or 4096, STAGES=stages,
                TRIES=3)


def segment_meta(topk: int, W: int, segments: int, block: int, stages: int,
                 one_reduce: bool = True) -> tuple[dict, dict, int]:
    """The segmented filter's compile-time parameters, (count kernel's, compact kernel's, n_segs):
    SEGMENT scores per program (a power of two, whole BLOCKs), a 4x larger SAMPLE than the
    one-program filter's (one pass, no retries: a miss costs the exact path), SEG_PAD >= n_segs,
    the segments per row."""
    cand = candidate_capacity(topk)
    sample = min(8192, 4 * cand)
    segment = max(block, next_pow2(-(-W // segments)))
    n_segs = -(-W // segment)
    shared = dict(CAND=cand, SEGMENT=segment, BLOCK=block, STAGES=stages)
    return (dict(shared, SAMPLE=sample, GROUP=min(32, sample // 4), ONE_REDUCE=one_reduce),
            dict(shared, SEG_PAD=next_pow2(n_segs)), n_segs)


def default_segments(R: int, W: int, topk: int, device) -> int:
    """Segments per row for the segmented filter: 1 (one program per row) unless there are
    fewer rows than SMs and they are wide; then the power of two that makes about one program
    per SM (H200, CUDA graphs, T = 128K: B = 1 fastest at 64-128 segments, B = 16 at 8; 4x as
    many programs were 2-3x slower at B = 16 -- bench/sweep_select.py)."""
    if R >= num_sms(device) or W < 4 * candidate_capacity(topk):
        return 1
    per_row = -(-num_sms(device) // R)
    return 1 << (per_row.bit_length() - 1)  # largest power of two <= per_row


@dataclass(frozen=True)
class _Tuning:
    """topk_select's launch knobs: how its kernels run, not what they select. Private: the indexer's launch
    configs (indexer_topk._SELECT_TUNING, _SELECT_TUNING_LONG), the tests and the bench sweeps
    (bench/sweep_select.py, sweep_long.py, profile_select.py) build one and pass it as `_tuning`.
      num_warps, block, stages, maxnreg: the filter kernel's warps, scores per streaming step
        (None: launch_meta's 4096), loads in flight, registers per thread at most (None: no cap);
      resolve_warps: the resolve kernel's warps;
      one_reduce: the three counts of a radix-4 step in one tl.reduce (None: on the GPU; the
        interpreter runs that reduction's combine per element, which is slow but exact);
      segments: programs per row in the filtering step (None: default_segments, > 1 for few wide
        rows, e.g. decode); > 1 replaces the filter kernel by the two segmented ones (count, compact).
    """
    num_warps: int = 8
    block: int | None = None
    stages: int = 1
    maxnreg: int | None = None
    resolve_warps: int = 8
    one_reduce: bool | None = None
    segments: int | None = None


def topk_select(scores: torch.Tensor, topk: int, diag_base: int | None = None, row_period: int | None = None,
                sorted: bool = True, out: torch.Tensor | None = None, *, _tuning: _Tuning | None = None):
    """scores fp32 [R, W] (-inf = not allowed) -> int32 [R, topk]: per row, the indices (columns)
    of its topk largest allowed scores, -1 padded when fewer are allowed; descending by score
    (ties: lower index first) when `sorted`, else in ascending index order.

    diag_base: row r only reads its first min(W, diag_base + r % row_period + 1) scores
    (causal chunks; None = all W; row_period defaults to R). Scores beyond that are treated
    as not allowed without being read.
    out: int32 [R, topk] (unit stride along topk) to write into instead of a new tensor.
    _tuning: private launch knobs (_Tuning), for the indexer's launch configs and the bench sweeps.
    """
    return _topk_select_with_path(scores, topk, diag_base, row_period, sorted, out, _tuning)[0]


def _topk_select_with_path(scores: torch.Tensor, topk: int, diag_base: int | None = None,
                           row_period: int | None = None, sorted: bool = True, out: torch.Tensor | None = None,
                           tuning: _Tuning | None = None):
    """topk_select, and int32 [R]: the PATH_* each row took (tests and bench/ look at it).

    Three launches: the filter kernel (tuning's num_warps, block, stages, maxnreg registers per
    thread at most; only when W > CAND; two segmented kernels instead for few wide rows, see
    _Tuning.segments) streams each row into at most CAND candidates, the exact kernel does the
    rows it could not, the resolve kernel (resolve_warps) selects among the candidates.
    Separate kernels so that the streaming one can be held to few registers (many programs per
    SM) without spilling the other steps.
    """
    tuning = tuning or _Tuning()
    num_warps, block, stages, maxnreg = tuning.num_warps, tuning.block, tuning.stages, tuning.maxnreg
    resolve_warps, one_reduce, segments = tuning.resolve_warps, tuning.one_reduce, tuning.segments
    R, W = scores.shape
    assert scores.dtype == torch.float32 and scores.stride(1) == 1, (scores.dtype, scores.stride())
    meta = launch_meta(topk, block, stages, scores.shape[1])
    cand = meta["CAND"]
    if out is None:
        out = new_output((R, topk), torch.int32, scores.device)
    assert out.shape == (R, topk) and out.dtype == torch.int32 and out.stride(1) == 1, (out.shape, out.stride())
    filtered = W > cand
    segments = default_segments(R, W, topk, scores.device) if segments is None else segments
    # the one-program filter writes every row's path; the segmented one only the filtered rows'
    path = (torch.empty if filtered and segments <= 1 else torch.zeros)(R, dtype=torch.int32, device=scores.device)
    cand_val = torch.empty((R, cand) if filtered else (1, 1), dtype=torch.float32, device=scores.device)
    cand_idx = torch.empty(cand_val.shape, dtype=torch.int32, device=scores.device)
    n_cand = torch.empty(R if filtered else 1, dtype=torch.int32, device=scores.device)
    rows = (W, W if diag_base is None else diag_base, row_period or max(R, 1), topk)
    filter_args = (scores, cand_val, cand_idx, n_cand, path, *rows, scores.stride(0), cand_val.stride(0))
    exact_meta = dict(CAND=cand, BLOCK=EXACT_LAUNCH["block"], STAGES=EXACT_LAUNCH["stages"])
    resolve_args = (scores, out, cand_val, cand_idx, n_cand, *rows, scores.stride(0), out.stride(0),
                    cand_val.stride(0))
    resolve_meta = dict(CAND=cand, SORTED=sorted, FILTERED=filtered)
    one_reduce = not interpreting(scores) if one_reduce is None else one_reduce
    meta["ONE_REDUCE"] = exact_meta["ONE_REDUCE"] = resolve_meta["ONE_REDUCE"] = one_reduce
    if R > 0 and filtered:
        if segments > 1:  # maxnreg is the one-program filter's (the segments' larger sample would spill)
            _segmented_filter(scores, filter_args, topk, W, segments, meta, one_reduce, dict(num_warps=num_warps))
        else:
            _launch("filter", (R,), scores, filter_args, meta, dict(num_warps=num_warps, maxnreg=maxnreg))
        interp_block = dict(BLOCK=meta["BLOCK"]) if interpreting(scores) else {}  # small interpreted tests
        _launch("exact", (R,), scores, filter_args, dict(exact_meta, **interp_block),
                dict(num_warps=EXACT_LAUNCH["num_warps"]))
    if R > 0:
        _launch("resolve", (R,), scores, resolve_args, resolve_meta, dict(num_warps=resolve_warps))
    return out, path


def _launch(name: str, grid: tuple, scores: torch.Tensor, args: tuple, meta: dict, launch: dict) -> None:
    """One of the kernels: compiled (launch options: num_warps, maxnreg), or interpreted on CPU."""
    if interpreting(scores):
        launch_interpreted(_KERNELS[name], grid, *args, **meta)
    else:
        _kernel(name)[grid](*args, **meta, **{k: v for k, v in launch.items() if v is not None})


def _segmented_filter(scores, filter_args, topk, W, segments, meta, one_reduce, launch) -> None:
    """The filtering step with `segments` programs per row (few wide rows): count, then compact
    (writes the same cand_val / cand_idx / n_cand / path as the filter kernel)."""
    _, cand_val, cand_idx, n_cand, path, *rows, s_row, s_cand = filter_args
    R = scores.shape[0]
    count_meta, compact_meta, n_segs = segment_meta(topk, W, segments, meta["BLOCK"], meta["STAGES"], one_reduce)
    seg_count = torch.empty((R, n_segs), dtype=torch.int32, device=scores.device)
    threshold = torch.empty(R, dtype=torch.int32, device=scores.device)
    _launch("segment_count", (R, n_segs), scores, (scores, seg_count, threshold, *rows, s_row, n_segs),
            count_meta, launch)
    _launch("segment_compact", (R, n_segs), scores,
            (scores, cand_val, cand_idx, n_cand, path, seg_count, threshold, *rows, s_row, s_cand, n_segs),
            compact_meta, launch)


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
