"""Per-query key ranges: what ic::indexer_topk reads instead of a dense [B,S,T] bool mask.

    key_range[b, s] = (lo, hi, count)   int32 [B, S, 3]
    lo    = first allowed key of row (b, s)   (T when none)
    hi    = last allowed key                  (-1 when none)
    count = number of allowed keys

Key t is allowed for query (b, s) iff count > 0 and lo <= t <= hi. That equals the mask it was
reduced from iff every row's allowed keys are one contiguous run: count == 0 or count == hi - lo + 1
(causal, left/right padding, sliding windows, chunked prefill are; tree / block-sparse masks are
not). `key_range_of` is three last-dim reductions, traced into the graph so Inductor fuses them with
the mask's producers (aranges and compares) and the [S, T] mask is never written to memory.
"""
from __future__ import annotations

import torch

from ..errors import IndexCacheError

# what the error names: the backend option that hands the op the dense mask instead
DENSE_OPTION = "options={'indexer_mask': 'dense'}"


class NotAKeyRangeError(IndexCacheError, ValueError):
    """Some query's allowed keys are not one contiguous range (the mask is not range-shaped)."""


def key_range_of(allowed: torch.Tensor) -> torch.Tensor:
    """bool [..., T] (True = allowed) -> int32 [..., 3]: (first, last, number of) allowed keys.
    Reduced in int64 (Inductor's index type): torch 2.11's Inductor failed to compile the int32
    form at 128K (an int32 reduction accumulator re-assigned an int64 value in its loop)."""
    T = allowed.shape[-1]
    t = torch.arange(T, device=allowed.device)  # [T] int64
    lo = torch.where(allowed, t, T).amin(-1)  # [...]
    hi = torch.where(allowed, t, -1).amax(-1)
    count = allowed.sum(-1)
    return torch.stack((lo, hi, count), dim=-1).to(torch.int32)


def range_allowed(key_range: torch.Tensor, T: int) -> torch.Tensor:
    """int32 [..., 3] -> bool [..., T]: the mask a key range stands for (references and tests)."""
    lo, hi, count = key_range.long().unbind(-1)  # [...]
    t = torch.arange(T, device=key_range.device)
    return (t >= lo[..., None]) & (t <= hi[..., None]) & (count[..., None] > 0)


def check_key_range(key_range: torch.Tensor, S: int, T: int, causal: bool) -> tuple[bool, bool]:
    """Raise NotAKeyRangeError unless each row of key_range [B|1, S|1, 3] is one contiguous run.
    Returns (plain_causal, within_causal): the ranges allow exactly the causal rows (t <= T - S + s;
    intersected with them when `causal`), so the op may run its plain causal path; no range
    reaches past its query's diagonal, so the op may add the causal rule (its chunks and rows then
    stop at the diagonal) without changing the answer. One device sync."""
    lo, hi, count = key_range.expand(key_range.shape[0], S, 3).unbind(-1)  # [B, S]
    diag = torch.arange(S, device=key_range.device) + (T - S)  # [S] last causal key per query
    last = torch.minimum(hi, diag) if causal else hi
    not_range = ((count != 0) & (count != hi - lo + 1)).any()
    plain_causal = ((count > 0) & (lo == 0) & (last == diag)).all()
    within_causal = ((count == 0) | (last <= diag)).all()
    not_range, plain_causal, within_causal = torch.stack((not_range, plain_causal, within_causal)).tolist()
    if not_range:
        raise NotAKeyRangeError(_not_a_range_message(lo, hi, count))
    return bool(plain_causal), bool(within_causal)


def assert_key_range_async(key_range: torch.Tensor) -> None:
    """check_key_range's contiguity test without a sync (capturable in a CUDA graph): a device-side
    assert on CUDA (it stops the process with this message), a RuntimeError on CPU."""
    lo, hi, count = key_range.unbind(-1)
    torch._assert_async(((count == 0) | (count == hi - lo + 1)).all(),
                        "ic::indexer_topk: the attention mask is not one contiguous key range per query; "
                        f"compile with {DENSE_OPTION} for such masks (tree attention, block-sparse)")


def _not_a_range_message(lo, hi, count) -> str:
    b, s = [int(i) for i in ((count != 0) & (count != hi - lo + 1)).nonzero()[0]]
    n, first, last = int(count[b, s]), int(lo[b, s]), int(hi[b, s])
    return (f"ic::indexer_topk: the attention mask is not one contiguous key range per query (query "
            f"b={b}, s={s} allows {n} keys between {first} and {last}, not all {last - first + 1}); the "
            f"indexer reads each query's mask as a key range [lo, hi]. For masks such as tree attention, "
            f"compile with {DENSE_OPTION} to hand the indexer the dense mask instead.")


__all__ = ["DENSE_OPTION", "NotAKeyRangeError", "assert_key_range_async", "check_key_range", "key_range_of",
           "range_allowed"]
