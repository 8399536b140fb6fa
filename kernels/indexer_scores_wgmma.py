"""Prefill indexer scores on Hopper with the MMA and the epilogue overlapped (Gluon, async wgmma).

    out[b, s_local, t] = ks[b, t] * sum_h w[b, s, h] * relu(q[b, s, h, :] . k[b, t, :])
                         (masked: -inf where key t is not allowed for query s; ks = 1 unless KSCALE)

The same scores as `indexer_topk._indexer_scores_kernel` in its KEY_ROWS form (keys as the dot's
rows: acc [BLOCK_T, BLOCK_S*H_PAD] = k_tile . q_block^T, the head sum along the accumulator's
columns), with one difference in how a program runs its key tiles. The Triton kernel waits for each
tile's dot before its epilogue (relu, x w, head sum, mask, store: about 2 FP32 instructions per
accumulator element), so the tensor cores idle while the same warps run it -- the bound measured
on the H100/H200 (scores at 67-72 % of the bf16 peak, the fp8 kernel 1.38x rather than ~2x).
Triton's pipeliner only makes a wgmma asynchronous when its result is a loop-carried accumulator,
which these per-tile results are not. Here (Gluon) tile i's wgmma is issued asynchronously and
tile i-1's epilogue runs while it computes (`warpgroup_mma_wait(1)`: two accumulators live).

    prologue   keys: cp.async tiles 0 .. STAGES-2 into a STAGES-slot ring; wgmma(tile 0)
    tile i     wait for tile i's keys; barrier (every warp has retired wgmma(i-2));
               refill slot (i-2) % STAGES with tile i+STAGES-2; wgmma(tile i) async;
               wait until only wgmma(i) is outstanding; epilogue(tile i-1)
    after      wait for the last wgmma; epilogue(last tile)

Tiles are the Triton kernel's (the shared `_indexer_tiles.tile_plan`): computed tiles
[first_computed, n_computed) of this program's key split, "open" ones stored without masks, the rest of
the split filled with -inf.
Not covered here (the Triton kernel runs them): decode (few queries), fp32 inputs, head-major
rows, keys or queries whose last dim is not contiguous or whose strides are not multiples of 16
elements, non-Hopper GPUs, and the CPU interpreter (Gluon has none): `wgmma_scores_supported`.
The sm_90 code generation is checked on the CPU (tests/kernels/test_indexer_scores_wgmma.py).
"""
from __future__ import annotations

import torch

from ._indexer_tiles import tile_plan
from ._triton_utils import HAS_TRITON, cdiv, interpreting, next_pow2

try:  # Gluon (Triton's explicit-layout dialect) ships with triton >= 3.4
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    # renamed after triton 3.6 (the GPU box's version); the newest pip resolves (CI) has the new names
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    HAS_GLUON = HAS_TRITON
except (ImportError, AttributeError):  # pragma: no cover - a triton without (this) Gluon: the Triton kernel runs
    HAS_GLUON = False

WGMMA_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
_CONFIG = {"rows": 256, "BLOCK_T": 64, "num_warps": 8, "STAGES": 4, "OVERLAP": True}  # rows = BLOCK_S * H_PAD


def _epilogue(acc, w_cols, ks_ptr, b, t, t_ok, s_loc, s_ok, last_key, row_lo, row_hi, mask_ptr, s_glob,
              out_ptr, so_b, so_s, so_t, sks_b, sks_t, sm_b, sm_s, sm_t, t_hi, is_open,
              BLOCK_T: gl.constexpr, BLOCK_S: gl.constexpr, H_PAD: gl.constexpr, store_l: gl.constexpr,
              CAUSAL: gl.constexpr, HAS_MASK: gl.constexpr, HAS_RANGE: gl.constexpr, KSCALE: gl.constexpr):
    """acc [BLOCK_T, BLOCK_S*H_PAD] fp32 logits of one key tile -> masked scores stored at out[b, s, t]."""
    weighted = gl.maximum(acc, 0.0) * w_cols[None, :]
    scores = gl.sum(gl.reshape(weighted, [BLOCK_T, BLOCK_S, H_PAD]), axis=2)  # [BLOCK_T, BLOCK_S]
    scores = gl.convert_layout(scores, store_l)
    if KSCALE:
        k_scale = gl.load(ks_ptr + b * sks_b + t.to(gl.int64) * sks_t, mask=t_ok, other=0.0)
        scores = scores * k_scale[:, None]
    ptrs = out_ptr + b * so_b + s_loc[None, :].to(gl.int64) * so_s + t[:, None] * so_t
    if is_open:
        gl.store(ptrs, scores)
    else:
        allowed = t_ok[:, None] & s_ok[None, :]
        if CAUSAL:
            allowed = allowed & (t[:, None] <= last_key[None, :])
        if HAS_MASK:
            m = gl.load(mask_ptr + b * sm_b + s_glob[None, :] * sm_s + t[:, None].to(gl.int64) * sm_t,
                        mask=allowed, other=0)
            allowed = allowed & (m != 0)
        if HAS_RANGE:
            allowed = allowed & (t[:, None] >= row_lo[None, :]) & (t[:, None] <= row_hi[None, :])
        scores = gl.where(allowed, scores, float("-inf"))
        gl.store(ptrs, scores, mask=s_ok[None, :] & (t[:, None] < t_hi))


def _load_keys(slot, k_ptr, b, sk_b, sk_t, t_lo, tile, T, t_rows, d_cols, D, n_computed, BLOCK_T: gl.constexpr):
    """cp.async key tile `tile` ([BLOCK_T, D_PAD]) into ring slot `slot` (nothing past n_computed) + commit."""
    t = t_lo + tile * BLOCK_T + t_rows
    ok = (t < T) & (tile < n_computed)
    _async_load(slot, k_ptr + b * sk_b + t[:, None].to(gl.int64) * sk_t + d_cols[None, :],
                mask=ok[:, None] & (d_cols[None, :] < D))
    async_copy.commit_group()


def _indexer_scores_wgmma_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, mask_ptr, range_ptr, out_ptr,
    S, T, H, D,  # q [B,S,H,D], k [B,T,D] (last dims contiguous), w [B,S,H] fp32, ks [B,T] fp32
    row_start, n_rows, width,
    sq_b, sq_s, sq_h, sk_b, sk_t, sw_b, sw_s, sw_h, sks_b, sks_t, sm_b, sm_s, sm_t, sr_b, sr_s, sr_c,
    so_b, so_s, so_t,
    BLOCK_S: gl.constexpr, H_PAD: gl.constexpr, D_PAD: gl.constexpr, BLOCK_T: gl.constexpr,
    STAGES: gl.constexpr, SWIZZLE: gl.constexpr,
    OVERLAP: gl.constexpr,  # False: wait for each wgmma at once (the Triton kernel's order; A/Bs, bisecting)
    CAUSAL: gl.constexpr, HAS_MASK: gl.constexpr, HAS_RANGE: gl.constexpr, KSCALE: gl.constexpr,
    num_warps: gl.constexpr,
):
    R: gl.constexpr = BLOCK_S * H_PAD
    IN_FLIGHT: gl.constexpr = 1 if OVERLAP else 0  # wgmmas left running during an epilogue
    WARPS_N: gl.constexpr = num_warps // 4
    BITS: gl.constexpr = q_ptr.dtype.element_ty.primitive_bitwidth
    VEC: gl.constexpr = 128 // BITS  # 16-byte cp.async / load vectors
    THREADS_D: gl.constexpr = D_PAD // VEC if D_PAD // VEC < 32 else 32
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WARPS_N],
                                                    instr_shape=[16, R // WARPS_N, 256 // BITS])
    load_l: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // THREADS_D, THREADS_D], [num_warps, 1], [1, 0])
    smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SWIZZLE, element_bitwidth=BITS, rank=2)
    WARPS_S: gl.constexpr = num_warps if num_warps < BLOCK_S else BLOCK_S
    store_l: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [num_warps // WARPS_S, WARPS_S], [0, 1])

    pid_s = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    split = gl.program_id(2)
    num_splits = gl.num_programs(2)

    # q block [R, D_PAD] (rows r = s_local * H_PAD + h) into shared memory once; w along acc's columns.
    r = gl.arange(0, R, layout=gl.SliceLayout(1, load_l))
    d = gl.arange(0, D_PAD, layout=gl.SliceLayout(0, load_l))
    r_s = pid_s * BLOCK_S + r // H_PAD
    r_h = r % H_PAD
    q_rows = q_ptr + b * sq_b + (row_start + r_s).to(gl.int64) * sq_s + r_h * sq_h
    q_tile = gl.load(q_rows[:, None] + d[None, :], mask=((r_s < n_rows) & (r_h < H))[:, None] & (d[None, :] < D),
                     other=0.0)
    q_smem = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [R, D_PAD], smem_l, q_tile)
    q_t = q_smem.permute((1, 0))  # [D_PAD, R]: the dot's B operand
    c = gl.arange(0, R, layout=gl.SliceLayout(0, acc_l))
    c_s = pid_s * BLOCK_S + c // H_PAD
    c_h = c % H_PAD
    w_cols = gl.load(w_ptr + b * sw_b + (row_start + c_s).to(gl.int64) * sw_s + c_h * sw_h,
                     mask=(c_s < n_rows) & (c_h < H), other=0.0).to(gl.float32)  # [R]

    s_loc = pid_s * BLOCK_S + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(0, store_l))
    s_ok = s_loc < n_rows
    s_glob = (row_start + s_loc).to(gl.int64)
    last_key = (T - S) + s_glob
    row_lo = s_loc
    row_hi = s_loc
    if HAS_RANGE:
        range_rows = range_ptr + b * sr_b + s_glob * sr_s
        row_lo = gl.load(range_rows, mask=s_ok, other=T)
        row_count = gl.load(range_rows + 2 * sr_c, mask=s_ok, other=0)
        row_hi = gl.where(row_count > 0, gl.load(range_rows + sr_c, mask=s_ok, other=-1), -1)

    t_lo, t_hi, n_tiles, first_computed, n_computed, open_lo, open_hi = tile_plan(
        T, S, row_start, n_rows, width, pid_s, split, num_splits, s_ok, row_lo, row_hi,
        BLOCK_S, BLOCK_T, CAUSAL, HAS_MASK, HAS_RANGE)

    t_rows = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, load_l))
    t_store = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, store_l))
    ring = gl.allocate_shared_memory(k_ptr.dtype.element_ty, [STAGES, BLOCK_T, D_PAD], smem_l)
    if first_computed < n_computed:
        for pre in gl.static_range(STAGES - 1):
            _load_keys(ring.index(pre), k_ptr, b, sk_b, sk_t, t_lo, first_computed + pre, T, t_rows, d, D, n_computed,
                       BLOCK_T)
        async_copy.wait_group(STAGES - 2)
        fence_async_shared()
        _cta_barrier()
        zero = gl.zeros([BLOCK_T, R], gl.float32, acc_l)
        acc = warpgroup_mma(ring.index(0), q_t, zero, use_acc=False, is_async=True)
        for i in range(first_computed + 1, n_computed):
            j = i - first_computed  # ring position of tile i
            async_copy.wait_group(STAGES - 3)  # tile i's keys have landed
            fence_async_shared()
            _cta_barrier()  # ... and every warp has retired wgmma(i-2), whose slot is refilled next
            _load_keys(ring.index((j + STAGES - 2) % STAGES), k_ptr, b, sk_b, sk_t, t_lo, i + STAGES - 2, T,
                       t_rows, d, D, n_computed, BLOCK_T)
            acc_next = warpgroup_mma(ring.index(j % STAGES), q_t, zero, use_acc=False, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc,))
            t = t_lo + (i - 1) * BLOCK_T + t_store
            _epilogue(acc, w_cols, ks_ptr, b, t, t < T, s_loc, s_ok, last_key, row_lo, row_hi, mask_ptr, s_glob,
                      out_ptr, so_b, so_s, so_t, sks_b, sks_t, sm_b, sm_s, sm_t, t_hi,
                      (i - 1 >= open_lo) & (i - 1 < open_hi),
                      BLOCK_T, BLOCK_S, H_PAD, store_l, CAUSAL, HAS_MASK, HAS_RANGE, KSCALE)
            acc = acc_next
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        async_copy.wait_group(0)
        t = t_lo + (n_computed - 1) * BLOCK_T + t_store
        _epilogue(acc, w_cols, ks_ptr, b, t, t < T, s_loc, s_ok, last_key, row_lo, row_hi, mask_ptr, s_glob,
                  out_ptr, so_b, so_s, so_t, sks_b, sks_t, sm_b, sm_s, sm_t, t_hi,
                  (n_computed - 1 >= open_lo) & (n_computed - 1 < open_hi),
                  BLOCK_T, BLOCK_S, H_PAD, store_l, CAUSAL, HAS_MASK, HAS_RANGE, KSCALE)
    neg_inf = gl.full([BLOCK_T, BLOCK_S], float("-inf"), gl.float32, store_l)
    out_rows = out_ptr + b * so_b + s_loc[None, :].to(gl.int64) * so_s
    for i in range(0, first_computed):
        t = t_lo + i * BLOCK_T + t_store
        gl.store(out_rows + t[:, None] * so_t, neg_inf, mask=s_ok[None, :] & (t[:, None] < t_hi))
    for i in range(n_computed, n_tiles):
        t = t_lo + i * BLOCK_T + t_store
        gl.store(out_rows + t[:, None] * so_t, neg_inf, mask=s_ok[None, :] & (t[:, None] < t_hi))


if HAS_GLUON:
    _epilogue = gluon.jit(_epilogue)
    _load_keys = gluon.jit(_load_keys)
    _indexer_scores_wgmma_kernel = gluon.jit(_indexer_scores_wgmma_kernel)


def wgmma_scores_supported(q: torch.Tensor, k: torch.Tensor, decode: bool) -> bool:
    """Whether `launch_wgmma_scores` takes these inputs (else the Triton kernel does)."""
    if not (HAS_GLUON and q.is_cuda and not decode and not interpreting(q)
            and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    H, D = q.shape[-2:]
    aligned = all(x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(s % 16 == 0 for s in x.stride()[:-1])
                  for x in (q, k))
    return (q.dtype in WGMMA_DTYPES and k.dtype == q.dtype and aligned and D == _d_pad(D)
            and D * q.element_size() % 32 == 0 and next_pow2(H) <= _CONFIG["rows"])  # one query's heads per dot


def _d_pad(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def launch_wgmma_scores(q, k, w, ks, mask_u8, ranges, out, row_start, n_rows, width, h_pad: int, causal: bool,
                        has_mask: bool, has_range: bool, num_splits: int | None, splits_for) -> None:
    """The scores of indexer_topk.indexer_scores (prefill form) through the Gluon kernel: its
    arguments (mask_u8 / ranges: placeholders unless has_mask / has_range); ks: fp32 [B,T] key
    scales or None; splits_for(programs, block_t): the key splits when num_splits is None."""
    B, S, H, D = q.shape
    T = k.shape[1]
    block_s = max(1, _CONFIG["rows"] // h_pad)
    ks_arg = ks if ks is not None else w
    ks_strides = ks.stride() if ks is not None else (0, 0)
    prog_rows = cdiv(n_rows, block_s)
    splits = num_splits or splits_for(B * prog_rows, _CONFIG["BLOCK_T"])
    row_bytes = D * q.element_size()
    swizzle = 128 if row_bytes % 128 == 0 else 64 if row_bytes % 64 == 0 else 32
    _indexer_scores_wgmma_kernel[(prog_rows, B, splits)](
        q, k, w, ks_arg, mask_u8, ranges, out, S, T, H, D, row_start, n_rows, width,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), *w.stride(), *ks_strides,
        *mask_u8.stride(), *ranges.stride(), *out.stride(),
        BLOCK_S=block_s, H_PAD=h_pad, D_PAD=_d_pad(D), BLOCK_T=_CONFIG["BLOCK_T"], STAGES=_CONFIG["STAGES"], OVERLAP=_CONFIG["OVERLAP"],
        SWIZZLE=swizzle, CAUSAL=causal, HAS_MASK=has_mask, HAS_RANGE=has_range, KSCALE=ks is not None,
        num_warps=_CONFIG["num_warps"])


__all__ = ["HAS_GLUON", "launch_wgmma_scores", "wgmma_scores_supported"]
