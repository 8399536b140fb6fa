"""Radix top-k selection (kernels/topk_select.py): Triton kernel (CPU interpreter, or CUDA) vs torch.topk."""

import pytest
import torch

from ic_compile.kernels import _triton_utils
from ic_compile.kernels.reference import topk_indices_from_scores
from ic_compile.kernels.testing import check_topk, repro, seed_everything
from ic_compile.kernels.topk_select import topk_select, topk_select_triton

from marks import needs_cuda, needs_triton

pytestmark = needs_triton


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel output buffers start as garbage: a missed write fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _masked_rows(B, R, W, p_masked=0.2, device="cpu"):
    """fp32 scores [B,R,W] of both signs with ~p_masked of the entries -inf (not allowed)."""
    scores = torch.randn(B, R, W, device=device) * 3
    return scores.masked_fill(torch.rand(B, R, W, device=device) < p_masked, float("-inf"))


def _hide_past_horizon(scores, limit_base):
    R, W = scores.shape[1:]
    horizon = limit_base + torch.arange(R, device=scores.device)
    return scores.masked_fill(torch.arange(W, device=scores.device) >= horizon[:, None], float("-inf"))


@pytest.mark.parametrize("digit_bits", [8, 11])
@pytest.mark.parametrize("B,R,W,topk", [(2, 5, 300, 16), (1, 3, 1000, 100), (1, 4, 40, 64), (1, 2, 7, 7)],
                         ids=["small_k", "k_not_pow2", "k_over_row", "k_equals_row"])
def test_matches_torch_topk_exactly(B, R, W, topk, digit_bits, request):
    """Distinct scores: the top-k is unique, so the kernel must return torch.topk's indices."""
    seed = seed_everything(request.node.name)
    scores = _masked_rows(B, R, W)
    got = topk_select_triton(scores, topk, digit_bits=digit_bits)
    want = topk_indices_from_scores(scores, topk)
    assert torch.equal(got, want), f"differs in {int((got != want).sum())} slots {repro(seed)}"


@pytest.mark.parametrize("limit_base", [1, 50])
def test_causal_rows_read_up_to_their_horizon(limit_base, request):
    """Row r only sees columns < limit_base + r; what lies beyond must not leak in."""
    seed = seed_everything(request.node.name)
    scores = _masked_rows(2, 9, 64, p_masked=0.1) + 100.0  # finite garbage past the horizon too
    scores[..., limit_base + 9:] = 1e6
    got = topk_select_triton(scores, 8, limit_base=limit_base)
    want = topk_indices_from_scores(_hide_past_horizon(scores, limit_base), 8)
    assert torch.equal(got, want), repro(seed)
    assert torch.equal(topk_select(scores, 8, limit_base, use_triton=False), want)


def test_ties_take_the_lowest_columns():
    """Equal scores at the threshold: the first columns win, and they come in column order."""
    scores = torch.zeros(1, 3, 50)
    scores[0, 1, 10:20] = 2.0  # 10 clear winners, then ties
    scores[0, 2] = torch.arange(50.0) % 5  # five-way ties at every level
    got = topk_select_triton(scores, 12)
    assert got[0, 0].tolist() == list(range(12))
    assert got[0, 1].tolist() == list(range(10, 20)) + [0, 1]
    row2 = [c for v in (4, 3, 2) for c in range(v, 50, 5)][:12]
    assert got[0, 2].tolist() == row2


def test_rows_without_keys_and_special_values():
    scores = torch.full((1, 4, 30), float("-inf"))
    scores[0, 1, 3] = -0.0
    scores[0, 1, 4] = 0.0
    scores[0, 2, :] = torch.linspace(-1e30, 1e30, 30)
    scores[0, 3, 5] = float("inf")
    scores[0, 3, 6] = -1e-38  # denormal-adjacent negatives
    scores[0, 3, 7] = 1e-45
    got = topk_select_triton(scores, 5)
    assert got[0, 0].tolist() == [-1] * 5
    assert sorted(got[0, 1, :2].tolist()) == [3, 4] and got[0, 1, 2:].tolist() == [-1] * 3
    assert got[0, 2].tolist() == [29, 28, 27, 26, 25]
    assert got[0, 3].tolist() == [5, 7, 6, -1, -1]


def test_coarse_scores_many_near_ties(request):
    """bf16-rounded scores: heavy ties inside every radix digit."""
    seed = seed_everything(request.node.name)
    scores = _masked_rows(1, 6, 500).to(torch.bfloat16).float()
    got = topk_select_triton(scores, 40)
    check_topk(got, scores, 40, rel_tol=0.0)
    want = topk_indices_from_scores(scores, 40)
    kth = scores.gather(-1, want[..., -1:].long())
    assert torch.equal(scores.gather(-1, got.long()), scores.gather(-1, want.long())), repro(seed)
    assert bool((scores.gather(-1, got.long()) >= kth).all())


def test_noncontiguous_out_and_scores(request):
    seed_everything(request.node.name)
    base = _masked_rows(2, 6, 80)
    scores = base[:, ::2, :70]  # strided rows, shorter width
    out = torch.full((2, 3, 24), 7, dtype=torch.int32)[..., 4:]
    topk_select_triton(scores, 20, out=out)
    assert torch.equal(out, topk_indices_from_scores(scores, 20))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("digit_bits", [8, 11])
@pytest.mark.parametrize("W,topk", [(4096, 2048), (40000, 2048), (5000, 100)])
def test_gpu_matches_torch_topk(W, topk, digit_bits, request):
    seed = seed_everything(request.node.name)
    scores = _masked_rows(2, 64, W, device="cuda")
    for limit_base in (None, W - 63):
        got = topk_select_triton(scores, topk, limit_base, digit_bits=digit_bits)
        ref = scores if limit_base is None else _hide_past_horizon(scores, limit_base)
        assert torch.equal(got, topk_indices_from_scores(ref, topk)), repro(seed)
