"""Physical limit of sparse MLA's memory side: how fast can the GPU just *read* the rows it gathers?

`gather_ms(kv, idx)` reads, for every query, the kv rows named by its top-k indices (-1 skipped)
exactly like ic::sparse_mla does (same [BLOCK_K, 512] + [BLOCK_K, 64] row tiles, one program
per query) and only sums them (no attention maths). Its time is a floor for sparse MLA at that
access pattern: at 16K the 19 MB kv table sits in L2, so this measures L2 gather bandwidth, not
HBM's. bench/kernel_speed.py reports sparse MLA's time against it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _gather_sum_kernel(kv_ptr, idx_ptr, out_ptr, K, skv_t, si_s,
                       D_A: tl.constexpr, D_B: tl.constexpr, BLOCK_K: tl.constexpr):
    s = tl.program_id(0)
    da = tl.arange(0, D_A)
    db = D_A + tl.arange(0, D_B)
    acc_a = tl.zeros([D_A], tl.float32)
    acc_b = tl.zeros([D_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + s.to(tl.int64) * si_s + kk, mask=kk < K, other=-1)  # [BLOCK_K]
        row = kv_ptr + idx.to(tl.int64) * skv_t
        ok = (idx >= 0)[:, None]
        acc_a += tl.sum(tl.load(row[:, None] + da[None, :], mask=ok, other=0.0).to(tl.float32), 0)
        acc_b += tl.sum(tl.load(row[:, None] + db[None, :], mask=ok, other=0.0).to(tl.float32), 0)
    tl.store(out_ptr + s * (D_A + D_B) + da, acc_a)
    tl.store(out_ptr + s * (D_A + D_B) + db, acc_b)


def gather_ms(kv: torch.Tensor, idx: torch.Tensor) -> float:
    """Best median ms over a few launch configs; kv [T, 576] bf16, idx [S, K] int32."""
    S, K = idx.shape
    out = torch.empty(S, kv.shape[1], device=kv.device, dtype=torch.float32)
    best = float("inf")
    for block_k in (32, 64):
        for warps in (4, 8):
            fn = lambda: _gather_sum_kernel[(S,)](kv, idx, out, K, kv.stride(0), idx.stride(0),  # noqa: E731
                                                  D_A=512, D_B=kv.shape[1] - 512, BLOCK_K=block_k,
                                                  num_warps=warps)
            fn()
            best = min(best, triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    head = idx[:4]  # it really read the rows: check the first queries' sums
    ref = kv.float()[head.clamp(min=0).long()].masked_fill((head < 0)[..., None], 0).sum(1)
    torch.testing.assert_close(out[:4], ref, rtol=1e-3, atol=1e-2)
    return best
