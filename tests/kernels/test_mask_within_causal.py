"""Causal-mask check (kernels/mask_within_causal.py): Triton interpreter on CPU and CUDA vs the torch reference."""

import pytest
import torch

from ic_compile.kernels.mask_within_causal import mask_within_causal, mask_within_causal_ref
from ic_compile.kernels.testing import repro, seed_everything

from marks import needs_cuda, needs_triton

pytestmark = needs_triton


def causal_mask(B, S, T, device="cpu"):
    """[B, S, T] bool: query s (position T - S + s) allows keys 0..T-S+s, ~30% of them dropped."""
    rows = torch.arange(S, device=device)[:, None] + (T - S)
    allowed = torch.arange(T, device=device)[None, :] <= rows
    return allowed & (torch.rand(B, S, T, device=device) > 0.3)


def with_future_key(mask, b, s):
    """Allow one random key after query s of batch b (a non-causal mask)."""
    S, T = mask.shape[1:]
    first = T - S + s + 1
    mask = mask.clone()
    mask[b, s, torch.randint(first, T, ()).item()] = True
    return mask


def _check(mask, S, T, want, seed):
    got = mask_within_causal(mask, S, T, use_triton=True)
    ref = mask_within_causal_ref(mask, S, T)
    assert ref == want, f"reference disagrees with the construction {repro(seed)}"
    assert got == want, f"shape {tuple(mask.shape)} S={S} T={T}: got {got}, want {want} {repro(seed)}"


@pytest.mark.parametrize("B,S,T", [(1, 37, 37), (2, 40, 1100), (1, 1030, 1030), (3, 17, 2100)])
def test_causal_masks_pass(B, S, T, request):
    seed = seed_everything(request.node.name)
    _check(causal_mask(B, S, T), S, T, True, seed)


@pytest.mark.parametrize("where", ["first_row", "last_future_row", "random_row"])
@pytest.mark.parametrize("B,S,T", [(2, 40, 1100), (1, 1030, 1030)])
def test_one_future_key_fails(B, S, T, where, request):
    """A single allowed key above the diagonal (any batch, any row that has future keys) is found."""
    seed = seed_everything(request.node.name)
    s = {"first_row": 0, "last_future_row": S - 2, "random_row": torch.randint(0, S - 1, ()).item()}[where]
    b = torch.randint(0, B, ()).item()
    _check(with_future_key(causal_mask(B, S, T), b, s), S, T, False, seed)


def test_broadcast_masks(request):
    """[B, 1, T] padding masks (decode, one query per batch row) and a 2-D [S, T] mask."""
    seed = seed_everything(request.node.name)
    T = 900
    padding = torch.rand(3, 1, T) > 0.2
    _check(padding, 1, T, True, seed)  # the single query is the last position: nothing is after it
    _check(padding.expand(3, 5, T), 5, T, bool(not padding[:, 0, -4:].any()), seed)
    square = causal_mask(1, 64, 64)[0]
    _check(square, 64, 64, True, seed)
    _check(square.T.contiguous(), 64, 64, bool(not square.T.triu(1).any()), seed)


def test_bad_mask_shape():
    with pytest.raises(ValueError, match=r"mask must be \[B, S, T\]"):
        mask_within_causal(torch.ones(1, 1, 4, 4, dtype=torch.bool), 4, 4, use_triton=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B,S,T", [(1, 4096, 4096), (2, 1000, 5000)])
def test_mask_within_causal_gpu(B, S, T, request):
    seed = seed_everything(request.node.name)
    mask = causal_mask(B, S, T, device="cuda")
    assert mask_within_causal(mask, S, T) is True, repro(seed)
    for s in (0, S // 2, S - 2):
        bad = with_future_key(mask, B - 1, s)
        assert mask_within_causal(bad, S, T) is False, f"row {s} {repro(seed)}"
        assert mask_within_causal_ref(bad, S, T) is False
