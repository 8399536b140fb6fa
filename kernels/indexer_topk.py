"""Lightning-indexer scores + top-k selection (DeepSeek Sparse Attention indexer).

    scores[b,s,t] = sum_h w[b,s,h] * relu(q[b,s,h,:] . k[b,t,:])        (scales folded into w)
    out[b,s,:]    = top-`topk` allowed keys t of row (b,s), -1 padded (int32); descending
                    unless sorted=False (then in no particular order)

Design (prefill, one Triton kernel `_indexer_scores_kernel`):
  * a program owns BLOCK_S queries x all heads: the q block reshaped to [BLOCK_S*H_PAD, D]
    (loaded once, stays resident) and a key tile [BLOCK_T, D] meet in one tensor-core dot;
    relu, * w, and the sum over heads run in registers (fp32), giving a [BLOCK_S, BLOCK_T]
    score tile. [S, H, T] is never materialised. With KEY_ROWS (the configs the GPU autotuner
    picks on the H200) the dot is k . q^T -> [BLOCK_T, BLOCK_S*H_PAD]: each query's heads are
    adjacent *columns* of the accumulator, so the head sum is in-thread adds plus two quad
    shuffles (1.7x faster on the H200 than q . k^T, whose head sum crosses warps through
    shared memory).
  * which keys a query may see: the causal diagonal, and a bool mask tile [BLOCK_S, BLOCK_T]
    (HAS_MASK) or a key range lo <= t <= hi per query (HAS_RANGE: [BLOCK_S] loads, the form
    ic::indexer_topk gets from the compiled model, see kernels/key_range.py).
  * key tiles entirely above the causal diagonal, or outside every query's range in the
    block, are not computed (only filled with -inf); "open" tiles, where every key is allowed
    for every query of the block (most of a long causal prefill), are stored without the
    per-element mask (8.8 % faster than masking every tile on full-width 128K rows, H200).
  * queries are processed in chunks so the fp32 [B, chunk, width] score buffer stays under
    ~1 GiB (causal chunks: >= 2048 rows while it stays under 2 GiB; the key axis is split so that a
    chunk's programs fill whole waves, prefill_splits); `width` is the chunk's causal horizon, so torch.topk (the selection) never sees
    the columns no query of the chunk may attend to; causal chunks are at most
    CAUSAL_CHUNK_ROWS tall so that width follows the diagonal. The buffer is contiguous per
    chunk (no copy in topk).
  * indexer_precision="fp8" (`_indexer_scores_scaled_kernel`, same body): e4m3 q and k, e4m3 dots,
    scores times the keys' scales (DeepSeek-V3.2's fp8_index; kernels/fp8_indexer.py).
  * decode / small S: all S queries share one program row (K streamed once) and the key
    axis is split over `num_splits` programs so the GPU is filled even for B=1.
The selection runs per chunk on the masked scores: torch.topk, or kernels/topk_select.py when
the caller allows unordered output (see select_topk); -inf picks become -1.
"""
from __future__ import annotations

import torch

from ._triton_utils import (
    HAS_TRITON,
    cdiv,
    dot_precision,
    interpreting,
    jit_helper,
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
from .fp8_indexer import FP8_DTYPE, quantize_indexer
from .reference import check_indexer_precision, indexer_topk_ref, picked_scores, topk_indices_from_scores
from .topk_select import LONG_ROW, _Tuning, topk_select

SCORE_BUFFER_BYTES = 1 << 30  # fp32 [B, chunk, width] score buffer budget per query chunk
# Causal chunks keep at least this many rows while the buffer stays under 2 x SCORE_BUFFER_BYTES:
# the budget alone gives 1280 rows at 200K and 1024 at 256K, and the selection's one-program-per-row
# filter then runs 1.1-1.4 waves of programs per chunk (H100: whole indexer 256K 617 -> 597 ms,
# 200K 352 -> 350, for a 1.6 / 2 GiB buffer; bench/sweep_long.py).
MIN_CAUSAL_CHUNK_ROWS = 2048
CAUSAL_CHUNK_ROWS = 4096  # causal query chunks at most this tall (see _chunk_rows; bench/sweep_topk.py)
MAX_TILE_ROWS = 256  # max BLOCK_S * H_PAD (rows of the tensor-core dot)
# Unordered selection (sorted=False) uses kernels/topk_select.py (few wide rows, as in decode,
# through its segmented filter: T = 128K under CUDA graphs 0.023 ms at B = 1 and 0.037 at B = 16
# vs torch.topk's 0.075 / 0.098 on the H200; without graphs decode is host-bound and
# topk_select's four launches cost more host time than torch.topk's); sorted selection uses
# torch.topk (the bitonic sort made topk_select 2x slower than torch.topk at 16K). Launch
# configs: bench/sweep_select.py.
MAX_SELECT_TOPK = 2048  # candidate block 2 * topk lives in registers: measured only up to here
# topk_select launch: the filter kernel with 4 warps held to 72 registers (7 programs per SM;
# 64 spills inside the streaming loop under triton 3.9), fastest at 16K and 128K
# (bench/sweep_select.py). Resolve: 8 and 4 warps equal; 2 / 1 warps (more candidates per
# thread, fewer programs per SM) 1.4x / 2.2x slower: the resolve is instruction-bound (ncu).
# (_Tuning is topk_select's private launch-knob object; bench/sweep_select.py swaps these for A/Bs.)
_SELECT_TUNING = _Tuning(num_warps=4, block=1024, stages=3, maxnreg=72, resolve_warps=8)
# Chunks wider than topk_select.LONG_ROW (its filter then samples 4096 scores: at 4 warps / 72
# registers that spills inside the streaming loop, at 8 warps it does not; AOT sm_90).
_SELECT_TUNING_LONG = _Tuning(num_warps=8, block=2048, stages=3, maxnreg=72, resolve_warps=8)


def _indexer_scores_kernel(
    q_ptr, k_ptr, w_ptr, mask_ptr, range_ptr, out_ptr,
    S, T, H, D,  # q [B,S,H,D], k [B,T,D]
    row_start, n_rows, width, tune_bucket,  # this chunk: queries [row_start, +n_rows), columns [0, width)
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_t, sk_d,
    sw_b, sw_s, sw_h,
    sm_b, sm_s, sm_t,
    sr_b, sr_s, sr_c,  # key_range [B,S,3] = (lo, hi, count) per query
    so_b, so_s, so_t,
    BLOCK_S: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: fp32 dot operands (see upcast_dots)
    HEAD_MAJOR: tl.constexpr,  # dot rows ordered (head, query) instead of (query, head)
    KEY_ROWS: tl.constexpr = False,  # dot = k . q^T ([BLOCK_T, queries x heads]) instead of q . k^T
    HAS_RANGE: tl.constexpr = False,  # key t allowed iff lo <= t <= hi of its query (count 0: none)
):
    """out[b, s_local, t] = masked score (fp32, -inf = not allowed) for t in this program's split."""
    _scores_body(q_ptr, k_ptr, w_ptr, w_ptr, mask_ptr, range_ptr, out_ptr, S, T, H, D,
                 row_start, n_rows, width, sq_b, sq_s, sq_h, sq_d, sk_b, sk_t, sk_d, sw_b, sw_s, sw_h, 0, 0,
                 sm_b, sm_s, sm_t, sr_b, sr_s, sr_c, so_b, so_s, so_t,
                 BLOCK_S, H_PAD, D_PAD, BLOCK_T, CAUSAL, HAS_MASK, DOT_PRECISION, UPCAST_DOT, HEAD_MAJOR, KEY_ROWS,
                 HAS_RANGE, False)


def _indexer_scores_scaled_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, mask_ptr, range_ptr, out_ptr,
    S, T, H, D,  # q [B,S,H,D], k [B,T,D] (fp8 e4m3, or bf16/fp32), w [B,S,H] (q's scales folded in), ks [B,T] fp32
    row_start, n_rows, width, tune_bucket,
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_t, sk_d,
    sw_b, sw_s, sw_h,
    sks_b, sks_t,
    sm_b, sm_s, sm_t,
    sr_b, sr_s, sr_c,
    so_b, so_s, so_t,
    BLOCK_S: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, HEAD_MAJOR: tl.constexpr, KEY_ROWS: tl.constexpr = False,
    HAS_RANGE: tl.constexpr = False,
):
    """Scores times a per-key scale after the head sum: out[b, s, t] = ks[b, t] * sum_h w[b, s, h] *
    relu(q[b, s, h] . k[b, t]) (masked as the plain kernel). With e4m3 q and k, the fp8 indexer
    (DeepSeek-V3.2's fp8_index: e4m3 tensor-core dots, fp32 accumulate, ks the keys' scales); with
    bf16 / fp32 ones, a model's own per-key factor on the scores (its fp8_index on unquantised keys)."""
    _scores_body(q_ptr, k_ptr, w_ptr, ks_ptr, mask_ptr, range_ptr, out_ptr, S, T, H, D,
                 row_start, n_rows, width, sq_b, sq_s, sq_h, sq_d, sk_b, sk_t, sk_d, sw_b, sw_s, sw_h, sks_b, sks_t,
                 sm_b, sm_s, sm_t, sr_b, sr_s, sr_c, so_b, so_s, so_t,
                 BLOCK_S, H_PAD, D_PAD, BLOCK_T, CAUSAL, HAS_MASK, DOT_PRECISION, UPCAST_DOT, HEAD_MAJOR, KEY_ROWS,
                 HAS_RANGE, True)


@jit_helper
def _scores_body(
    q_ptr, k_ptr, w_ptr, ks_ptr, mask_ptr, range_ptr, out_ptr, S, T, H, D,
    row_start, n_rows, width, sq_b, sq_s, sq_h, sq_d, sk_b, sk_t, sk_d, sw_b, sw_s, sw_h, sks_b, sks_t,
    sm_b, sm_s, sm_t, sr_b, sr_s, sr_c, so_b, so_s, so_t,
    BLOCK_S: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HEAD_MAJOR: tl.constexpr, KEY_ROWS: tl.constexpr, HAS_RANGE: tl.constexpr,
    KSCALE: tl.constexpr,
):
    """The score kernels' body (one program's tiles); KSCALE: scores times ks[b, t] (fp8 keys' scales).
    Longer than our ~80-line functions: Triton inlines helpers, but each dot layout (KEY_ROWS,
    HEAD_MAJOR) keeps its loads, dot and head reduction together so the layouts read side by side."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # A operand rows r = s_local * H_PAD + h (or h * BLOCK_S + s_local): q block as [BLOCK_S*H_PAD, D_PAD].
    r = tl.arange(0, BLOCK_S * H_PAD)
    if HEAD_MAJOR:
        r_s = pid_s * BLOCK_S + r % BLOCK_S
        r_h = r // BLOCK_S
    else:
        r_s = pid_s * BLOCK_S + r // H_PAD  # chunk-local query of each row
        r_h = r % H_PAD
    r_ok = (r_s < n_rows) & (r_h < H)
    d = tl.arange(0, D_PAD)
    q_row_ptr = q_ptr + b * sq_b + (row_start + r_s).to(tl.int64) * sq_s + r_h * sq_h  # [R]
    q_tile = tl.load(q_row_ptr[:, None] + d[None, :] * sq_d,
                     mask=r_ok[:, None] & (d[None, :] < D), other=0.0)  # [R, D_PAD]
    if UPCAST_DOT:
        q_tile = q_tile.to(tl.float32)
    w_rows = tl.load(w_ptr + b * sw_b + (row_start + r_s).to(tl.int64) * sw_s + r_h * sw_h,
                     mask=r_ok, other=0.0).to(tl.float32)  # [R]

    s_loc = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S] chunk-local query
    s_ok = s_loc < n_rows
    s_glob = (row_start + s_loc).to(tl.int64)
    last_key = (T - S) + s_glob  # causal: key t allowed iff t <= last_key
    if HAS_RANGE:  # [BLOCK_S] first / last allowed key per query (an empty row: lo > hi)
        range_row_ptr = range_ptr + b * sr_b + s_glob * sr_s
        row_lo = tl.load(range_row_ptr, mask=s_ok, other=T)
        row_count = tl.load(range_row_ptr + 2 * sr_c, mask=s_ok, other=0)
        row_hi = tl.where(row_count > 0, tl.load(range_row_ptr + sr_c, mask=s_ok, other=-1), -1)

    # This program's key range [t_lo, t_hi): a split of [0, width) in whole BLOCK_T tiles.
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

    # Open tiles [open_lo, open_hi): every key allowed for every query of the block (all rows real,
    # below the first row's diagonal, inside every row's range, no bool mask): stored without the
    # per-element allowed / where / store mask (most tiles of a long causal prefill).
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

    t_ar = tl.arange(0, BLOCK_T)
    out_row_ptr = out_ptr + b * so_b + s_loc.to(tl.int64) * so_s  # [BLOCK_S]
    for i in range(first_computed, n_computed):
        t = t_lo + i * BLOCK_T + t_ar  # [BLOCK_T]
        t_ok = t < T
        if KEY_ROWS:  # keys are the dot's rows: the head sum runs along its columns (in registers + quad shuffles)
            k_rows = tl.load(k_ptr + b * sk_b + t[:, None].to(tl.int64) * sk_t + d[None, :] * sk_d,
                             mask=t_ok[:, None] & (d[None, :] < D), other=0.0)  # [BLOCK_T, D_PAD]
            if UPCAST_DOT:
                k_rows = k_rows.to(tl.float32)
            logits_t = tl.dot(k_rows, tl.trans(q_tile), input_precision=DOT_PRECISION)  # [BLOCK_T, R] fp32
            weighted_t = tl.maximum(logits_t, 0.0) * w_rows[None, :]
            scores_t = tl.sum(tl.reshape(weighted_t, (BLOCK_T, BLOCK_S, H_PAD)), axis=2)  # [BLOCK_T, BLOCK_S]
            if KSCALE:
                k_scale = tl.load(ks_ptr + b * sks_b + t.to(tl.int64) * sks_t, mask=t_ok, other=0.0)
                scores_t = scores_t * k_scale[:, None]
            scores = tl.trans(scores_t)  # [BLOCK_S, BLOCK_T]
        else:
            k_tile = tl.load(k_ptr + b * sk_b + t[None, :].to(tl.int64) * sk_t + d[:, None] * sk_d,
                             mask=(d[:, None] < D) & t_ok[None, :], other=0.0)  # k^T [D_PAD, BLOCK_T]
            if UPCAST_DOT:
                k_tile = k_tile.to(tl.float32)
            logits = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION)  # [R, BLOCK_T] fp32
            weighted = tl.maximum(logits, 0.0) * w_rows[:, None]
            if HEAD_MAJOR:
                scores = tl.sum(tl.reshape(weighted, (H_PAD, BLOCK_S, BLOCK_T)), axis=0)  # [BLOCK_S, BLOCK_T]
            else:
                scores = tl.sum(tl.reshape(weighted, (BLOCK_S, H_PAD, BLOCK_T)), axis=1)
            if KSCALE:
                k_scale = tl.load(ks_ptr + b * sks_b + t.to(tl.int64) * sks_t, mask=t_ok, other=0.0)
                scores = scores * k_scale[None, :]
        if (i >= open_lo) & (i < open_hi):
            tl.store(out_row_ptr[:, None] + t[None, :] * so_t, scores)
        else:
            allowed = t_ok[None, :] & s_ok[:, None]
            if CAUSAL:
                allowed = allowed & (t[None, :] <= last_key[:, None])
            if HAS_MASK:
                m = tl.load(mask_ptr + b * sm_b + s_glob[:, None] * sm_s + t[None, :].to(tl.int64) * sm_t,
                            mask=allowed, other=0)
                allowed = allowed & (m != 0)
            if HAS_RANGE:
                allowed = allowed & (t[None, :] >= row_lo[:, None]) & (t[None, :] <= row_hi[:, None])
            scores = tl.where(allowed, scores, float("-inf"))
            tl.store(out_row_ptr[:, None] + t[None, :] * so_t, scores,
                     mask=s_ok[:, None] & (t[None, :] < t_hi))
    neg_inf = tl.full((BLOCK_S, BLOCK_T), float("-inf"), tl.float32)
    for i in range(0, first_computed):
        t = t_lo + i * BLOCK_T + t_ar
        tl.store(out_row_ptr[:, None] + t[None, :] * so_t, neg_inf,
                 mask=s_ok[:, None] & (t[None, :] < t_hi))
    for i in range(n_computed, n_tiles):
        t = t_lo + i * BLOCK_T + t_ar
        tl.store(out_row_ptr[:, None] + t[None, :] * so_t, neg_inf,
                 mask=s_ok[:, None] & (t[None, :] < t_hi))


# --------------------------------------------------------------------------- launch configs

def _prefill_configs(h_pad: int):
    """Tensor-core tiles for sm_90 (wgmma), best first in bench/sweep_indexer.py on the H200.

    KEY_ROWS (keys as the dot's rows, k . q^T): the head sum runs along the accumulator's columns
    (registers + quad shuffles), 503-517 TFLOP/s at 32K for these configs; the (query, head) /
    (head, query) row orders sum across warps (shuffles + a shared-memory exchange) and peaked at
    306 -- two are kept as fallbacks for other head counts. All AOT-compiled for sm_90 (H=32,
    D=128) with triton 3.6 and 3.9: no spills, <= 112 KB smem (two CTAs per SM). Left out although
    fast on the H200, because they spill with triton 3.9: 256 rows x 128 keys / 8 warps (517) and
    256 x 64 / 4 warps (496)."""
    configs = []
    for rows, block_t, warps, stages in ((256, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (256, 64, 8, 2)):
        configs.append(triton.Config({"BLOCK_S": max(1, rows // h_pad), "BLOCK_T": block_t, "HEAD_MAJOR": False,
                                      "KEY_ROWS": True}, num_warps=warps, num_stages=stages))
    for block_t, stages, head_major in ((64, 3, True), (64, 2, False)):
        configs.append(triton.Config({"BLOCK_S": max(1, 128 // h_pad), "BLOCK_T": block_t, "HEAD_MAJOR": head_major,
                                      "KEY_ROWS": False}, num_warps=4, num_stages=stages))
    return configs


def _prefill_fp8_configs(h_pad: int):
    """fp8 (e4m3) tiles: the bf16 list's KEY_ROWS shapes (half the shared memory per tile, so one
    more stage fits) plus 128-key tiles, since each key tile carries half the dot work per byte."""
    configs = []
    for rows, block_t, warps, stages in ((256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3),
                                         (256, 128, 8, 3), (128, 64, 8, 4), (256, 64, 8, 5), (128, 128, 4, 3),
                                         (256, 32, 8, 4)):
        configs.append(triton.Config({"BLOCK_S": max(1, rows // h_pad), "BLOCK_T": block_t, "HEAD_MAJOR": False,
                                      "KEY_ROWS": True}, num_warps=warps, num_stages=stages))
    return configs


def _decode_configs(exact_fp32: bool = False, fp8: bool = False):
    """Memory-bound streaming of K: deep pipelines of [D, BLOCK_T] tiles.

    exact_fp32 (fp32 inputs, "ieee" dots without tensor cores): only BLOCK_T 64. The FMA-emulated
    [rows, 128] x [128, 256] dot took minutes per config to compile (the GPU test with S=3,
    fp32 ran past 175 s autotuning); fp32 is a correctness path, not a speed one.
    fp8: keys as the dot's rows ([BLOCK_T, D] tiles, as the fp8 prefill tiles): Hopper's e4m3 MMA
    takes both operands K-major, and a [D, BLOCK_T] view of the key rows is not."""
    block_ts = (64,) if exact_fp32 else (64, 128, 256)
    return [triton.Config({"BLOCK_T": bt, "HEAD_MAJOR": False, "KEY_ROWS": fp8}, num_warps=w, num_stages=st)
            for bt in block_ts for w in (4, 8) for st in (3, 4)]


_TUNED: dict = {}


def _jit_kernel(scaled: bool = False):
    key = "jit_scaled" if scaled else "jit"
    if key not in _TUNED:
        _TUNED[key] = triton.jit(_indexer_scores_scaled_kernel if scaled else _indexer_scores_kernel)
    return _TUNED[key]


def _tuned_kernel(mode: str, h_pad: int, exact_fp32: bool, scaled: bool = False, fp8: bool = False):
    """Autotuned GPU kernel for mode 'prefill' (BLOCK_S tuned) or 'decode' (BLOCK_S given); scaled:
    the per-key scale kernel; fp8: e4m3 inputs (their own prefill tiles)."""
    key = (mode, h_pad, exact_fp32, scaled, fp8)
    if key not in _TUNED:
        if mode == "prefill":
            configs = _prefill_fp8_configs(h_pad) if fp8 else _prefill_configs(h_pad)
        else:
            configs = _decode_configs(exact_fp32, fp8)
        _TUNED[key] = triton.autotune(configs, key=["H_PAD", "D_PAD", "CAUSAL", "HAS_MASK", "HAS_RANGE",
                                                                   "tune_bucket"])(
            _jit_kernel(scaled))
    return _TUNED[key]


# Prefill grid: programs per SM the tuned configs keep resident (<= 112 KB shared memory, <= 128
# registers x 256 threads), and how the key axis is split so that the programs fill whole waves.
PREFILL_CTAS_PER_SM = 2
MIN_SPLIT_KEYS = 512  # a key split is at least this many keys (8 tiles of 64)
MAX_SPLITS = 64


def prefill_splits(programs: int, width: int, block_t: int, sms: int) -> int:
    """Key-axis splits for a prefill launch of `programs` query programs (B x query blocks).

    A chunk's programs all do about the same work (the chunk is thin next to its width), so the
    launch takes ceil(P / slots) rounds of one program per slot (slots = PREFILL_CTAS_PER_SM x SMs).
    Chunk heights follow the 1 GiB score-buffer budget (2^28 / T rows): 2048 rows at 128K make 256
    programs of 8 queries (one round of 264 slots on 132 SMs, 97 % busy), but 1280 rows at 200K make
    160 (61 %) and 1024 at 256K 128 (48 %) -- the cliff past 128K. Splitting the key axis s ways
    multiplies the programs at almost no cost (each split reloads only its q block): the smallest s
    (at most width / MIN_SPLIT_KEYS) whose rounds are >= 95 % busy, else the busiest."""
    slots = PREFILL_CTAS_PER_SM * max(1, sms)
    max_s = max(1, min(MAX_SPLITS, width // max(MIN_SPLIT_KEYS, block_t)))
    best, best_busy = 1, 0.0
    for s in range(1, max_s + 1):
        p = programs * s
        busy = p / (cdiv(p, slots) * slots)
        if busy >= 0.95:
            return s
        if busy > best_busy + 1e-9:
            best, best_busy = s, busy
    return best


def _interpreter_meta(block_s: int | None, h_pad: int, fp8: bool = False) -> dict:
    """Small fixed tiles for the CPU interpreter (big enough to keep it fast); fp8 decode: keys as
    the dot's rows, as on the GPU."""
    meta = {"BLOCK_T": 16, "HEAD_MAJOR": False, "KEY_ROWS": fp8 and block_s is not None}
    if block_s is None:
        meta["BLOCK_S"] = max(1, 64 // h_pad)
    return meta


# --------------------------------------------------------------------------- host side

def _head_padding(H: int, block_s: int) -> int:
    """Heads padded to a power of two, and so that the dot has >= 16 rows."""
    return max(next_pow2(H), cdiv(16, block_s))


def indexer_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None, causal: bool,
    row_start: int, n_rows: int, width: int, out: torch.Tensor,
    decode_block_s: int | None = None, num_splits: int | None = None, config=None,
    key_range: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked scores of queries [row_start, row_start+n_rows) vs keys [0, width) into out [B, n_rows, width].

    decode_block_s: put that many queries (>= n_rows) in one program row (decode form).
    num_splits: programs along the key axis (default: enough to fill the GPU).
    key_range: int32 [B,S,3] (lo, hi, count) per query (kernels/key_range.py), with or instead of `mask`.
    k_scale: fp32 [B,T]: the scaled kernel, scores times k_scale[b, t] (with e4m3 q and k, the fp8
    indexer's key scales, q's folded into w, see kernels/fp8_indexer.py; else a per-key factor).
    num_splits None: decode form, enough splits for 2 programs per SM; prefill, prefill_splits.
    """
    B, S, H, D = q.shape
    scaled, fp8 = k_scale is not None, q.dtype == FP8_DTYPE
    T = k.shape[1]
    h_pad = _head_padding(H, decode_block_s or 1)
    d_pad = max(16, next_pow2(D))
    # placeholders when absent (never read): new_empty launches no fill kernel (decode is host-bound)
    mask_u8 = q.new_empty((1, 1, 1), dtype=torch.uint8)
    if mask is not None:
        mask_u8 = mask.to(torch.bool).expand(B, S, T).view(torch.uint8)
    ranges = q.new_empty((1, 1, 3), dtype=torch.int32) if key_range is None else \
        key_range.to(torch.int32).expand(B, S, 3)
    sms = num_sms(q.device)
    if num_splits is None and decode_block_s is not None:
        programs = B * cdiv(n_rows, decode_block_s)
        num_splits = max(1, min(cdiv(2 * sms, programs), cdiv(width, 512)))
    if scaled:
        ks = k_scale.to(torch.float32).expand(B, T)
        args = (q, k, w, ks, mask_u8, ranges, out, S, T, H, D, row_start, n_rows, width, min(width.bit_length(), 17),
                *q.stride(), *k.stride(), *w.stride(), *ks.stride(), *mask_u8.stride(), *ranges.stride(),
                *out.stride())
    else:
        args = (
            q, k, w, mask_u8, ranges, out,
            S, T, H, D,
            row_start, n_rows, width, min(width.bit_length(), 17),
            *q.stride(), *k.stride(), *w.stride(), *mask_u8.stride(), *ranges.stride(), *out.stride(),
        )
    consts = {"H_PAD": h_pad, "D_PAD": d_pad, "CAUSAL": bool(causal), "HAS_MASK": mask is not None,
              "HAS_RANGE": key_range is not None,
              "DOT_PRECISION": "tf32" if fp8 else dot_precision(q.dtype),
              "UPCAST_DOT": interpreting(q) if fp8 else upcast_dots(q)}
    if decode_block_s is not None:
        consts["BLOCK_S"] = decode_block_s

    def grid(meta):
        prog_rows = cdiv(n_rows, meta["BLOCK_S"])
        splits = num_splits or prefill_splits(B * prog_rows, width, meta["BLOCK_T"], sms)
        return (prog_rows, B, splits)

    kernel_fn = _indexer_scores_scaled_kernel if scaled else _indexer_scores_kernel
    if interpreting(q):
        consts.update(config.kwargs if config is not None else _interpreter_meta(decode_block_s, h_pad, fp8))
        launch_interpreted(kernel_fn, grid, *args, **consts)
    elif config is not None:  # bench/sweep_indexer.py: one launch config, no autotune
        launch_config(_jit_kernel(scaled), grid, args, consts, config)
    else:
        mode = "prefill" if decode_block_s is None else "decode"
        _tuned_kernel(mode, h_pad, consts["DOT_PRECISION"] == "ieee", scaled, fp8)[grid](*args, **consts)
    return out


def decode_form(S: int, H: int) -> bool:
    """Few queries (decode, speculative decode): all S x heads fit one dot tile, so the kernel runs
    them in one program row with the key axis split (no query chunks, no causal tile skipping)."""
    return next_pow2(S) * next_pow2(H) <= MAX_TILE_ROWS


def _chunk_rows(B: int, T: int, block: int, causal: bool, budget: int = SCORE_BUFFER_BYTES) -> int:
    """Queries per chunk: the buffer budget, and (causal) at most CAUSAL_CHUNK_ROWS so each
    chunk's width stays within that many keys of its rows' diagonal and torch.topk reads less
    of the -inf upper triangle. Shorter chunks slow the score kernel (fewer programs per
    launch): at 16K, 4096 rows measured best (bench/sweep_topk.py, docs/benchmarks.md)."""
    rows = max(1, budget // (B * max(T, 1) * 4))
    if causal:
        rows = max(rows, min(MIN_CAUSAL_CHUNK_ROWS, 2 * budget // (B * max(T, 1) * 4)))
        rows = min(rows, CAUSAL_CHUNK_ROWS)
    return max(block, rows // block * block)


def chunked_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None,
    causal: bool = True, chunk_rows: int | None = None, num_splits: int | None = None,
    key_range: torch.Tensor | None = None, indexer_precision: str = "bf16", k_scale: torch.Tensor | None = None,
):
    """Yield (s0, s1, scores [B, s1-s0, width]) per query chunk; `scores` is reused between chunks.

    width = the chunk's causal horizon (T when not causal). Small S (S x heads fits one dot
    tile) uses the decode form: a single chunk, all queries in one program row, keys split.
    indexer_precision "fp8": q and k quantised to e4m3 first (kernels/fp8_indexer.py), fp8 dots.
    k_scale fp32 [B,T]: scores times k_scale[b, t] (with "fp8" and e4m3 k: its scales, k not
    quantised again).
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    assert k.shape[0] == B and k.shape[1:] == (T, D) and w.shape == (B, S, H), (q.shape, k.shape, w.shape)
    if check_indexer_precision(indexer_precision) == "fp8":
        q, k, w, k_scale = quantize_indexer(q, k, w, k_scale)
    else:
        k = k.to(q.dtype)
    decode_block_s = next_pow2(S) if decode_form(S, H) else None
    chunk = S if decode_block_s is not None else (chunk_rows or _chunk_rows(B, T, 256, causal))
    storage = new_output((B * min(chunk, S) * T,), torch.float32, q.device)
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        width = max(0, min(T, T - S + s1)) if causal else T
        scores = storage[: B * (s1 - s0) * width].view(B, s1 - s0, width)  # contiguous for torch.topk
        if width > 0:
            indexer_scores(q, k, w, mask, causal, s0, s1 - s0, width, scores,
                           decode_block_s=decode_block_s, num_splits=num_splits, key_range=key_range,
                           k_scale=k_scale)
        yield s0, s1, scores


def select_topk(scores: torch.Tensor, topk: int, diag_base: int | None, sorted: bool = True,
                selection: str = "auto", out: torch.Tensor | None = None):
    """Masked fp32 scores [B, rows, width] -> int32 [B, rows, topk] (-1 padded; descending when
    `sorted`, else in no particular order).

    selection: "triton" (kernels/topk_select.py; causal rows are read only up to their diagonal
    diag_base + row), "torch" (torch.topk over the whole buffer), or "auto" (triton when unordered
    and topk <= MAX_SELECT_TOPK). out: int32 [B*rows, topk] for topk_select to write into (B = 1: a
    slice of the whole output, no copy)."""
    B, rows, width = scores.shape
    if selection not in ("auto", "triton", "torch"):
        raise ValueError(f"selection must be 'auto', 'triton' or 'torch', got {selection!r}")
    if selection == "auto":
        wanted = not sorted and topk <= MAX_SELECT_TOPK
        selection = "triton" if wanted else "torch"
    if selection == "torch":
        return topk_indices_from_scores(scores, topk)
    tuning = _SELECT_TUNING_LONG if width > LONG_ROW else _SELECT_TUNING
    out = topk_select(scores.view(B * rows, width), topk, diag_base=diag_base, row_period=rows, sorted=sorted,
                      out=out, _tuning=tuning)
    return out.view(B, rows, topk)


def indexer_topk_triton(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, topk: int,
    mask: torch.Tensor | None = None, causal: bool = True,
    chunk_rows: int | None = None, num_splits: int | None = None, sorted: bool = True,
    selection: str = "auto", key_range: torch.Tensor | None = None, indexer_precision: str = "bf16",
    k_scale: torch.Tensor | None = None, scores_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton path of indexer_topk (CPU tensors run in the Triton interpreter).

    chunk_rows / num_splits override the heuristics (tests use them to hit every code path);
    sorted / selection: see select_topk; scores_out: see indexer_topk.
    """
    B, S, T = q.shape[0], q.shape[1], k.shape[1]
    out = new_output((B, S, topk), torch.int32, q.device)
    for s0, s1, scores in chunked_scores(q, k, w, mask, causal, chunk_rows, num_splits, key_range=key_range,
                                         indexer_precision=indexer_precision, k_scale=k_scale):
        if scores.shape[-1] == 0:  # no key visible to this chunk (causal with S > T)
            out[:, s0:s1] = -1
            if scores_out is not None:
                scores_out[:, s0:s1] = float("-inf")
        else:
            diag_base = (T - S + s0) if causal else None
            triton_select = selection == "triton" or (selection == "auto" and not sorted and topk <= MAX_SELECT_TOPK)
            if B == 1 and triton_select:  # topk_select writes into out's rows (no copy)
                select_topk(scores, topk, diag_base, sorted, selection, out=out[0, s0:s1])
            else:
                out[:, s0:s1] = select_topk(scores, topk, diag_base, sorted, selection)
            if scores_out is not None:  # read from the buffer the selection read, before the next chunk reuses it
                scores_out[:, s0:s1] = picked_scores(scores, out[:, s0:s1])
    return out


def indexer_topk(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, topk: int,
    mask: torch.Tensor | None = None, causal: bool = True, use_triton: bool | None = None,
    sorted: bool = True, key_range: torch.Tensor | None = None, indexer_precision: str = "bf16",
    k_scale: torch.Tensor | None = None, scores_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer top-k. q [B,S,H,D], k [B,T,D], w [B,S,H] -> int32 [B,S,topk] (-1 padded).
    scores_out: fp32 [B,S,topk] to receive the picked keys' scores, the values the selection
    compared (-inf in -1 slots): a model's topk values, for models that use them.

    mask: bool broadcastable to [B,S,T]; key_range: int32 [B,S,3] (lo, hi, count), key t allowed
    iff count > 0 and lo <= t <= hi (kernels/key_range.py); both optional, on top of `causal`.
    sorted=False: the caller does not need descending order (the reference still gives it).
    use_triton: None = Triton on CUDA, reference elsewhere; True = Triton (interpreter on CPU);
    False = reference. See _triton_utils for the IC_KERNELS_TRITON override.
    indexer_precision: "bf16" (default: q, k as given, in their dtype) or "fp8" (DeepSeek-V3.2's
    fp8 indexer: q, k quantised to e4m3 with a scale per token and head, e4m3 tensor-core dots;
    kernels/fp8_indexer.py). k_scale fp32 [B,T]: scores times k_scale[b, t], a per-key factor (with
    "fp8" and e4m3 k: the keys' scales, an fp8 key cache or the model's own, not quantised again).
    """
    check_indexer_precision(indexer_precision)
    if use_triton_for(q, use_triton):
        return indexer_topk_triton(q, k, w, topk, mask, causal, sorted=sorted, key_range=key_range,
                                   indexer_precision=indexer_precision, k_scale=k_scale, scores_out=scores_out)
    return indexer_topk_ref(q, k, w, topk, mask, causal, key_range=key_range, indexer_precision=indexer_precision,
                            k_scale=k_scale, scores_out=scores_out)


__all__ = ["indexer_topk", "indexer_topk_triton", "indexer_scores", "chunked_scores", "decode_form", "HAS_TRITON"]
