"""An fp8 (e4m3) copy of a model's indexer key cache, kept up to date one write at a time.

With `indexer_precision="fp8"`, an F indexer's op quantises its keys on every call; at decode that
reads the whole bf16 key cache, writes it as e4m3 and reads it again, every token. DeepSeek-V3.2
(and vLLM, SGLang) keep the indexer's key cache in fp8 instead. The model's cache here is the
model's (an HF StaticCache, a module buffer), so this module keeps a *mirror* of it: per key-cache
storage, e4m3 keys [Bmax,Tmax,D] and fp32 scales [Bmax,Tmax], into which each call quantises only
the rows the model has just written (`positions`, along dim 1, batch rows [0, b)). The indexer then
reads the mirror: half the bytes of the bf16 keys, and no per-call quantisation.

    k8, k_scale = fp8_key_mirror(keys, new_keys, positions)
        keys [B,T,D]: the model's key cache as its indexer reads it (a prefix view of the buffer:
          keys[:B, :T] of [Bmax,Tmax,D]); its contents are not read, only where it lives.
        new_keys [b,n,D]: the keys the model wrote at `positions` [n] (int) of rows [0, b).
        -> the mirror's view of `keys`: e4m3 [B,T,D], fp32 [B,T] (kernels/fp8_indexer.py's scales).

Each mirror row equals `quantize_rows` of the bf16 row (row-wise scales: rows are independent), so
the indexer's answer is the one it gives quantising every call. A mirror row is only right if the
model wrote that row through this function; a write it missed (an uncompiled step on the same
cache) is caught by a device-side assert: each write must start at or before the first row no
write has reached yet (`filled`), so rows are never skipped. Rows past `filled` are stale; the
model's own mask keeps its indexer off them, as it keeps it off the bf16 cache's unwritten rows.
A mirror lives as long as the key cache's storage (weakly referenced: a new cache at a freed
cache's address gets a new mirror).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ._triton_utils import use_triton_for
from .fp8_indexer import FP8_DTYPE, quantize_rows_ref
from .fp8_quantize import quantize_rows_into


@dataclass
class _Mirror:
    owner: StorageWeakRef  # the key cache's storage
    keys: torch.Tensor  # e4m3 [Bmax, Tmax, D]
    scales: torch.Tensor  # fp32 [Bmax, Tmax]
    filled: torch.Tensor  # int64 []: rows [0, filled) along dim 1 have been written


_MIRRORS: dict[tuple[torch.device, int], _Mirror] = {}


def fp8_key_mirror(keys: torch.Tensor, new_keys: torch.Tensor, positions: torch.Tensor):
    """(e4m3 [B,T,D], fp32 [B,T]): the fp8 mirror of the key cache `keys`, with new_keys [b,n,D]
    quantised into it at `positions` [n] of batch rows [0, b) first."""
    full_shape = _buffer_shape(keys)
    mirror = _mirror_of(keys, full_shape)
    b, n, D = new_keys.shape
    if b > full_shape[0] or D != full_shape[2] or positions.shape != (n,):
        raise ValueError(f"fp8 key cache: new keys {tuple(new_keys.shape)} at positions {tuple(positions.shape)} "
                         f"do not fit the key cache [{', '.join(map(str, full_shape))}]")
    if n:
        positions = positions.to(device=keys.device, dtype=torch.long)
        torch._assert_async(positions.min() <= mirror.filled,
                            "fp8 key cache: the model wrote indexer keys that did not go through the compiled "
                            "graph (an uncompiled step on this cache?), so the fp8 copy would miss them; run "
                            "every step on this cache compiled, or use indexer_precision='bf16'")
        if use_triton_for(new_keys, None):  # one launch (kernels/fp8_quantize.py), not ~15 small ones
            quantize_rows_into(new_keys, positions, mirror.keys, mirror.scales, mirror.filled)
        else:
            k8, scale = quantize_rows_ref(new_keys)
            # bytes: index_copy_ has no float8 kernel on CPU
            mirror.keys.view(torch.uint8)[:b].index_copy_(1, positions, k8.view(torch.uint8))
            mirror.scales[:b].index_copy_(1, positions, scale)
            mirror.filled.copy_(positions.max() + 1)
    B, T = keys.shape[:2]
    return mirror.keys[:B, :T], mirror.scales[:B, :T]


def _buffer_shape(keys: torch.Tensor) -> tuple[int, int, int]:
    """[Bmax, Tmax, D] of the buffer `keys` is a prefix view of (keys[:B, :T], rows contiguous)."""
    D = keys.shape[-1]
    elements = keys.untyped_storage().nbytes() // keys.element_size()
    if keys.dim() != 3 or keys.storage_offset() or keys.stride(2) != 1 or keys.stride(1) != D \
            or keys.stride(0) % D or elements % keys.stride(0):
        raise ValueError(f"fp8 key cache: the indexer's keys {tuple(keys.shape)} (strides {keys.stride()}, offset "
                         f"{keys.storage_offset()}) are not a [:B, :T] view of a [Bmax, Tmax, D] buffer; use "
                         "indexer_precision='bf16' or a cache laid out that way")
    return elements // keys.stride(0), keys.stride(0) // D, D


def _mirror_of(keys: torch.Tensor, full_shape: tuple[int, int, int]) -> _Mirror:
    storage = keys.untyped_storage()
    key = (keys.device, storage.data_ptr())
    mirror = _MIRRORS.get(key)
    if mirror is None or mirror.owner.expired() or mirror.keys.shape != full_shape:
        for stale in [k for k, m in _MIRRORS.items() if m.owner.expired()]:
            del _MIRRORS[stale]
        mirror = _Mirror(StorageWeakRef(storage), torch.zeros(full_shape, dtype=FP8_DTYPE, device=keys.device),
                         torch.zeros(full_shape[:2], dtype=torch.float32, device=keys.device),
                         torch.zeros((), dtype=torch.long, device=keys.device))
        _MIRRORS[key] = mirror
    return mirror


__all__ = ["fp8_key_mirror"]
