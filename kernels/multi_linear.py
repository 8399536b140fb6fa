"""Several linears of one few-token input in one launch (decode): y = x @ [W_0; W_1; ...]^T.

Semantics: x [T,K], weights W_i [N_i,K] (nn.Linear weights, no bias, all in x's dtype, or all bf16 /
fp16 with an fp32 x, read and upcast: a linear on W.float(), as HF's routers compute their logits) ->
[y_i], y_i = x @ W_i^T [T,N_i] in x's dtype (fresh contiguous tensors), each dot product summed in
fp32 and rounded once.

Why: at one decode token a projection is a GEMV, and a small one costs a launch more than its weight
reads: GLM-4.7-Flash's q_a (768 x 2048, 3.1 MB) takes ~4.8 us in cuBLAS where its bytes take ~1 us,
and the graph adds ~1.5 us of gap per kernel. A DSA layer has siblings that read the same input:
q_a, kv_a and (F layers) the indexer's wk read the normed hidden state (HF keeps the indexer's
weights_proj in fp32, on an fp32 copy: not a sibling); q_b and the indexer's wq_b read the normed
q_a. One launch reads them all (passes/lower_decode_linears.py, which also gives a lone one-token
GEMV to this op: one launch where cuBLAS takes one or two).

The kernel is the experts op's GEMV (kernels/moe_experts.py): program (row block) of one weight
streams its [BLOCK_N, BLOCK_K] tiles over K into a fp32 [T_PAD, BLOCK_N, BLOCK_K] accumulator per
token (one reduction at the end), software-pipelined (tl.range num_stages: cp.async). The programs of
all weights form one grid: program p belongs to weight i when BLOCK_START_i <= p < BLOCK_START_{i+1};
its weight and output pointers, row count and row stride are picked by that index (up to
MAX_WEIGHTS weights per launch; more are launched in groups). Weights need unit stride along K.

Reference: `reference.multi_linear_ref`.
"""
from __future__ import annotations

import torch

from ._triton_utils import (HAS_TRITON, cdiv, interpreting, jit_helper, launch_interpreted, let_next_kernel_launch,
                            line_elems, new_output, next_pow2, num_sms, pdl_launch, prefetch_rows_to_l2, tl, triton,
                            use_triton_for, wait_for_previous_kernel)
from .reference import multi_linear_ref

MAX_WEIGHTS = 4
MAX_TOKENS = 4  # rows of x: a decode step (the accumulator holds one row block per token)
# per step a program loads TILE_ELEMS weight elements (as the experts GEMV: four 16-byte loads per
# thread at 4 warps in bf16), divided over the tokens' accumulators; row blocks as tall as still
# give PROGRAMS_PER_SM programs per SM.
TILE_ELEMS = 4096
ROW_BLOCKS = (16, 8, 4)
PROGRAMS_PER_SM = 2
STAGES = 3


@jit_helper
def _pick(index, v0, v1, v2, v3):
    """v_index for index in 0..3 (scalars or pointers)."""
    return tl.where(index == 0, v0, tl.where(index == 1, v1, tl.where(index == 2, v2, v3)))


def _multi_linear_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, y0_ptr, y1_ptr, y2_ptr, y3_ptr,
    T, K,
    N0, N1, N2, N3,  # rows of each weight (0: no such weight)
    S1, S2, S3,  # first program of weights 1..3
    sw0, sw1, sw2, sw3,  # row strides of the weights (unit stride along K)
    sx_t,  # x [T, K] row stride (unit stride along K); y_i [T, N_i] contiguous
    T_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, LINE_ELEMS: tl.constexpr = 64,
):
    """y_i[t, n] = x[t] . W_i[n] for this program's row block of weight i. PDL: launched early (see
    _triton_utils.pdl): the block's weight rows are prefetched into L2 before x, the kernel before's
    output, can be read."""
    pid = tl.program_id(0)
    i = (pid >= S1).to(tl.int32) + (pid >= S2).to(tl.int32) + (pid >= S3).to(tl.int32)
    w_ptr = _pick(i, w0_ptr, w1_ptr, w2_ptr, w3_ptr)
    rows = _pick(i, N0, N1, N2, N3)
    n = (pid - _pick(i, 0, S1, S2, S3)) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of W_i
    n_ok = n < rows
    row_stride = _pick(i, sw0, sw1, sw2, sw3)
    w_rows = w_ptr + n.to(tl.int64) * row_stride
    if PREFETCH:  # (rows past N: row N - 1 again)
        prefetch_rows_to_l2(w_ptr + tl.minimum(n, rows - 1).to(tl.int64) * row_stride, K, LINE_ELEMS, 16)
    wait_for_previous_kernel(PDL)
    t = tl.arange(0, T_PAD)
    t_ok = t < T
    acc = tl.zeros((T_PAD, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < K
        x = tl.load(x_ptr + t[:, None] * sx_t + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows[:, None] + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    let_next_kernel_launch(PDL)
    y = tl.sum(acc, axis=2)  # [T_PAD, BLOCK_N]
    y_ptr = _pick(i, y0_ptr, y1_ptr, y2_ptr, y3_ptr)
    tl.store(y_ptr + t[:, None] * rows + n[None, :], y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


if HAS_TRITON:
    _multi_linear_kernel_jit = triton.jit(_multi_linear_kernel)


def default_tile(T: int, rows: int, K: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for T tokens over weights of `rows` rows in all."""
    target = PROGRAMS_PER_SM * num_sms(device)
    block_n = next((bn for bn in ROW_BLOCKS if cdiv(rows, bn) >= target), ROW_BLOCKS[-1])
    t_pad = next_pow2(max(T, 1))
    return block_n, min(max(16, TILE_ELEMS // (block_n * t_pad)), max(16, next_pow2(K)))


def _check(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    if x.dim() != 2 or not weights:
        raise ValueError(f"multi_linear: x must be [T,K] and at least one weight given (x {tuple(x.shape)}, "
                         f"{len(weights)} weights)")
    K = x.shape[1]
    bad = [tuple(w.shape) for w in weights if w.dim() != 2 or w.shape[1] != K]
    if bad:
        raise ValueError(f"multi_linear: weights {bad} are not [N,{K}] (nn.Linear weights of x's width {K})")
    dtypes = {w.dtype for w in weights}
    (dtype,) = dtypes if len(dtypes) == 1 else (None,)
    if dtype != x.dtype and not (x.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)):
        raise ValueError(f"multi_linear: the weights must share one dtype, x's ({x.dtype}) or, with an fp32 x, "
                         f"bf16/fp16 (read and upcast); got {[w.dtype for w in weights]}")


def multi_linear_triton(x: torch.Tensor, weights: list[torch.Tensor],
                        tile: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Triton path (CPU tensors run in the Triton interpreter) -> [x @ W_i^T] in x's dtype.
    tile: (BLOCK_N, BLOCK_K) instead of default_tile."""
    _check(x, weights)
    if x.shape[0] > MAX_TOKENS:
        raise ValueError(f"multi_linear: {x.shape[0]} rows; the kernel is for at most {MAX_TOKENS} (decode)")
    if x.stride(1) != 1 or any(w.stride(1) != 1 for w in weights):
        raise ValueError("multi_linear: x and the weights need unit stride along K (call .contiguous())")
    outs = [new_output((x.shape[0], w.shape[0]), x.dtype, x.device) for w in weights]
    if x.shape[0] == 0:
        return outs
    if x.shape[1] == 0:
        return [y.zero_() for y in outs]
    for first in range(0, len(weights), MAX_WEIGHTS):
        _launch_group(x, weights[first:first + MAX_WEIGHTS], outs[first:first + MAX_WEIGHTS], tile)
    return outs


def _launch_group(x: torch.Tensor, group: list[torch.Tensor], outs: list[torch.Tensor], tile) -> None:
    T, K = x.shape
    rows = [w.shape[0] for w in group]
    block_n, block_k = tile or default_tile(T, sum(rows), K, x.device)
    blocks = [cdiv(r, block_n) for r in rows]
    starts = [sum(blocks[:j]) for j in range(1, MAX_WEIGHTS)]  # weights past the group start at the end
    pad = MAX_WEIGHTS - len(group)
    weights, ys = [*group, *[group[0]] * pad], [*outs, *[outs[0]] * pad]
    args = (x, *weights, *ys, T, K, *rows, *[0] * pad, *starts, *(w.stride(0) for w in weights), x.stride(0))
    grid = (sum(blocks),)
    meta = dict(T_PAD=next_pow2(max(T, 1)), BLOCK_N=block_n, BLOCK_K=block_k, STAGES=STAGES)
    if interpreting(x):
        launch_interpreted(_multi_linear_kernel, grid, *args, **meta)
    else:
        _multi_linear_kernel_jit[grid](*args, **meta, **pdl_launch(x.device, prefetch=True), LINE_ELEMS=line_elems(group[0]),
                                       num_warps=4)


def multi_linear(x: torch.Tensor, weights: list[torch.Tensor], use_triton: bool | None = None) -> list[torch.Tensor]:
    """x [T,K], weights [N_i,K] -> [x @ W_i^T] (see the module docstring). use_triton: see indexer_topk."""
    if use_triton_for(x, use_triton) and x.shape[0] <= MAX_TOKENS:
        return multi_linear_triton(x, weights)
    _check(x, weights)
    return multi_linear_ref(x, weights)


__all__ = ["multi_linear", "multi_linear_triton", "default_tile", "MAX_TOKENS", "MAX_WEIGHTS"]
