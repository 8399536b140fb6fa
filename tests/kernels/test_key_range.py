"""ic::indexer_topk with per-query key ranges (kernels/key_range.py) == with the dense mask they come
from == the reference; on the reference path and the Triton kernel (interpreter on CPU, or CUDA).
A mask that is not one key range per query raises an error naming the "dense" option."""

import pytest
import torch

from ic_compile.kernels import _triton_utils, ops
from ic_compile.kernels.indexer_topk import indexer_scores
from ic_compile.kernels.key_range import NotAKeyRangeError, check_key_range, key_range_of, range_allowed
from ic_compile.kernels.reference import indexer_topk_ref
from ic_compile.kernels.testing import check_topk, indexer_inputs, masked_scores, repro, seed_everything

from marks import needs_cuda, needs_triton


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel output buffers start as garbage: a missed write fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def range_mask(kind: str, B: int, S: int, T: int, device="cpu") -> torch.Tensor:
    """bool [B,S,T], one contiguous run of keys (or none) per query; queries are the last S of T."""
    t = torch.arange(T, device=device)  # [T]
    last = torch.arange(S, device=device) + (T - S)  # [S] causal diagonal
    causal = t[None, None, :] <= last[None, :, None]  # [1,S,T]
    pad = torch.tensor([0, 5, T - S + 2][:B] + [3] * max(0, B - 3), device=device)  # left padding per sequence
    left_padded = causal & (t[None, None, :] >= pad[:, None, None])  # queries inside the padding: no key
    if kind == "causal":
        return causal.expand(B, S, T)
    if kind == "left_padded":
        return left_padded
    if kind == "sliding_window":  # 7 keys up to the diagonal, and the left padding
        return left_padded & (t[None, None, :] > last[None, :, None] - 7)
    if kind == "empty_rows":  # causal, every third query allows no key
        return (causal & (torch.arange(S, device=device) % 3 != 1)[None, :, None]).expand(B, S, T)
    raise ValueError(kind)


CASES = {
    # name: (mask kind, B, S, T, topk)
    "causal": ("causal", 2, 24, 24, 6),
    "left_padded": ("left_padded", 3, 20, 28, 6),
    "sliding_window": ("sliding_window", 2, 30, 40, 5),
    "empty_rows": ("empty_rows", 2, 12, 20, 4),
    "T_lt_topk": ("left_padded", 2, 10, 10, 16),
    "decode": ("left_padded", 3, 1, 50, 8),
    "decode_window": ("sliding_window", 2, 1, 70, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_key_range_of_round_trips(case):
    kind, B, S, T, _ = CASES[case]
    mask = range_mask(kind, B, S, T)
    key_range = key_range_of(mask)
    assert key_range.shape == (B, S, 3) and key_range.dtype == torch.int32
    assert torch.equal(range_allowed(key_range, T), mask)


def _op(q, k, w, topk, mask=None, key_range=None):
    return torch.ops.ic.indexer_topk(q, k, w, topk, mask, False, True, key_range=key_range)


@pytest.mark.parametrize("path", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_op_with_key_range_equals_dense_mask(case, dtype, path, request, monkeypatch):
    seed = seed_everything(request.node.name)
    monkeypatch.setenv("IC_KERNELS_TRITON", "1" if path == "triton" else "0")
    kind, B, S, T, topk = CASES[case]
    q, k, w = indexer_inputs(B, S, T, 4, 16, dtype)
    mask = range_mask(kind, B, S, T)
    by_range, by_mask = _op(q, k, w, topk, key_range=key_range_of(mask)), _op(q, k, w, topk, mask=mask)
    want = indexer_topk_ref(q, k, w, topk, mask, causal=False)
    if path == "reference":
        assert torch.equal(by_range, want) and torch.equal(by_mask, want), repro(seed)
        return
    scores = masked_scores(q.float(), k.float(), w.float(), mask, causal=False)
    for got in (by_range, by_mask):
        try:
            check_topk(got, scores, topk)
        except AssertionError as e:
            raise AssertionError(f"{e} {repro(seed)}") from None
    assert torch.equal(by_range < 0, want < 0)  # rows with fewer allowed keys than topk: same -1 slots


@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["ranges", "ranges_and_causal"])
@pytest.mark.parametrize("kw", [{}, {"num_splits": 3}, {"decode_block_s": 4}], ids=["prefill", "split", "decode"])
def test_scores_with_key_range_every_column_written(kw, causal, request):
    """The score buffer (poisoned with NaN) holds exactly the range-masked scores: tiles left of or
    right of every range in a block are skipped by the kernel and must still be -inf filled."""
    seed_everything(request.node.name)
    B, S, T = 2, 3 if "decode_block_s" in kw else 40, 90
    q, k, w = indexer_inputs(B, S, T, 4, 16)
    lo = torch.randint(0, T, (B, S))
    hi = (lo + torch.randint(0, 30, (B, S))).clamp(max=T - 1)
    count = torch.where(torch.rand(B, S) < 0.2, 0, hi - lo + 1)  # count 0: no key, whatever lo and hi say
    key_range = torch.stack((lo, hi, count), -1).int()
    row_start, n_rows = S // 3, S - S // 3
    width = T  # the chunk's causal horizon is T too: its last query is the last one
    out = torch.full((B, n_rows, width), float("nan"))
    indexer_scores(q, k, w, None, causal, row_start, n_rows, width, out, key_range=key_range, **kw)
    want = masked_scores(q, k, w, None, causal, key_range)[:, row_start:, :width]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _calls_of_kernel(monkeypatch) -> list[dict]:
    calls = []
    original = ops._indexer_topk

    def record(q, k, w, topk, mask, causal, sorted=True, key_range=None):
        calls.append({"mask": mask, "causal": causal, "key_range": key_range})
        return original(q, k, w, topk, mask, causal, sorted=sorted, key_range=key_range)

    monkeypatch.setattr(ops, "_indexer_topk", record)
    return calls


@pytest.mark.parametrize("kind,causal_flag,expected", [
    ("causal", False, (True, True)), ("full", True, (True, True)),  # plain causal: no range read
    ("left_padded", False, (False, True)), ("sliding_window", False, (False, True)),  # within: causal added
    ("sliding_window", True, (False, True)), ("full", False, (False, False))])  # past the diagonal: as given
def test_plain_causal_ranges_run_the_causal_path(kind, causal_flag, expected, monkeypatch, request):
    """Ranges that allow exactly the causal rows run the causal kernel with no range read; ranges
    within them run with the causal rule added (causal chunk widths and row lengths); others as given.
    expected: (key_range dropped, causal) of the kernel call."""
    seed_everything(request.node.name)
    calls = _calls_of_kernel(monkeypatch)
    B, S, T = 2, 8, 12
    q, k, w = indexer_inputs(B, S, T, 2, 16)
    mask = torch.ones(B, S, T, dtype=torch.bool) if kind == "full" else range_mask(kind, B, S, T)
    got = torch.ops.ic.indexer_topk(q, k, w, 4, None, causal_flag, key_range=key_range_of(mask))
    assert torch.equal(got, indexer_topk_ref(q, k, w, 4, mask, causal_flag))
    assert (calls[0]["key_range"] is None, calls[0]["causal"]) == expected


def test_non_range_mask_is_an_error_naming_the_dense_option():
    q, k, w = indexer_inputs(2, 6, 6, 2, 16)
    tree = range_mask("causal", 2, 6, 6).clone()
    tree[1, 4, 2] = False  # query 4 of sequence 1 skips key 2: two runs
    with pytest.raises(NotAKeyRangeError, match=r"not one contiguous key range per query \(query b=1, s=4 allows "
                                                r"4 keys between 0 and 4.*'indexer_mask': 'dense'"):
        _op(q, k, w, 3, key_range=key_range_of(tree))
    assert torch.equal(_op(q, k, w, 3, mask=tree), indexer_topk_ref(q, k, w, 3, tree, causal=False))
    with pytest.raises(ValueError, match="either mask or key_range, not both"):
        _op(q, k, w, 3, mask=tree, key_range=key_range_of(tree))


@pytest.mark.parametrize("kind", ["left_padded", "causal"])
def test_unchecked_ranges_run_as_given(kind, monkeypatch, request):
    """check=False (the lowering's choice under CUDA graphs): no host check (device sync) runs, and
    the kernel gets the ranges and the causal flag as given -- one path whatever the data, so a
    captured graph replays correctly -- with the reference's answer."""
    seed_everything(request.node.name)
    calls = _calls_of_kernel(monkeypatch)
    monkeypatch.setattr(ops, "check_key_range", lambda *a: pytest.fail("check_key_range ran (a device sync)"))
    B, S, T = 2, 8, 12
    q, k, w = indexer_inputs(B, S, T, 2, 16)
    mask = range_mask(kind, B, S, T)
    got = torch.ops.ic.indexer_topk(q, k, w, 4, None, False, key_range=key_range_of(mask), check=False)
    assert torch.equal(got, indexer_topk_ref(q, k, w, 4, mask, False))
    assert calls[0]["key_range"] is not None and calls[0]["causal"] is False


def test_unchecked_non_range_mask_still_fails_loudly():
    """check=False still refuses a mask that is not one key range per query: an assert on the
    device (CUDA: a device-side assert; CPU: this RuntimeError), not a silent wrong answer."""
    q, k, w = indexer_inputs(2, 6, 6, 2, 16)
    tree = range_mask("causal", 2, 6, 6).clone()
    tree[1, 4, 2] = False
    with pytest.raises(RuntimeError, match="not one contiguous key range per query.*'indexer_mask': 'dense'"):
        torch.ops.ic.indexer_topk(q, k, w, 3, None, False, key_range=key_range_of(tree), check=False)


def test_check_key_range_broadcasts_over_batch_and_queries():
    one_row = torch.tensor([[[0, 9, 10]]], dtype=torch.int32)  # [1,1,3]: every query sees keys 0..9
    assert check_key_range(one_row, 1, 10, causal=False) == (True, True)  # decode: the one query's causal row
    assert check_key_range(one_row, 4, 10, causal=False) == (False, False)  # earlier queries see past their diagonal
    assert check_key_range(one_row, 4, 10, causal=True) == (True, True)  # ... unless the op is causal anyway


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("kind,B,S,T", [("sliding_window", 2, 1024, 3000), ("left_padded", 3, 1, 20000),
                                        ("left_padded", 2, 700, 700)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_key_range_gpu(kind, B, S, T, dtype, request):
    seed = seed_everything(request.node.name)
    topk = 256
    q, k, w = indexer_inputs(B, S, T, 32, 128, dtype, device="cuda")
    mask = range_mask(kind, B, S, T, device="cuda")
    got = torch.ops.ic.indexer_topk(q, k, w, topk, None, False, False, key_range=key_range_of(mask))
    try:
        check_topk(got, masked_scores(q.float(), k.float(), w.float(), mask, causal=False), topk, ordered=False)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None
