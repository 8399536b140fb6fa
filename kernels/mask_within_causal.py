"""Does a bool attention mask allow only keys at or before each query (the causal triangle)?

    within[...] = not any(mask[b, s, t] for t > (T - S) + s)     mask [B|1, S|1, T], True = allowed

The queries are the last S of T positions (HF caches). ic::indexer_topk asks this once per call
when it is given a dense mask (indexer_mask="dense", or direct users; key ranges are checked in
kernels/key_range.py instead): when the mask is causal it runs the causal kernel (key tiles above
the diagonal skipped, selection reads each row only up to its diagonal) with the same answer.

Design (Triton, `_mask_above_diagonal_kernel`): a program owns BLOCK_S rows of one batch and
streams the columns from the BLOCK_T-aligned tile holding its first row's diagonal on, in
[BLOCK_S, BLOCK_T] byte tiles (16-byte loads), OR-ing the entries above each row's diagonal;
it writes one int8 flag. Reads only the upper
triangle (half the mask, no temporaries): at S = T = 16K that is 128 MB instead of the chunked
torch reference's 3 full passes (compare, and, any) plus two [rows, T] temporaries per chunk.
"""
from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, cdiv, interpreting, launch_interpreted, tl, triton, use_triton_for

BLOCK_S = 16
BLOCK_T = 1024


def _mask_above_diagonal_kernel(
    mask_ptr, flag_ptr, S, T,
    sm_b, sm_s, sm_t,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """flag[b, pid] = 1 if any mask[b, s, t] with t > (T - S) + s in this program's rows."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    s_ok = s < S
    diag = (T - S) + s  # last allowed key per row
    row_ptr = mask_ptr + b * sm_b + s.to(tl.int64) * sm_s  # [BLOCK_S]
    # tiles start BLOCK_T-aligned at or before the first row's diagonal: 16-byte loads
    t_first = tl.maximum((T - S) + pid * BLOCK_S + 1, 0) // BLOCK_T * BLOCK_T
    found = tl.zeros((BLOCK_S, BLOCK_T), tl.uint8)
    for t0 in range(t_first, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        m = tl.load(row_ptr[:, None] + t[None, :].to(tl.int64) * sm_t,
                    mask=s_ok[:, None] & (t[None, :] < T), other=0)  # [BLOCK_S, BLOCK_T] bytes
        found = found | (m & (t[None, :] > diag[:, None]).to(tl.uint8))
    tl.store(flag_ptr + b * tl.num_programs(0) + pid, (tl.max(tl.max(found, axis=1), axis=0) != 0).to(tl.int8))


def mask_within_causal_ref(mask: torch.Tensor, S: int, T: int, rows_per_chunk: int = 4096) -> bool:
    """Pure torch, one pass over the mask in row chunks."""
    mask = _as_bsT(mask, S, T)
    cols = torch.arange(T, device=mask.device)
    for s0 in range(0, S, rows_per_chunk):
        s1 = min(S, s0 + rows_per_chunk)
        last_allowed = torch.arange(s0, s1, device=mask.device)[:, None] + (T - S)  # [rows, 1]
        if (mask[:, s0:s1] & (cols > last_allowed)).any():
            return False
    return True


def mask_within_causal_triton(mask: torch.Tensor, S: int, T: int) -> bool:
    """Triton path (CPU tensors run in the Triton interpreter)."""
    mask = _as_bsT(mask, S, T)
    if mask.shape[0] == 0 or S == 0 or T == 0:
        return True
    bytes_ = mask.view(torch.uint8)
    flags = torch.zeros((mask.shape[0], cdiv(S, BLOCK_S)), dtype=torch.int8, device=mask.device)
    grid = (flags.shape[1], flags.shape[0])
    args = (bytes_, flags, S, T, *bytes_.stride())
    if interpreting(bytes_):
        launch_interpreted(_mask_above_diagonal_kernel, grid, *args, BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T)
    else:
        _jit_kernel()[grid](*args, BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, num_warps=4)
    return not bool(flags.any())


def mask_within_causal(mask: torch.Tensor, S: int, T: int, use_triton: bool | None = None) -> bool:
    """True when `mask` ([B|1, S|1, T], or broadcastable to it; nonzero = allowed) allows no key
    after its query, the queries being the last S of T positions. use_triton: see indexer_topk."""
    if use_triton_for(mask, use_triton):
        return mask_within_causal_triton(mask, S, T)
    return mask_within_causal_ref(mask, S, T)


def _as_bsT(mask: torch.Tensor, S: int, T: int) -> torch.Tensor:
    """-> bool [B|1, S, T] view (broadcast dims stay stride 0; no copy for a bool mask)."""
    mask = mask.to(torch.bool)
    if mask.dim() > 3:
        raise ValueError(f"mask must be [B, S, T] (or broadcastable to it), got shape {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))
    return mask.expand(mask.shape[0], S, T)


_JIT: dict = {}


def _jit_kernel():
    if "jit" not in _JIT:
        _JIT["jit"] = triton.jit(_mask_above_diagonal_kernel)
    return _JIT["jit"]


__all__ = ["mask_within_causal", "mask_within_causal_ref", "mask_within_causal_triton", "HAS_TRITON"]
