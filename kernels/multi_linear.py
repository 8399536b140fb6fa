"""Several linears of one few-token input in one launch (decode): y = x @ [W_0; W_1; ...]^T.

Semantics: x [T,K], weights W_i [N_i,K] (nn.Linear weights, no bias, all in x's dtype, or all bf16 /
fp16 with an fp32 x, read and upcast: a linear on W.float(), as HF's routers compute their logits; or
all fp32 with a bf16 / fp16 x and out_dtype fp32: x upcast, as GLM's router whose weight HF keeps fp32) ->
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

RMSNorm prologue (norm_weight given): x is first replaced by RMSNorm(x [+ residual]) in x's dtype,
rounded as the model's code rounds (kernels/reference.rms_norm_ref). At one token the norm is a
launch of its own that reads 4 KB (an Inductor reduction ~1.5 us plus its gap); folded in here, each
program re-reads its tokens' rows from L2 to get rstd. With the residual, the add that made the
layer's input is read as its two terms, so it needs no launch either. The model's other readers of
the normed rows (a router's experts, an indexer's fp32 weights_proj) and of the sum (the residual
stream) read side outputs that program 0 writes as it goes (write_normed, write_sum); out_dtype=fp32
serves a router whose logits are a linear of the rows upcast. passes/fold_rms_norm.py folds the
model's norms in.

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
RSTD_ONE_LOAD_ELEMS = 8192  # 64 fp32 registers a thread at 4 warps


@jit_helper
def _pick(index, v0, v1, v2, v3):
    """v_index for index in 0..3 (scalars or pointers)."""
    return tl.where(index == 0, v0, tl.where(index == 1, v1, tl.where(index == 2, v2, v3)))


def _multi_linear_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, y0_ptr, y1_ptr, y2_ptr, y3_ptr,
    r_ptr, nw_ptr, eps,  # the RMSNorm prologue's residual [T, K] (row stride sx_t) and weight [K]
    normed_ptr, sum_ptr,  # WRITE_NORMED / WRITE_SUM: [T, K] contiguous, x's dtype
    T, K,
    N0, N1, N2, N3,  # rows of each weight (0: no such weight)
    S1, S2, S3,  # first program of weights 1..3
    sw0, sw1, sw2, sw3,  # row strides of the weights (unit stride along K)
    sx_t,  # x [T, K] row stride (unit stride along K); y_i [T, N_i] contiguous
    T_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    NORM: tl.constexpr = False, RESIDUAL: tl.constexpr = False, SCALE_THEN_ROUND: tl.constexpr = False,
    K_ONE_LOAD: tl.constexpr = 0,  # NORM: rstd from one [T_PAD, K_ONE_LOAD] load (0: a loop over K)
    WRITE_NORMED: tl.constexpr = False, WRITE_SUM: tl.constexpr = False,  # NORM: program 0 also stores them
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, LINE_ELEMS: tl.constexpr = 64,
):
    """y_i[t, n] = x[t] . W_i[n] for this program's row block of weight i; NORM: x[t] is first
    RMS-normed (see _normed_rows; every program computes its tokens' rstd, an L2-resident re-read of
    x; program 0 also stores the normed rows and, with the residual, the sum, for other readers).
    PDL: launched early (see _triton_utils.pdl): the block's weight rows are prefetched into L2
    before x, the kernel before's output, can be read."""
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
    rstd = tl.zeros((T_PAD,), tl.float32)
    if NORM:
        rstd = _rstd(x_ptr, r_ptr, sx_t, t, t_ok, K, eps, BLOCK_K if K_ONE_LOAD == 0 else K_ONE_LOAD, RESIDUAL)
    acc = tl.zeros((T_PAD, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < K
        x = tl.load(x_ptr + t[:, None] * sx_t + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            h = _residual_sum(x, r_ptr, sx_t, t, t_ok, k, k_ok, RESIDUAL)
            x = _normed_rows(h, nw_ptr, k, k_ok, rstd, SCALE_THEN_ROUND)
            if pid == 0:  # one program writes the side outputs
                if WRITE_NORMED:
                    tl.store(normed_ptr + t[:, None] * K + k[None, :], x, mask=t_ok[:, None] & k_ok[None, :])
                if WRITE_SUM:
                    tl.store(sum_ptr + t[:, None] * K + k[None, :], h, mask=t_ok[:, None] & k_ok[None, :])
        w = tl.load(w_rows[:, None] + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    let_next_kernel_launch(PDL)
    y = tl.sum(acc, axis=2)  # [T_PAD, BLOCK_N]
    y_ptr = _pick(i, y0_ptr, y1_ptr, y2_ptr, y3_ptr)
    tl.store(y_ptr + t[:, None] * rows + n[None, :], y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


@jit_helper
def _residual_sum(x, r_ptr, sx_t, t, t_ok, k, k_ok, RESIDUAL: tl.constexpr):
    """h = x + residual rounded to x's dtype (a torch add of two x-dtype tensors), or x."""
    if RESIDUAL:
        r = tl.load(r_ptr + t[:, None] * sx_t + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@jit_helper
def _rstd(x_ptr, r_ptr, sx_t, t, t_ok, K, eps, BLOCK_K: tl.constexpr, RESIDUAL: tl.constexpr):
    """[T_PAD] 1 / sqrt(mean(h[t]^2) + eps), h in fp32 (h: _residual_sum), in steps of BLOCK_K (one
    step when BLOCK_K >= K: the loads of a loop would each wait for the one before)."""
    squares = tl.zeros((t.shape[0], BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + t[:, None] * sx_t + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        h = _residual_sum(x, r_ptr, sx_t, t, t_ok, k, k_ok, RESIDUAL).to(tl.float32)
        squares += h * h
    return 1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)


@jit_helper
def _normed_rows(h, nw_ptr, k, k_ok, rstd, SCALE_THEN_ROUND: tl.constexpr):
    """[T_PAD, BLOCK_K] of RMSNorm(h) in h's dtype, rounded as the model rounds: HF's
    `weight * (h32 * rstd).to(dtype)` (two roundings) or, SCALE_THEN_ROUND, `(h32 * rstd * weight)
    .to(dtype)` (F.rms_norm's one)."""
    h32 = h.to(tl.float32)
    weight = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE_THEN_ROUND:
        return (h32 * rstd[:, None] * weight).to(h.dtype)
    return (weight * (h32 * rstd[:, None]).to(h.dtype).to(tl.float32)).to(h.dtype)


if HAS_TRITON:
    _multi_linear_kernel_jit = triton.jit(_multi_linear_kernel)


def default_tile(T: int, rows: int, K: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for T tokens over weights of `rows` rows in all."""
    target = PROGRAMS_PER_SM * num_sms(device)
    block_n = next((bn for bn in ROW_BLOCKS if cdiv(rows, bn) >= target), ROW_BLOCKS[-1])
    t_pad = next_pow2(max(T, 1))
    return block_n, min(max(16, TILE_ELEMS // (block_n * t_pad)), max(16, next_pow2(K)))


def _check_norm(x: torch.Tensor, norm_weight: torch.Tensor, residual: torch.Tensor | None,
                scale_then_round: bool) -> None:
    dtype_ok = norm_weight.dtype == x.dtype or (scale_then_round and norm_weight.dtype == torch.float32)
    if norm_weight.shape != (x.shape[1],) or not dtype_ok:
        raise ValueError(f"multi_linear: the RMSNorm weight must be [{x.shape[1]}] in x's dtype {x.dtype} (or fp32 "
                         f"with scale_then_round), got {tuple(norm_weight.shape)} {norm_weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"multi_linear: the residual must be x's shape and dtype {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")


def _check(x: torch.Tensor, weights: list[torch.Tensor], out_dtype: torch.dtype | None = None) -> None:
    if x.dim() != 2 or not weights:
        raise ValueError(f"multi_linear: x must be [T,K] and at least one weight given (x {tuple(x.shape)}, "
                         f"{len(weights)} weights)")
    K = x.shape[1]
    bad = [tuple(w.shape) for w in weights if w.dim() != 2 or w.shape[1] != K]
    if bad:
        raise ValueError(f"multi_linear: weights {bad} are not [N,{K}] (nn.Linear weights of x's width {K})")
    dtypes = {w.dtype for w in weights}
    (dtype,) = dtypes if len(dtypes) == 1 else (None,)
    halves = (torch.bfloat16, torch.float16)
    upcast = (x.dtype == torch.float32 and dtype in halves) or (
        out_dtype == torch.float32 and x.dtype in halves and dtype == torch.float32)  # a router's fp32 weights
    if dtype != x.dtype and not upcast:
        raise ValueError(f"multi_linear: the weights must share one dtype: x's ({x.dtype}); with an fp32 x, bf16/fp16 "
                         f"(read and upcast); with a bf16/fp16 x and out_dtype fp32, fp32 (x upcast); got "
                         f"{[w.dtype for w in weights]}")


def multi_linear_triton(x: torch.Tensor, weights: list[torch.Tensor], tile: tuple[int, int] | None = None,
                        norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
                        scale_then_round: bool = False, write_normed: bool = False, write_sum: bool = False,
                        out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Triton path (CPU tensors run in the Triton interpreter) -> [x @ W_i^T] in x's dtype (or out_dtype),
    then the side outputs asked for. tile: (BLOCK_N, BLOCK_K) instead of default_tile. norm_weight..:
    see multi_linear."""
    _check(x, weights, out_dtype)
    _check_side_outputs(norm_weight, residual, write_normed, write_sum)
    if norm_weight is not None:
        _check_norm(x, norm_weight, residual, scale_then_round)
    if x.shape[0] > MAX_TOKENS:
        raise ValueError(f"multi_linear: {x.shape[0]} rows; the kernel is for at most {MAX_TOKENS} (decode)")
    inputs = [x, *([] if residual is None else [residual]), *([] if norm_weight is None else [norm_weight])]
    residual_rows_differ = residual is not None and residual.stride(0) != x.stride(0)
    if any(t.stride(-1) != 1 for t in (*inputs, *weights)) or residual_rows_differ:
        raise ValueError("multi_linear: x, the residual and the weights need unit stride along K, the residual x's "
                         "row stride (call .contiguous())")
    outs = [new_output((x.shape[0], w.shape[0]), out_dtype or x.dtype, x.device) for w in weights]
    sides = [new_output(tuple(x.shape), x.dtype, x.device) for _ in range(write_normed + write_sum)]
    if x.shape[0] == 0 or x.shape[1] == 0:
        return [y.zero_() for y in outs] + sides
    norm = {"NORM": norm_weight is not None, "RESIDUAL": residual is not None, "SCALE_THEN_ROUND": scale_then_round,
            "K_ONE_LOAD": _one_load_width(x.shape[0], x.shape[1]) if norm_weight is not None else 0}
    norm_args = (x if residual is None else residual, x if norm_weight is None else norm_weight, float(eps))
    normed, total = (sides[0] if write_normed else x), (sides[-1] if write_sum else x)
    for first in range(0, len(weights), MAX_WEIGHTS):
        writes = {"WRITE_NORMED": write_normed and first == 0, "WRITE_SUM": write_sum and first == 0}
        _launch_group(x, weights[first:first + MAX_WEIGHTS], outs[first:first + MAX_WEIGHTS], tile,
                      (*norm_args, normed, total), {**norm, **writes})
    return outs + sides


def _check_side_outputs(norm_weight, residual, write_normed: bool, write_sum: bool) -> None:
    if (write_normed or write_sum) and norm_weight is None:
        raise ValueError("multi_linear: write_normed / write_sum need the RMSNorm prologue (norm_weight)")
    if write_sum and residual is None:
        raise ValueError("multi_linear: write_sum needs a residual (the sum is x + residual)")


def _one_load_width(T: int, K: int) -> int:
    """The norm's rstd pass reads all of x in one load when [T_PAD, K_PAD] stays within
    RSTD_ONE_LOAD_ELEMS (registers freed before the main loop), else 0: a loop of BLOCK_K steps."""
    width = next_pow2(max(K, 16))
    return width if next_pow2(max(T, 1)) * width <= RSTD_ONE_LOAD_ELEMS else 0


def _launch_group(x: torch.Tensor, group: list[torch.Tensor], outs: list[torch.Tensor], tile, norm_args: tuple,
                  norm: dict) -> None:
    T, K = x.shape
    rows = [w.shape[0] for w in group]
    block_n, block_k = tile or default_tile(T, sum(rows), K, x.device)
    blocks = [cdiv(r, block_n) for r in rows]
    starts = [sum(blocks[:j]) for j in range(1, MAX_WEIGHTS)]  # weights past the group start at the end
    pad = MAX_WEIGHTS - len(group)
    weights, ys = [*group, *[group[0]] * pad], [*outs, *[outs[0]] * pad]
    args = (x, *weights, *ys, *norm_args, T, K, *rows, *[0] * pad, *starts, *(w.stride(0) for w in weights),
            x.stride(0))
    grid = (sum(blocks),)
    meta = dict(T_PAD=next_pow2(max(T, 1)), BLOCK_N=block_n, BLOCK_K=block_k, STAGES=STAGES, **norm)
    if interpreting(x):
        launch_interpreted(_multi_linear_kernel, grid, *args, **meta)
    else:
        _multi_linear_kernel_jit[grid](*args, **meta, **pdl_launch(x.device, prefetch=True),
                                       LINE_ELEMS=line_elems(group[0]), num_warps=4)


def multi_linear(x: torch.Tensor, weights: list[torch.Tensor], use_triton: bool | None = None,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
                 scale_then_round: bool = False, write_normed: bool = False, write_sum: bool = False,
                 out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x [T,K], weights [N_i,K] -> [x @ W_i^T] (see the module docstring). use_triton: see indexer_topk.
    norm_weight [K] (x's dtype): x is RMSNorm(x + residual) first, with eps; scale_then_round: the norm
    rounds once after the weight (F.rms_norm), not before and after it (HF's RMSNorm classes).
    write_normed / write_sum: also return the normed rows / x + residual ([T,K], x's dtype), in that
    order after the products, for the model's other readers of them. out_dtype: the products' dtype
    (default x's; fp32 for a router that upcasts the normed rows before its GEMV)."""
    norm = dict(norm_weight=norm_weight, eps=eps, residual=residual, scale_then_round=scale_then_round,
                write_normed=write_normed, write_sum=write_sum, out_dtype=out_dtype)
    if use_triton_for(x, use_triton) and x.shape[0] <= MAX_TOKENS:
        return multi_linear_triton(x, weights, **norm)
    _check(x, weights, out_dtype)
    _check_side_outputs(norm_weight, residual, write_normed, write_sum)
    if norm_weight is not None:
        _check_norm(x, norm_weight, residual, scale_then_round)
    return multi_linear_ref(x, weights, **norm)


__all__ = ["multi_linear", "multi_linear_triton", "default_tile", "MAX_TOKENS", "MAX_WEIGHTS"]
