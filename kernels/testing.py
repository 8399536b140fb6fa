"""Test helpers for the kernels (input generators, seeded RNG, top-k set comparison).

Lives in the package (not tests/) so the kernel tests and the GPU benchmark share it.
"""
from __future__ import annotations

import os
import random
import zlib

import torch

# One seed per pytest session (fresh inputs every run); IC_TEST_SEED=<n> reproduces a run.
SESSION_SEED = int(os.environ.get("IC_TEST_SEED", random.randrange(1, 2**31)))


def seed_everything(name: str) -> int:
    """Seed torch from the session seed and a test name; returns the seed (for messages)."""
    seed = (SESSION_SEED + zlib.crc32(name.encode())) % 2**31
    torch.manual_seed(seed)
    return seed


def repro(seed: int) -> str:
    return f"(seed {seed}; rerun with IC_TEST_SEED={SESSION_SEED})"


def indexer_inputs(B, S, T, H, D, dtype=torch.float32, device="cpu"):
    """Random q [B,S,H,D], k [B,T,D], w [B,S,H] in `dtype` (fp32 data -> no exact ties)."""
    q = torch.randn(B, S, H, D, device=device).to(dtype)
    k = torch.randn(B, T, D, device=device).to(dtype)
    w = (torch.rand(B, S, H, device=device) + 0.1).to(dtype) / H**0.5
    return q, k, w


def random_indices(B, S, T, K, p_none=0.15, dtype=torch.int32, device="cpu"):
    """[B,S,K] distinct random key ids in [0, T) (K <= T), ~p_none of them replaced by -1."""
    idx = torch.rand(B * S, T, device=device).argsort(dim=-1)[:, :K].reshape(B, S, K)
    idx = torch.where(torch.rand(B, S, K, device=device) < p_none, torch.full_like(idx, -1), idx)
    return idx.to(dtype)


def masked_scores(q, k, w, mask=None, causal=True, key_range=None, indexer_precision="bf16") -> torch.Tensor:
    """Reference fp32 scores [B,S,T] with -inf where a key is not allowed (key_range: int32 [B,S,3]);
    indexer_precision "fp8": the fp8 indexer's scores (kernels/fp8_indexer.py)."""
    from .fp8_indexer import fp8_indexer_scores_ref
    from .reference import indexer_scores_ref, mask_indexer_scores

    scores = (fp8_indexer_scores_ref if indexer_precision == "fp8" else indexer_scores_ref)(q, k, w)
    return mask_indexer_scores(scores, q.shape[1], mask, causal, key_range)


def check_topk(got: torch.Tensor, scores: torch.Tensor, topk: int, rel_tol: float = 1e-4,
               ordered: bool = True) -> None:
    """Assert `got` [..., topk] is a valid top-k of masked `scores` [..., T] (-inf = not allowed).

    Per row, with n = min(topk, #allowed):
      * the first n slots are distinct allowed keys, the rest are -1;
      * they are in descending score order (up to tol);
      * as a SET they match the true top-n, except for keys whose score is within tol of the
        n-th largest score (near-ties may legitimately flip with summation order / bf16).
    tol = rel_tol * (max |allowed score| of the row + 1).
    ordered=False: `got` may list a row's keys in any order (they are sorted by score first).
    """
    got = got.to(scores.device).long()
    R, T = scores.numel() // scores.shape[-1], scores.shape[-1]
    got, scores = got.reshape(R, topk), scores.reshape(R, T).float()
    if not ordered:  # by score, descending; -1 slots last
        key = scores.gather(-1, got.clamp(min=0)).masked_fill(got < 0, float("-inf"))
        got = got.gather(-1, torch.argsort(key, dim=-1, descending=True, stable=True))
    finite = torch.isfinite(scores)
    n = finite.sum(-1).clamp(max=topk)  # [R]
    slot = torch.arange(topk, device=got.device)[None, :]
    expect_valid = slot < n[:, None]
    assert torch.equal(got >= 0, expect_valid), _rows_msg("-1 padding / count", got >= 0, expect_valid)
    assert bool((got < T).all()), "index out of range"

    picked = scores.gather(-1, got.clamp(min=0))  # [R, topk]
    assert bool(torch.isfinite(picked)[expect_valid].all()), "picked a key that is not allowed"
    srt = got.masked_fill(~expect_valid, -1).sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    assert not bool(dup.any()), "duplicate indices in a row"

    tol = rel_tol * (scores.masked_fill(~finite, 0).abs().amax(-1) + 1.0)  # [R]
    ordered = (picked[:, :-1] >= picked[:, 1:] - tol[:, None]) | ~expect_valid[:, 1:]
    assert bool(ordered.all()), "row not in descending score order"

    sorted_scores = scores.sort(-1, descending=True).values
    kth = sorted_scores.gather(-1, (n - 1).clamp(min=0)[:, None])[:, 0]  # [R]
    has = n > 0
    low = (picked < (kth - tol)[:, None]) & expect_valid
    assert not bool(low[has].any()), "picked a key clearly below the k-th score"
    must = (scores > (kth + tol)[:, None]) & finite  # keys that have to be selected
    must_picked = ((picked > (kth + tol)[:, None]) & expect_valid).sum(-1)
    assert torch.equal(must.sum(-1)[has], must_picked[has]), "missed a key clearly above the k-th score"


def _rows_msg(what: str, got: torch.Tensor, want: torch.Tensor) -> str:
    bad = (got != want).any(-1).nonzero().flatten()[:5].tolist()
    return f"{what} mismatch in rows {bad}"
