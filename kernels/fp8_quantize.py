"""Rows to e4m3 with one fp32 scale per row, in one launch: the fp8 indexer's quantisation.

Semantics (kernels/fp8_indexer.quantize_rows_ref, the reference): x [R, D] -> x8 [R, D] e4m3, scale [R]
fp32, scale = max(max|x|, 1e-4) / 448, x8 = clamp(x / scale, -448, 448) rounded to nearest even
(both divisions IEEE-rounded: `div_rn`). Two optional parts ride along:
  * row_weights [R] (the indexer's head weights w, one per q row): weighted [R] = w.float() * scale
    (q's scales folded into w, as DeepSeek's fp8_index does);
  * scatter (an fp8 key cache mirror, kernels/fp8_key_cache.py): x is [b, n, D], row (i, j) goes to
    row i * T_dst + positions[j] of x8 / scale ([Bmax * T_dst, D] / [Bmax * T_dst]), and, for a
    decode step's few positions, program 0 stores filled = max(positions) + 1 (a prefill's many: two
    torch ops after the launch, not one program's serial loop).

Why: at decode the fp8 indexer quantised its one query's 32 head rows and the new key row with
torch ops, ~29 small launches per F layer (abs, amax, clamp_min, two divs, clamp, casts, copies,
index_copy_, max, ...: ~29 us in a CUDA graph against the bf16 op's 47 us, the whole of the fp8 op's
measured deficit at 200K). One launch does each.

Program r0: BLOCK_R rows, the whole [BLOCK_R, D_PAD] tile in registers (D = 128 for every DSA
indexer). Reference: `fp8_indexer.quantize_rows_ref` (pure torch; `quantize_rows` takes it for CPU
tensors).
"""
from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, cdiv, interpreting, jit_helper, launch_interpreted, next_pow2, tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-4
BLOCK_R = 16
MAX_FILLED_IN_KERNEL = 1024  # positions program 0 reads in one load to set `filled`


def _quantize_rows_kernel(
    x_ptr, x8_ptr, s_ptr, w_ptr, ws_ptr, pos_ptr, filled_ptr,  # x8: the e4m3 output's bytes (uint8)
    R, N, D, sx_r, T_DST,  # x rows [R, D] (row stride sx_r; unit stride along D); N: rows per batch row
    BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, HAS_W: tl.constexpr, SCATTER: tl.constexpr,
    FILLED_BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
):
    """Rows [pid * BLOCK_R, +BLOCK_R) of x quantised (see the module docstring)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    d = tl.arange(0, D_PAD)
    r_ok, d_ok = r < R, d < D
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * sx_r + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_R]
    scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), tl.full((BLOCK_R,), FP8_MAX, tl.float32))
    x8 = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX)
    dst = r.to(tl.int64)
    if SCATTER:  # row r = (i, j) of [b, N] -> row i * T_DST + positions[j]
        position = tl.load(pos_ptr + r % N, mask=r_ok, other=0)
        dst = (r // N).to(tl.int64) * T_DST + position
    tl.store(x8_ptr + dst[:, None] * D + d[None, :], _e4m3_bits(x8), mask=r_ok[:, None] & d_ok[None, :])
    tl.store(s_ptr + dst, scale, mask=r_ok)
    if HAS_W:
        w = tl.load(w_ptr + r, mask=r_ok, other=0.0).to(tl.float32)
        tl.store(ws_ptr + r, w * scale, mask=r_ok)
    if FILLED_BLOCK > 0:
        if tl.program_id(0) == 0:  # filled = max(positions[:N]) + 1, N <= FILLED_BLOCK
            j = tl.arange(0, FILLED_BLOCK)
            top = tl.max(tl.load(pos_ptr + j, mask=j < N, other=-1).to(tl.int64), axis=0)
            tl.store(filled_ptr, top + 1)


@jit_helper
def _e4m3_bits(v):
    """The e4m3fn byte of each fp32 v in [-448, 448], rounded to nearest even (as torch's cast), by
    exact integer / power-of-two steps: the same bits on a GPU and in the Triton interpreter (whose
    own fp8 cast is wrong). Code = q + 8 * max(e + 6, 0) for |v| in [2^e, 2^(e+1)), q = |v| / 2^(max(e,
    -6) - 3) rounded half to even (q in [8, 16] for normals, [0, 8] below 2^-6: the carry of q = 16 /
    q = 8 lands on the next exponent by itself)."""
    bits = v.to(tl.int32, bitcast=True)
    a = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    inv_step = ((127 - (tl.maximum(e, -6) - 3)) << 23).to(tl.float32, bitcast=True)  # 2^-(max(e, -6) - 3)
    y = a * inv_step  # exact: a power of two (a GPU's fp32 `/` is approximate, off at the .5 ties), y < 16
    f = tl.floor(y)
    rest = y - f
    fi = f.to(tl.int32)
    q = fi + ((rest > 0.5) | ((rest == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    code = q + 8 * tl.maximum(e + 6, 0) + ((bits >> 24) & 0x80)
    return code.to(tl.uint8)


if HAS_TRITON:
    _quantize_rows_kernel_jit = triton.jit(_quantize_rows_kernel)


def quantize_rows_triton(x: torch.Tensor, row_weights: torch.Tensor | None = None):
    """x [..., D] -> (e4m3 [..., D], fp32 scale [...]) (+ fp32 w * scale [...] with row_weights of x's
    leading shape), one launch (CPU tensors: the Triton interpreter)."""
    rows = x.reshape(-1, x.shape[-1])
    x8 = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    weighted = None
    if row_weights is not None:
        if row_weights.shape != x.shape[:-1]:
            raise ValueError(f"fp8 quantise: row weights {tuple(row_weights.shape)} are not x's rows "
                             f"{tuple(x.shape[:-1])}")
        weighted = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _launch(rows, x8, scale, row_weights, weighted, None, None, n=1, t_dst=0)  # (n, t_dst: scatter only)
    return (x8, scale) if row_weights is None else (x8, scale, weighted)


def quantize_rows_into(new_rows: torch.Tensor, positions: torch.Tensor, x8: torch.Tensor, scale: torch.Tensor,
                       filled: torch.Tensor) -> None:
    """new_rows [b, n, D] quantised into x8 [Bmax, T, D] / scale [Bmax, T] at rows (i, positions[j]);
    filled (int64 []) = max(positions) + 1. One launch (CPU tensors: the Triton interpreter)."""
    b, n, D = new_rows.shape
    rows, positions = new_rows.reshape(b * n, D), positions.to(torch.int64)
    in_kernel = n <= MAX_FILLED_IN_KERNEL
    _launch(rows, x8, scale, None, None, positions, filled if in_kernel else None, n=n, t_dst=x8.shape[1])
    if not in_kernel and n:
        filled.copy_(positions.max() + 1)


def _launch(rows, x8, scale, w, weighted, positions, filled, n: int, t_dst: int) -> None:
    R, D = rows.shape
    if R == 0:
        return
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    args = (rows, x8.view(torch.uint8), scale, rows if w is None else w.reshape(-1),
            scale if weighted is None else weighted,
            scale if positions is None else positions, scale if filled is None else filled,
            R, n, D, rows.stride(0), t_dst)
    meta = dict(BLOCK_R=BLOCK_R, D_PAD=max(16, next_pow2(D)), HAS_W=w is not None, SCATTER=positions is not None,
                FILLED_BLOCK=0 if filled is None else max(16, next_pow2(n)),
                FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX)
    grid = (cdiv(R, BLOCK_R),)
    if interpreting(rows):
        launch_interpreted(_quantize_rows_kernel, grid, *args, **meta)
    else:
        _quantize_rows_kernel_jit[grid](*args, **meta, num_warps=4)


__all__ = ["quantize_rows_triton", "quantize_rows_into", "FP8_DTYPE", "FP8_MAX"]
