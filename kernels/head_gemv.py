"""A GEMV per head for a few tokens, all heads in one launch (absorbed MLA at decode).

Semantics: x [T,H,K]; w [H,N,K] (each head's rows, unit stride along K) -> y [T,H,N],
y[t,h,n] = sum_k w[h,n,k] x[t,h,k]; with transposed=True w [H,K,N] (unit stride along N) and
y[t,h,n] = sum_k w[h,k,n] x[t,h,k]. Sums in fp32, rounded once to x's dtype (y fresh, contiguous).

Why: absorbed MLA multiplies each head's query by its slice of kv_b before attending over the latent
rows (q_nope [H,dn] by W_UK[h] [dn,Dl]: the transposed form) and each head's latent output by another
slice after (o [H,Dl] by W_UV[h] [dv,Dl]: the row form). At one decode token cuBLAS runs these as
batched GEMMs with M = 1 (GLM-4.7-Flash, H100: 4.2 and 3.8 us for 3.9 and 5.2 MB, 31 % and 46 % of
copy bandwidth, docs/benchmarks.md); they are GEMVs, streamed here like kernels/multi_linear.py.

Kernel: program (head h, block of BLOCK_N outputs) streams its [BLOCK_N, BLOCK_K] (row form) or
[BLOCK_K, BLOCK_N] (transposed form) weight tiles over K into a fp32 accumulator per token with the
tile's shape (one reduction at the end), software-pipelined (tl.range num_stages: cp.async); the tile's
unit-stride axis is the weight's, so every load is a run of contiguous elements.

Reference: `reference.head_gemv_ref`.
"""
from __future__ import annotations

import torch

from ._triton_utils import (HAS_TRITON, cdiv, interpreting, jit_helper, launch_interpreted, new_output, next_pow2,
                            num_sms, tl, triton, use_triton_for)
from .reference import head_gemv_ref

MAX_TOKENS = 4  # rows of x: a decode step (the accumulator holds one tile per token)
# as kernels/multi_linear.py: a program loads TILE_ELEMS weight elements a step, divided over the
# tokens' accumulators; output blocks as wide as still give PROGRAMS_PER_SM programs per SM
TILE_ELEMS = 4096
ROW_BLOCKS = (16, 8, 4)  # row form: outputs are weight rows
COLUMN_BLOCKS = (64, 32, 16)  # transposed form: outputs are contiguous columns (wider: longer runs)
PROGRAMS_PER_SM = 2
STAGES = 3


@jit_helper
def _tile_sum(acc, TRANSPOSED: tl.constexpr):
    """[T_PAD, BLOCK_N, BLOCK_K] or [T_PAD, BLOCK_K, BLOCK_N] accumulator -> [T_PAD, BLOCK_N]."""
    return tl.sum(acc, axis=1) if TRANSPOSED else tl.sum(acc, axis=2)


def _head_gemv_kernel(
    x_ptr, w_ptr, y_ptr, T, H, N, K,
    sx_t, sx_h,  # x [T, H, K], unit stride along K
    sw_h, sw_other,  # w's head stride and the stride of its non-unit axis (rows n, or k when transposed)
    T_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr,
    STAGES: tl.constexpr,
):
    """y[t, h, n-block] for this program's head and block of outputs (y [T, H, N] contiguous)."""
    h = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = n < N
    t = tl.arange(0, T_PAD)
    t_ok = t < T
    w_head = w_ptr + h.to(tl.int64) * sw_h
    x_rows = x_ptr + t[:, None] * sx_t + h * sx_h  # [T_PAD, 1]
    if TRANSPOSED:
        acc = tl.zeros((T_PAD, BLOCK_K, BLOCK_N), tl.float32)
    else:
        acc = tl.zeros((T_PAD, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if TRANSPOSED:  # w[h, k, n]: tile [BLOCK_K, BLOCK_N], unit stride along n
            w = tl.load(w_head + k.to(tl.int64)[:, None] * sw_other + n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += w.to(tl.float32)[None, :, :] * x[:, :, None]
        else:  # w[h, n, k]: tile [BLOCK_N, BLOCK_K], unit stride along k
            w = tl.load(w_head + n.to(tl.int64)[:, None] * sw_other + k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += w.to(tl.float32)[None, :, :] * x[:, None, :]
    y = _tile_sum(acc, TRANSPOSED)  # [T_PAD, BLOCK_N]
    tl.store(y_ptr + (t[:, None] * H + h) * N + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & n_ok[None, :])


if HAS_TRITON:
    _head_gemv_kernel_jit = triton.jit(_head_gemv_kernel)


def default_tile(T: int, H: int, N: int, K: int, transposed: bool, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for T tokens, H heads of N outputs over K."""
    target = PROGRAMS_PER_SM * num_sms(device)
    blocks = COLUMN_BLOCKS if transposed else ROW_BLOCKS
    block_n = next((bn for bn in blocks if H * cdiv(N, bn) >= target), blocks[-1])
    return block_n, min(max(16, TILE_ELEMS // (block_n * next_pow2(max(T, 1)))), max(16, next_pow2(K)))


def _check(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> tuple[int, int, int, int]:
    """-> (T, H, N, K), or ValueError saying what is wrong."""
    if x.dim() != 3 or w.dim() != 3:
        raise ValueError(f"head_gemv: x must be [T,H,K] and w [H,N,K] (or [H,K,N] transposed); got x "
                         f"{tuple(x.shape)}, w {tuple(w.shape)}")
    T, H, K = x.shape
    N = w.shape[2] if transposed else w.shape[1]
    if w.shape[0] != H or (w.shape[1] if transposed else w.shape[2]) != K:
        form = "[H,K,N]" if transposed else "[H,N,K]"
        raise ValueError(f"head_gemv: w {tuple(w.shape)} is not {form} for x {tuple(x.shape)} (H={H}, K={K})")
    if w.dtype != x.dtype:
        raise ValueError(f"head_gemv: w must be in x's dtype {x.dtype}, got {w.dtype}")
    return T, H, N, K


def head_gemv_triton(x: torch.Tensor, w: torch.Tensor, transposed: bool = False,
                     tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Triton path (CPU tensors run in the Triton interpreter) -> y [T,H,N] in x's dtype.
    tile: (BLOCK_N, BLOCK_K) instead of default_tile."""
    T, H, N, K = _check(x, w, transposed)
    if T > MAX_TOKENS:
        raise ValueError(f"head_gemv: {T} rows; the kernel is for at most {MAX_TOKENS} (decode)")
    unit = w.stride(2)
    if x.stride(2) != 1 or unit != 1:
        raise ValueError("head_gemv: x and w need unit stride along their last axis (call .contiguous())")
    y = new_output((T, H, N), x.dtype, x.device)
    if T == 0 or H == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    block_n, block_k = tile or default_tile(T, H, N, K, transposed, x.device)
    args = (x, w, y, T, H, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1))
    grid = (H, cdiv(N, block_n))
    meta = dict(T_PAD=next_pow2(max(T, 1)), BLOCK_N=block_n, BLOCK_K=block_k, TRANSPOSED=bool(transposed),
                STAGES=STAGES)
    if interpreting(x):
        launch_interpreted(_head_gemv_kernel, grid, *args, **meta)
    else:
        _head_gemv_kernel_jit[grid](*args, **meta, num_warps=4)
    return y


def head_gemv(x: torch.Tensor, w: torch.Tensor, transposed: bool = False,
              use_triton: bool | None = None) -> torch.Tensor:
    """x [T,H,K], w [H,N,K] ([H,K,N] transposed) -> y [T,H,N] (see the module docstring).
    use_triton: see indexer_topk."""
    if use_triton_for(x, use_triton) and x.dim() == 3 and x.shape[0] <= MAX_TOKENS:
        return head_gemv_triton(x, w, transposed)
    _check(x, w, transposed)
    return head_gemv_ref(x, w, transposed)


__all__ = ["head_gemv", "head_gemv_triton", "default_tile", "MAX_TOKENS"]
