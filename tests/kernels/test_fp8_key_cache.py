"""The fp8 key cache (kernels/fp8_key_cache.py): an e4m3 copy of a key cache, written row by row as the
model writes its own, gives the op the answer of quantising every key on every call."""

import pytest
import torch

import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic
from ic_compile.kernels import _triton_utils
from ic_compile.kernels.fp8_indexer import quantize_rows
from ic_compile.kernels.fp8_key_cache import fp8_key_mirror
from ic_compile.kernels.indexer_topk import indexer_topk
from ic_compile.kernels.testing import seed_everything

from marks import needs_cuda, needs_triton

B_MAX, T_MAX, H, D, TOPK = 3, 48, 4, 32, 8


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _writes(prompt=20, steps=8, batch=2):
    """(positions [n], keys [batch, n, D]) of a prefill and `steps` decode steps."""
    yield torch.arange(prompt), torch.randn(batch, prompt, D, dtype=torch.bfloat16)
    for t in range(steps):
        yield torch.tensor([prompt + t]), torch.randn(batch, 1, D, dtype=torch.bfloat16)


def _steps(device, use_triton):
    """Each step's indices two ways: from the mirror (only the new rows quantised) and from the
    written bf16 cache quantised whole."""
    cache = torch.zeros(B_MAX, T_MAX, D, dtype=torch.bfloat16, device=device)
    for positions, new in _writes():
        positions, new = positions.to(device), new.to(device)
        b, n, T = new.shape[0], new.shape[1], int(positions[-1]) + 1
        cache[:b].index_copy_(1, positions, new)
        q = torch.randn(b, n, H, D, dtype=torch.bfloat16, device=device)
        w = torch.rand(b, n, H, device=device)
        keys = cache[:b, :T]
        k8, scales = fp8_key_mirror(keys, new, positions)
        yield (indexer_topk(q, k8, w, TOPK, use_triton=use_triton, indexer_precision="fp8", k_scale=scales),
               indexer_topk(q, keys, w, TOPK, use_triton=use_triton, indexer_precision="fp8"), keys, k8, scales)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
def test_mirror_gives_the_per_call_answer(request, use_triton):
    """Prefill + 8 decode steps: same indices, and each mirror row is quantize_rows of the cache row."""
    seed_everything(request.node.name)
    for step, (got, want, keys, k8, scales) in enumerate(_steps("cpu", use_triton)):
        assert torch.equal(got, want), f"step {step}"
        k8_want, scales_want = quantize_rows(keys)
        assert torch.equal(k8.view(torch.uint8), k8_want.view(torch.uint8)) and torch.equal(scales, scales_want)


@pytest.mark.gpu
@needs_cuda
def test_mirror_gives_the_per_call_answer_on_gpu(request):
    seed_everything(request.node.name)
    for step, (got, want, *_) in enumerate(_steps("cuda", None)):
        assert torch.equal(got, want), f"step {step}"


def test_op_reads_the_mirror():
    """ic::indexer_topk with new_keys: the scores come from the mirror, so a cache row changed behind
    its back (never written through the op) does not change the answer; without them, it does."""
    torch.manual_seed(0)
    cache = torch.zeros(1, 16, D)
    new = torch.randn(1, 10, D)
    cache[:, :10] = new
    q, w = torch.randn(1, 1, H, D), torch.rand(1, 1, H)
    args = (q, cache[:, :10], w, 4, None, True, True)
    cached = torch.ops.ic.indexer_topk(*args, indexer_precision="fp8", new_keys=new, new_key_pos=torch.arange(10))
    cache[:, :10] = -new  # behind the mirror's back
    again = torch.ops.ic.indexer_topk(*args, indexer_precision="fp8", new_keys=new[:, :0],
                                      new_key_pos=torch.arange(0))
    fresh = torch.ops.ic.indexer_topk(*args, indexer_precision="fp8")
    assert torch.equal(cached, again) and not torch.equal(cached, fresh)


def test_a_missed_write_is_an_error():
    """Rows 0-9 through the mirror, row 10 not (an uncompiled step), then row 11: an error, not stale keys."""
    cache = torch.zeros(1, 16, D)
    fp8_key_mirror(cache[:, :10], torch.randn(1, 10, D), torch.arange(10))
    with pytest.raises(RuntimeError, match="did not go through the compiled graph"):
        fp8_key_mirror(cache[:, :12], torch.randn(1, 1, D), torch.tensor([11]))
    fp8_key_mirror(cache[:, :4], torch.randn(1, 4, D), torch.arange(4))  # a new prompt from row 0 is fine


def test_one_mirror_per_cache():
    first, second = torch.zeros(1, 8, D), torch.zeros(1, 8, D)
    k8_first, _ = fp8_key_mirror(first, torch.ones(1, 2, D), torch.arange(2))
    k8_second, _ = fp8_key_mirror(second, -torch.ones(1, 2, D), torch.arange(2))
    assert k8_first.data_ptr() != k8_second.data_ptr()
    assert k8_first[0, :2].float().min() > 0 > k8_second[0, :2].float().max()


@pytest.mark.parametrize("make_keys,new_shape,message", [
    (lambda c: c[:, 4:], (1, 1, D), r"not a \[:B, :T\] view"),
    (lambda c: c.transpose(0, 1), (1, 1, D), r"not a \[:B, :T\] view"),
    (lambda c: c, (1, 1, D + 1), r"do not fit the key cache \[2, 16, 32\]"),
    (lambda c: c, (3, 1, D), r"do not fit the key cache"),
])
def test_bad_layouts_are_errors(make_keys, new_shape, message):
    cache = torch.zeros(2, 16, D)
    with pytest.raises(ValueError, match=message):
        fp8_key_mirror(make_keys(cache), torch.randn(new_shape), torch.tensor([0]))


def test_new_keys_need_fp8():
    q, cache, w = torch.randn(1, 1, H, D), torch.zeros(1, 8, D), torch.rand(1, 1, H)
    with pytest.raises(ValueError, match=r"new_keys \(the op's fp8 copy of a key cache\) needs indexer_precision"):
        torch.ops.ic.indexer_topk(q, cache, w, 4, new_keys=torch.randn(1, 1, D), new_key_pos=torch.tensor([0]))
