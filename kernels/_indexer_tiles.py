"""Which key tiles a prefill score program computes (indexer_topk._scores_body): causal rule, key
splits, key ranges and open tiles, as one Triton helper."""
from __future__ import annotations

from ._triton_utils import jit_helper, tl


@jit_helper
def tile_plan(T, S, row_start, n_rows, width, pid_s, split, num_splits, s_ok, row_lo, row_hi,
              BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_RANGE: tl.constexpr):
    """(t_lo, t_hi, n_tiles, first_computed, n_computed, open_lo, open_hi) of query block pid_s in key split
    `split`: its keys [t_lo, t_hi) in n_tiles BLOCK_T tiles; tiles [first_computed, n_computed) are
    computed, the rest only -inf filled; tiles [open_lo, open_hi) are open (every key allowed for every
    query of the block: stored without the per-element mask). s_ok / row_lo / row_hi [BLOCK_S]: real
    rows and (HAS_RANGE) each query's first / last allowed key."""
    blocks_per_split = tl.cdiv(tl.cdiv(width, BLOCK_T), num_splits)
    t_lo = split * blocks_per_split * BLOCK_T
    t_hi = tl.minimum(width, t_lo + blocks_per_split * BLOCK_T)
    n_tiles = tl.cdiv(tl.maximum(t_hi - t_lo, 0), BLOCK_T)
    n_computed = n_tiles
    if CAUSAL:  # tiles wholly above the diagonal of the block's last query are only -inf filled
        last_row = tl.minimum(row_start + pid_s * BLOCK_S + BLOCK_S, row_start + n_rows) - 1
        horizon = tl.minimum(t_hi, (T - S) + last_row + 1)
        n_computed = tl.cdiv(tl.maximum(horizon - t_lo, 0), BLOCK_T)
    first_computed = 0
    if HAS_RANGE:  # tiles outside every query's range are only -inf filled
        block_lo = tl.min(tl.where(s_ok, row_lo, T), axis=0)
        block_hi = tl.max(tl.where(s_ok, row_hi, -1), axis=0)
        n_computed = tl.minimum(n_computed, tl.cdiv(tl.maximum(block_hi + 1 - t_lo, 0), BLOCK_T))
        first_computed = tl.minimum(tl.maximum(block_lo - t_lo, 0) // BLOCK_T, n_computed)

    # Open tiles: all rows real, below the first row's diagonal, inside every row's range, no bool
    # mask (most tiles of a long causal prefill).
    open_lo = first_computed
    open_hi = first_computed
    if not HAS_MASK:
        block_full = pid_s * BLOCK_S + BLOCK_S <= n_rows
        open_end = t_hi  # keys [.., open_end) allowed for all rows
        if CAUSAL:
            open_end = tl.minimum(open_end, (T - S) + row_start + pid_s * BLOCK_S + 1)
        if HAS_RANGE:
            open_end = tl.minimum(open_end, tl.min(tl.where(s_ok, row_hi, -1), axis=0) + 1)
            first_key = tl.max(tl.where(s_ok, row_lo, T), axis=0)
            open_lo = tl.maximum(open_lo, tl.cdiv(tl.maximum(first_key - t_lo, 0), BLOCK_T))
        open_hi = tl.where(block_full, tl.maximum(open_lo, (open_end - t_lo) // BLOCK_T), open_lo)
    return t_lo, t_hi, n_tiles, first_computed, n_computed, open_lo, open_hi
