"""FP8 lightning indexer: DeepSeek-V3.2's `fp8_index` quantisation, and its pure-torch reference.

DeepSeek-V3.2 trained its indexer with q and k in fp8 (e4m3), one scale per token (and per head
for q) over blocks of 128 channels (the index head dim is 128: one block), and runs

    scores[b,s,t] = k_scale[b,t] * sum_h w[b,s,h] * q_scale[b,s,h] * relu(q8[b,s,h] . k8[b,t])

(its inference/kernel.py `fp8_index`; vLLM and SGLang run DeepGEMM's `fp8_mqa_logits` for the same
maths). ReLU commutes with the positive scales, so this is the bf16 indexer's function of the
dequantised q and k. Here:
  * `quantize_rows(x)`: e4m3 values and fp32 scales, scale = max(amax, 1e-4) / 448 per row of the
    last dim (DeepSeek's `act_quant` with block = the whole head vector: D = 128 in every DSA model);
    one launch of kernels/fp8_quantize.py where the kernels run, `quantize_rows_ref` (torch) else;
  * `quantize_indexer(q, k, w)`: q8 [B,S,H,D], k8 [B,T,D], w' = w * q_scale [B,S,H] (fp32: q's
    scales folded into the head weights, as DeepSeek does), k_scale [B,T] (or the keys as given,
    already e4m3, with their scales: an fp8 key cache, kernels/fp8_key_cache.py);
  * `fp8_indexer_scores_ref`: the fp32 reference of the maths above on the same quantised values
    (what the Triton kernel, `indexer_topk._indexer_scores_scaled_kernel`, computes with e4m3 tensor-core
    dots: each product of two e4m3 values is exact in fp32, only the accumulation order differs).
The Triton path is `indexer_topk(..., indexer_precision="fp8")`.
"""
from __future__ import annotations

import torch

from ._triton_utils import use_triton_for
from .fp8_quantize import FP8_DTYPE, FP8_MAX, quantize_rows_triton

_QUANT_ROWS = 1 << 22  # rows quantised per step (bounds the fp32 temporary: 4M x D x 4 bytes)


def quantize_rows(x: torch.Tensor, row_weights: torch.Tensor | None = None):
    """x [..., D] -> (e4m3 [..., D], fp32 scale [...]): x ~= x8 * scale, scale = max(|x|max, 1e-4) / 448;
    with row_weights [...] also row_weights.float() * scale. Where the kernels run (CUDA): one launch
    of kernels/fp8_quantize.py (the same bits); else quantize_rows_ref."""
    if use_triton_for(x, None):
        return quantize_rows_triton(x, row_weights)
    x8, scale = quantize_rows_ref(x)
    return (x8, scale) if row_weights is None else (x8, scale, row_weights.float() * scale)


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows in torch ops (the reference)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    for r0 in range(0, flat.shape[0], _QUANT_ROWS):
        part = flat[r0:r0 + _QUANT_ROWS].float()
        s = part.abs().amax(-1).clamp_min(1e-4) / FP8_MAX
        out[r0:r0 + _QUANT_ROWS] = (part / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[r0:r0 + _QUANT_ROWS] = s
    return out.view(x.shape), scale.view(x.shape[:-1])


def quantize_indexer(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, k_scale: torch.Tensor | None = None):
    """(q8 [B,S,H,D], k8 [B,T,D], w * q_scale fp32 [B,S,H], k_scale fp32 [B,T]) for the fp8 indexer.
    e4m3 k with k_scale: already quantised with those scales (an fp8 key cache, kernels/fp8_key_cache.py,
    or the model's own), kept; an e4m3 q likewise, its scales already in w. k_scale with other keys:
    a per-key factor on the scores, multiplied into the scales of k's quantisation."""
    if q.dtype == FP8_DTYPE:
        q8, w = q, w.float()
    elif w.shape == q.shape[:-1]:
        q8, _, w = quantize_rows(q, row_weights=w)  # one launch with the kernels
    else:  # (w broadcast over q's rows)
        q8, q_scale = quantize_rows(q)
        w = w.float() * q_scale
    if k_scale is not None and k_scale.shape != k.shape[:-1]:
        raise ValueError(f"key scales must be [B,T] for keys [B,T,D]; got {tuple(k_scale.shape)} for {tuple(k.shape)}")
    if k.dtype != FP8_DTYPE:  # a given k_scale is then a per-key factor on the scores, on top of k's own scales
        k, own_scale = quantize_rows(k)
        k_scale = own_scale if k_scale is None else own_scale * k_scale.float()
    return q8, k, w, k_scale


def fp8_indexer_scores_ref(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Unmasked fp8-indexer scores, fp32 [B,S,T], from unquantised q [B,S,H,D], k [B,T,D], w [B,S,H]."""
    q8, k8, wq, ks = quantize_indexer(q, k, w)
    logits = torch.einsum("bshd,btd->bsht", q8.float(), k8.float())
    return torch.einsum("bsht,bsh->bst", logits.relu_(), wq) * ks[:, None, :]


__all__ = ["quantize_rows", "quantize_rows_ref", "quantize_indexer", "fp8_indexer_scores_ref", "FP8_DTYPE", "FP8_MAX"]
