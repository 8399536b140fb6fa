"""A linear per head for a few tokens, all heads in one launch (absorbed MLA at decode): y = x W^T per head.

Semantics: x [T,H,K] (unit stride along K, any T / H strides), weight [H,N,K] (any strides, in x's
dtype: bf16, fp16 or fp32) -> y [T,H,N], y[t,h,n] = sum_k x[t,h,k] * weight[h,n,k], in x's dtype (a
fresh contiguous tensor), each dot product summed in fp32 and rounded once.

Why: absorbed MLA (passes/lower_sparse_attention.py `_absorbed_mla`) multiplies each head's query by
its slice of kv_b_proj before attending over the latent rows, q_nope [T,H,dn] x W[:, :dn] -> [T,H,Dl]
(weight = W[:, :dn].transpose(1, 2): [H,Dl,dn], unit stride along N), and each head's latent output
by another slice after, out_latent [T,H,Dl] x W[:, dn:] -> [T,H,dv] (weight [H,dv,Dl], unit stride
along K), W = kv_b_proj.weight.view(H, dn+dv, Dl). At one decode token cuBLAS runs them as batched
GEMMs of M = 1: GLM-4.7-Flash (H=20, dn=192, dv=256, Dl=512, bf16) on an H100 4.3 + 3.8 us for
3.9 + 5.2 MB of weights, which take ~2.7 us at copy bandwidth.

The kernel is multi_linear's GEMV (kernels/multi_linear.py) with a head axis: program (head h, block
of BLOCK_N outputs) streams its [BLOCK_N, BLOCK_K] tiles of weight[h] over K into a fp32
[T_PAD, BLOCK_N, BLOCK_K] accumulator per token (one reduction at the end), software-pipelined
(tl.range num_stages: cp.async). The weight is read through its three strides: the JIT specialises an
integer argument equal to 1, so the unit-stride axis (K or N) is known to the coalescing pass and the
tile loads are 16-byte runs along it either way (no copy of the transposed slice).

Reference: `reference.head_linear_ref`.
"""
from __future__ import annotations

import torch

from ._triton_utils import (HAS_TRITON, cdiv, interpreting, launch_interpreted, new_output, next_pow2, num_sms, tl,
                            triton, use_triton_for)
from .multi_linear import MAX_TOKENS  # rows of x: a decode step (the accumulator holds one tile per token)
from .reference import head_linear_ref

# as multi_linear: a program loads TILE_ELEMS weight elements a step, divided over the tokens'
# accumulators; output blocks as wide as still give PROGRAMS_PER_SM programs per SM
TILE_ELEMS = 4096
ROW_BLOCKS = (16, 8, 4)  # weight unit-stride along K: an output is a row (a run of K elements)
COLUMN_BLOCKS = (64, 32, 16)  # along N: an output block is a run of columns, wider for longer runs
PROGRAMS_PER_SM = 2
STAGES = 3
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _head_linear_kernel(
    x_ptr, w_ptr, y_ptr, T, H, N, K,
    sx_t, sx_h,  # x [T, H, K], unit stride along K
    sw_h, sw_n, sw_k,  # weight [H, N, K], any strides (a 1 is specialised: the axis the loads run along)
    T_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """y[t, h, n] = x[t, h] . weight[h, n] for this program's head and block of outputs (y [T, H, N]
    contiguous)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    h = tl.program_id(1)
    n_ok = n < N
    t = tl.arange(0, T_PAD)
    t_ok = t < T
    w_rows = w_ptr + h.to(tl.int64) * sw_h + n.to(tl.int64) * sw_n  # [BLOCK_N]
    x_rows = x_ptr + t * sx_t + h * sx_h  # [T_PAD]
    acc = tl.zeros((T_PAD, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < K
        x = tl.load(x_rows[:, None] + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows[:, None] + k.to(tl.int64)[None, :] * sw_k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)  # [T_PAD, BLOCK_N]
    tl.store(y_ptr + (t[:, None] * H + h) * N + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & n_ok[None, :])


if HAS_TRITON:
    _head_linear_kernel_jit = triton.jit(_head_linear_kernel)


def default_tile(T: int, H: int, N: int, K: int, n_unit: bool, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for T tokens over H heads of N outputs of width K; n_unit: the weight's unit
    stride is along N (the tile's runs are then its BLOCK_N columns)."""
    target = PROGRAMS_PER_SM * num_sms(device)
    blocks = COLUMN_BLOCKS if n_unit else ROW_BLOCKS
    block_n = next((bn for bn in blocks if H * cdiv(N, bn) >= target), blocks[-1])
    return block_n, min(max(16, TILE_ELEMS // (block_n * next_pow2(max(T, 1)))), max(16, next_pow2(K)))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"head_linear: x must be [T,H,K] and weight [H,N,K]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] != x.shape[1] or weight.shape[2] != x.shape[2]:
        raise ValueError(f"head_linear: weight {tuple(weight.shape)} is not [H,N,K] for x {tuple(x.shape)} "
                         f"(H={x.shape[1]}, K={x.shape[2]}; a [H,K,N] weight is passed as weight.transpose(1, 2))")
    if weight.dtype != x.dtype or x.dtype not in DTYPES:
        raise ValueError(f"head_linear: x and weight must share one dtype among bf16 / fp16 / fp32; got x {x.dtype}, "
                         f"weight {weight.dtype} (cast both to one of those)")


def head_linear_triton(x: torch.Tensor, weight: torch.Tensor,
                       tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Triton path (CPU tensors run in the Triton interpreter) -> y [T,H,N] in x's dtype.
    tile: (BLOCK_N, BLOCK_K) instead of default_tile."""
    _check(x, weight)
    T, H, K = x.shape
    N = weight.shape[1]
    if T > MAX_TOKENS:
        raise ValueError(f"head_linear: {T} rows; the kernel is for at most {MAX_TOKENS} (decode)")
    if x.stride(2) != 1 and K > 1:
        raise ValueError(f"head_linear: x needs unit stride along K, got strides {tuple(x.stride())} (call "
                         ".contiguous())")
    y = new_output((T, H, N), x.dtype, x.device)
    if y.numel() == 0:
        return y
    if K == 0:
        return y.zero_()
    n_unit = weight.stride(1) == 1 and weight.stride(2) != 1
    block_n, block_k = tile or default_tile(T, H, N, K, n_unit, x.device)
    args = (x, weight, y, T, H, N, K, x.stride(0), x.stride(1), *weight.stride())
    grid = (cdiv(N, block_n), H)
    meta = dict(T_PAD=next_pow2(max(T, 1)), BLOCK_N=block_n, BLOCK_K=block_k, STAGES=STAGES)
    if interpreting(x):
        launch_interpreted(_head_linear_kernel, grid, *args, **meta)
    else:
        _head_linear_kernel_jit[grid](*args, **meta, num_warps=4)
    return y


def head_linear(x: torch.Tensor, weight: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """x [T,H,K], weight [H,N,K] -> y [T,H,N], a linear per head (see the module docstring).
    use_triton: see indexer_topk; more than MAX_TOKENS rows run the reference."""
    if use_triton_for(x, use_triton) and x.dim() == 3 and x.shape[0] <= MAX_TOKENS:
        return head_linear_triton(x, weight)
    _check(x, weight)
    return head_linear_ref(x, weight)


__all__ = ["head_linear", "head_linear_triton", "default_tile", "MAX_TOKENS"]
