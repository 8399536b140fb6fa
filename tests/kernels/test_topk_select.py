"""Top-k selection kernel (kernels/topk_select.py) vs torch.topk: interpreter on CPU, real on CUDA."""

import pytest
import torch

from ic_compile.kernels import _triton_utils
from ic_compile.kernels._triton_utils import launch_interpreted, tl
from ic_compile.kernels.testing import check_topk, repro, seed_everything
from ic_compile.kernels.topk_select import (
    PATH_DIRECT,
    PATH_EXACT,
    PATH_FILTERED,
    PATH_RETRIED,
    _topk_select_with_path,
    _Tuning,
    candidate_capacity,
    readable_scores,
    topk_select,
    _kth_ukey_interpolated,
    _ukeys,
    topk_select_ref,
)

from marks import needs_cuda, needs_triton

pytestmark = needs_triton


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Output buffers start as garbage: a missed write fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


@pytest.fixture
def select_calls(monkeypatch):
    """A list that grows by one each time the indexer calls topk_select (which still runs)."""
    from ic_compile.kernels import indexer_topk as mod

    calls = []
    monkeypatch.setattr(mod, "topk_select", lambda *a, **kw: calls.append(1) or topk_select(*a, **kw))
    return calls


def _check(got, scores, topk, sorted_out, seed):
    """got: a valid top-k of scores (descending when sorted_out; as a set otherwise)."""
    try:
        check_topk(got, scores, topk, ordered=sorted_out)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None


def _rows(R, W, device="cpu"):
    """Random scores [R, W] with ~20% -inf (not allowed), one all -inf row, one row with
    fewer than 8 allowed keys."""
    scores = torch.randn(R, W, device=device)
    scores[torch.rand(R, W, device=device) < 0.2] = float("-inf")
    scores[0] = float("-inf")
    scores[1, 7:] = float("-inf")
    return scores


@pytest.mark.parametrize("sorted_out", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("W,topk", [(40, 16), (300, 16), (900, 32), (129, 64)])
def test_topk_select(W, topk, sorted_out, request):
    seed = seed_everything(request.node.name)
    scores = _rows(6, W)
    got, path = _topk_select_with_path(scores, topk, sorted=sorted_out)
    assert got.shape == (6, topk) and got.dtype == torch.int32
    _check(got, scores, topk, sorted_out, seed)
    cand = candidate_capacity(topk)
    assert bool(((path == PATH_DIRECT) == (W <= cand)).all()), path  # direct iff the row fits


def test_topk_select_causal_rows_and_period(request):
    """Row r reads min(W, diag_base + r % period + 1) scores; the rest is never selected even
    when it holds the largest values (here: +inf-like garbage beyond the diagonal)."""
    seed = seed_everything(request.node.name)
    R, W, topk, period, diag_base = 8, 200, 16, 4, 150
    scores = torch.randn(R, W)
    limit = diag_base + torch.arange(R) % period
    scores[torch.arange(W)[None, :] > limit[:, None]] = 1e30
    got = topk_select(scores, topk, diag_base=diag_base, row_period=period)
    _check(got, readable_scores(scores, diag_base, period), topk, True, seed)
    assert torch.equal(got, topk_select_ref(scores, topk, diag_base, period))


def test_topk_select_early_causal_rows():
    """diag_base < 0 (queries before the first key) and rows shorter than topk: -1 padded."""
    scores = torch.randn(5, 30)
    got = topk_select(scores, 8, diag_base=-2)
    assert (got[:2] == -1).all()
    assert torch.equal(got, topk_select_ref(scores, 8, -2))


@pytest.mark.parametrize("one_reduce", [False, True], ids=["three_sums", "one_reduce"])
def test_topk_select_ties_take_the_exact_path(one_reduce, request):
    """Heavy ties defeat the sampled threshold (everything at the threshold is kept -> more
    than CAND candidates): the exact radix-search path still returns a valid top-k. Both forms
    of the radix-4 step counts (one_reduce: the GPU default)."""
    seed = seed_everything(request.node.name)
    W, topk = 400, 16
    scores = torch.zeros(3, W)
    scores[0, 100:] = 1.0  # 300 tied maxima
    scores[1, ::3] = -torch.rand(W // 3 + 1) - 0.1  # the 2/3 exact zeros are the maxima
    scores[2] = torch.randint(0, 3, (W,)).float()  # three values only
    if one_reduce:  # interpreted tl.reduce combines per element: one narrower row (> CAND = 64)
        scores = scores[1:2, :130].contiguous()  # 87 tied maxima
    got, path = _topk_select_with_path(scores, topk, tuning=_Tuning(one_reduce=one_reduce,
                                                                 block=128 if one_reduce else None))
    _check(got, scores, topk, True, seed)
    assert (path == PATH_EXACT).all(), path


def _kth_probe_kernel(scores_ptr, out_ptr, k, N: tl.constexpr, MAX_STEPS: tl.constexpr, ONE_REDUCE: tl.constexpr):
    """out[0:2] = _kth_ukey_interpolated of the N scores: (k-th largest ukey, no-ties flag)."""
    kth, no_ties = _kth_ukey_interpolated(_ukeys(tl.load(scores_ptr + tl.arange(0, N))), k, MAX_STEPS, ONE_REDUCE)
    tl.store(out_ptr, kth.to(tl.int64))
    tl.store(out_ptr + 1, no_ties.to(tl.int64))


def _ukeys_torch(scores):
    """kernels' _ukeys in torch (int64): order-preserving, 0 for -inf."""
    bits = scores.view(torch.int32).long()
    flipped = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)
    return torch.where(scores > float("-inf"), flipped, 0)


def _kth_probe_rows(N):
    gen = torch.randn(N)
    yield "smooth", gen
    yield "three values", torch.randint(0, 3, (N,)).float()
    tied = torch.randn(N)
    tied[N // 8:N // 2] = 0.25  # a tie group straddling the k-th
    yield "tie group at the k-th", tied
    yield "wide dynamic range", torch.randn(N) * 10.0 ** torch.randint(-30, 30, (N,)).float()
    few = torch.full((N,), float("-inf"))
    few[::9] = torch.randn(len(few[::9]))
    yield "fewer allowed than k", few
    exactly = torch.full((N,), float("-inf"))
    exactly[:N // 4] = torch.randn(N // 4)
    yield "exactly k allowed", exactly
    yield "none allowed", torch.full((N,), float("-inf"))


@pytest.mark.parametrize("max_steps", [0, 8], ids=["radix_only", "interpolated"])
@pytest.mark.parametrize("one_reduce", [False, True], ids=["three_sums", "one_reduce"])
def test_kth_ukey_interpolated(max_steps, one_reduce, request):
    """The resolve step's search returns the k-th largest ukey (1 when at most k are allowed),
    and its no-ties flag only when the keys >= it are exactly the answer -- for smooth rows,
    ties, a wide dynamic range, few allowed keys; by interpolation, and by the radix search it
    falls back to when the interpolation stalls (max_steps 0: always)."""
    seed_everything(request.node.name)
    N = 64 if one_reduce else 256  # interpreted tl.reduce combines per element: small
    k = N // 4
    for name, scores in _kth_probe_rows(N):
        out = torch.zeros(2, dtype=torch.int64)
        launch_interpreted(_kth_probe_kernel, (1,), scores, out, k, N=N, MAX_STEPS=max_steps, ONE_REDUCE=one_reduce)
        ukeys = _ukeys_torch(scores)
        n_allowed = int((ukeys > 0).sum())
        want = 1 if n_allowed <= k else int(ukeys.sort(descending=True).values[k - 1])
        assert int(out[0]) == want, (name, int(out[0]), want)
        if out[1]:
            assert int((ukeys >= want).sum()) == min(k, n_allowed), name


def test_public_signature_says_what_is_selected():
    """topk_select's public parameters are the selection's semantics; its launch knobs are the
    private _Tuning (the indexer's configs, tests and bench sweeps pass it as `_tuning`)."""
    import inspect

    params = inspect.signature(topk_select).parameters
    assert [p for p in params if not p.startswith("_")] == ["scores", "topk", "diag_base", "row_period", "sorted",
                                                             "out"]
    assert params["_tuning"].kind is inspect.Parameter.KEYWORD_ONLY


def test_topk_select_filtered_path_is_taken(request):
    """Smooth random rows wider than CAND go through the sampled filter (no fallback). (The
    sample is 64 scores for topk 16; for much wider rows its rank-1 threshold keeps too many.)"""
    seed = seed_everything(request.node.name)
    scores = torch.randn(4, 300)
    got, path = _topk_select_with_path(scores, 16)
    _check(got, scores, 16, True, seed)
    assert (path == PATH_FILTERED).sum() >= 3, path


def test_rows_with_fewer_allowed_than_topk_stay_filtered(request):
    """A short sequence in a padded batch: rows wider than CAND with fewer than topk allowed
    scores (here 0, 5 and 10 of 300; left padding and scattered). The filter keeps every allowed
    score, which is the answer (-1 padded) -- without the exact path's full-row passes."""
    seed = seed_everything(request.node.name)
    scores = torch.full((4, 300), float("-inf"))
    scores[1, 295:] = torch.randn(5)  # left padding: the last 5 keys are the sequence
    scores[2, ::30] = torch.randn(10)
    scores[3] = torch.randn(300)  # an ordinary row next to them
    got, path = _topk_select_with_path(scores, 16)
    _check(got, scores, 16, True, seed)
    assert (got[:3] == -1).sum(dim=1).tolist() == [16, 11, 6]
    assert ((path == PATH_FILTERED) | (path == PATH_RETRIED)).all(), path  # no exact fallback


@pytest.mark.parametrize("segments", [2, 8])
def test_segmented_filter(segments, request):
    """Few wide rows (decode): `segments` programs per row count, then compact, their part of
    the row; the candidate block is the one the one-program filter writes (index order), so the
    answer is the same set. Causal row lengths, a row with fewer allowed scores than topk, and
    heavy ties (the exact path) included."""
    seed = seed_everything(request.node.name)
    W, topk = 1000, 16
    scores = torch.randn(5, W)
    scores[1, torch.arange(W) % 97 != 5] = float("-inf")  # 11 allowed, in most segments: all kept
    scores[2] = 0.0  # all tied: exact path
    scores[3, ::2] = float("-inf")
    got, path = _topk_select_with_path(scores, topk, diag_base=W - 4, row_period=5,
                                       tuning=_Tuning(segments=segments))
    readable = readable_scores(scores, W - 4, 5)
    _check(got, readable, topk, True, seed)
    one_program = topk_select(scores, topk, diag_base=W - 4, row_period=5, _tuning=_Tuning(segments=1))
    assert torch.equal(got, one_program)  # same candidate blocks, same tie breaks
    assert int((got[1] == -1).sum()) == topk - 11
    assert path[1] == PATH_FILTERED and path[2] == PATH_EXACT, path
    # one pass, no retries: with a 256-score sample (topk 16) a row misses now and then -> exact path
    assert set(path[[0, 3, 4]].tolist()) <= {PATH_FILTERED, PATH_EXACT}, path


@pytest.mark.parametrize("shift", [-10.0, 0.0, 1e30], ids=["negative", "around_zero", "huge"])
def test_filter_threshold_sign_and_magnitude(shift, request):
    """The filter compares fp32 scores against a threshold rebuilt from a ukey: negative
    thresholds (all scores < 0), ones near +-0, and huge magnitudes must keep exactly what the
    ukey order keeps (else the candidate block misses the top-k or overflows)."""
    seed = seed_everything(request.node.name)
    scores = torch.randn(4, 300) * (1e28 if shift == 1e30 else 1.0) + shift
    scores[3, ::2] = -scores[3, ::2].abs() - 1  # mixed signs in one row, and some +-0
    scores[3, 1::2] = scores[3, 1::2].abs()
    scores[3, 1:40:4] = 0.0
    scores[3, 3:40:4] = -0.0
    got, path = _topk_select_with_path(scores, 16)
    _check(got, scores, 16, True, seed)
    # the filter path, not the exact fallback (a 64-score sample for topk 16 can still miss 3 times
    # on one row in a few hundred: at most one row may fall back)
    assert int(((path == PATH_FILTERED) | (path == PATH_RETRIED)).sum()) >= 3, path


@pytest.mark.parametrize("case", ["chunked_batches", "queries_after_keys", "padding_mask"])
def test_unordered_indexer_uses_topk_select(case, request, select_calls):
    """indexer_topk_triton(sorted=False) through topk_select: causal diagonals per chunk, B > 1
    rows (row_period), masks."""
    from ic_compile.kernels import indexer_topk as mod
    from ic_compile.kernels.testing import indexer_inputs, masked_scores

    seed = seed_everything(request.node.name)
    B, S, T, kw, mask = {"chunked_batches": (2, 24, 150, {"chunk_rows": 8}, None),
                         "queries_after_keys": (1, 30, 20, {"chunk_rows": 8}, None),
                         "padding_mask": (2, 16, 120, {}, "pad")}[case]
    q, k, w = indexer_inputs(B, S, T, 4, 16)
    if mask == "pad":
        mask = (torch.arange(T)[None, :] < torch.tensor([T, T - 50])[:, None])[:, None, :]
    got = mod.indexer_topk_triton(q, k, w, 16, mask, True, sorted=False, **kw)
    assert select_calls, "topk_select was not used"
    try:
        check_topk(got, masked_scores(q, k, w, mask, True), 16, ordered=False)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sorted_out", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("R,W,diag", [(256, 16384, 12288), (16, 131072, None), (3, 131072, None), (64, 3000, None)])
def test_topk_select_gpu(R, W, diag, sorted_out, request):
    seed = seed_everything(request.node.name)
    scores = _rows(R, W, "cuda")
    scores[2, :5000] = 0.5  # ties
    got = topk_select(scores, 2048, diag_base=diag, sorted=sorted_out)
    allowed = readable_scores(scores, diag, R)
    _check(got.cpu(), allowed.cpu(), 2048, sorted_out, seed)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("R,W,diag", [(640, 200000, 199000), (300, 262144, None)])
def test_topk_select_long_rows_gpu(R, W, diag, request):
    """Rows wider than LONG_ROW: the filter's 4096-score sample, with the indexer's long-row launch
    (indexer_topk._SELECT_TUNING_LONG); causal rows, ties, a row with fewer allowed than topk."""
    from ic_compile.kernels.indexer_topk import _SELECT_TUNING_LONG
    from ic_compile.kernels.topk_select import LONG_ROW, launch_meta

    assert W > LONG_ROW and launch_meta(2048, width=W)["SAMPLE"] == 4096
    seed = seed_everything(request.node.name)
    scores = _rows(R, W, "cuda")
    scores[2, :5000] = 0.5  # ties
    scores[5, 100:] = float("-inf")  # 100 allowed keys
    got = topk_select(scores, 2048, diag_base=diag, sorted=False, _tuning=_SELECT_TUNING_LONG)
    _check(got, readable_scores(scores, diag, R), 2048, False, seed)


@pytest.mark.gpu
@needs_cuda
def test_unordered_indexer_gpu(request):
    """The CUDA op path with sorted=False (what the lowering asks for behind HF's index mask)."""
    from ic_compile.kernels.indexer_topk import indexer_topk
    from ic_compile.kernels.testing import indexer_inputs, masked_scores

    seed = seed_everything(request.node.name)
    q, k, w = indexer_inputs(2, 1024, 6000, 32, 128, torch.bfloat16, device="cuda")
    got = indexer_topk(q, k, w, 2048, sorted=False)
    try:
        check_topk(got, masked_scores(q.float(), k.float(), w.float()), 2048, ordered=False)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None


def test_auto_selection_rule(monkeypatch, select_calls):
    """select_topk(selection="auto"): topk_select only for unordered rows and topk <=
    MAX_SELECT_TOPK; torch.topk (descending) otherwise. Same sets either way."""
    from ic_compile.kernels import indexer_topk as mod

    calls = select_calls
    scores = _rows(64, 40).view(2, 32, 40)  # B * rows = 64
    want = mod.select_topk(scores, 8, None, sorted=True)
    assert not calls, "descending rows must use torch.topk"
    got = mod.select_topk(scores, 8, None, sorted=False)
    assert calls
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    monkeypatch.setattr(mod, "MAX_SELECT_TOPK", 4)
    calls.clear()
    mod.select_topk(scores, 8, None, sorted=False)
    assert not calls, "topk above MAX_SELECT_TOPK must use torch.topk"
