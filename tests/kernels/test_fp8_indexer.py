"""FP8 indexer (indexer_precision="fp8"): quantisation, pure-torch reference, Triton kernel
(CPU interpreter: triton's interpreter runs e4m3 dots; and the GPU) against that reference."""

import pytest
import torch

from ic_compile.kernels import _triton_utils
from ic_compile.kernels.fp8_indexer import FP8_DTYPE, FP8_MAX, fp8_indexer_scores_ref, quantize_indexer, quantize_rows
from ic_compile.kernels.indexer_topk import indexer_scores, indexer_topk
from ic_compile.kernels.reference import indexer_scores_ref, indexer_topk_ref
from ic_compile.kernels.testing import check_topk, indexer_inputs, masked_scores, repro, seed_everything

from marks import needs_cuda, needs_triton


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _fp8_masked(q, k, w, causal=True, mask=None, key_range=None):
    return masked_scores(q, k, w, mask, causal, key_range, indexer_precision="fp8")


def test_quantize_rows(request):
    seed_everything(request.node.name)
    x = torch.randn(3, 5, 128) * torch.rand(3, 5, 1) * 10
    x[0, 0] = 0  # an all-zero row: scale clamped (1e-4 / 448), values 0
    x8, s = quantize_rows(x)
    assert x8.dtype == FP8_DTYPE and x8.shape == x.shape and s.shape == (3, 5)
    torch.testing.assert_close(s, x.abs().amax(-1).clamp_min(1e-4) / FP8_MAX)
    assert float(x8.float().abs().amax()) <= FP8_MAX
    back = x8.float() * s[..., None]
    assert float((back - x).norm() / x.norm()) < 0.04  # e4m3: 3 mantissa bits
    assert float(back[0, 0].abs().max()) == 0.0


def test_reference_is_the_dequantised_indexer(request):
    """fp8 scores = the bf16 indexer's function of the dequantised q and k (ReLU commutes with the
    positive scales), and close to the unquantised scores."""
    seed_everything(request.node.name)
    q, k, w = indexer_inputs(2, 6, 30, 4, 64, torch.bfloat16)
    q8, k8, wq, ks = quantize_indexer(q, k, w)
    _, qs = quantize_rows(q)
    deq = indexer_scores_ref(q8.float() * qs[..., None], k8.float() * ks[..., None], w.float())
    got = fp8_indexer_scores_ref(q, k, w)
    torch.testing.assert_close(got, deq, rtol=1e-4, atol=1e-5)
    exact = indexer_scores_ref(q, k, w)
    assert float((got - exact).norm() / exact.norm()) < 0.05
    assert torch.allclose(wq, w.float() * qs)


def test_reference_topk_and_op(request):
    """indexer_topk_ref(indexer_precision="fp8") = torch.topk of the fp8 scores; the op takes the option
    (CPU: the reference) and rejects unknown precisions."""
    import ic_compile.kernels.ops  # noqa: F401  registers torch.ops.ic

    seed_everything(request.node.name)
    q, k, w = indexer_inputs(1, 10, 40, 4, 32, torch.bfloat16)
    got = indexer_topk_ref(q, k, w, 8, indexer_precision="fp8")
    check_topk(got, _fp8_masked(q, k, w), 8)
    assert torch.equal(torch.ops.ic.indexer_topk(q, k, w, 8, indexer_precision="fp8"), got)
    assert torch.equal(torch.ops.ic.indexer_topk(q, k, w, 8), indexer_topk_ref(q, k, w, 8))
    with pytest.raises(ValueError, match="indexer_precision"):
        indexer_topk(q, k, w, 8, indexer_precision="fp4")


@needs_triton
@pytest.mark.parametrize("form", ["query_rows", "key_rows", "decode"])
def test_fp8_scores_interpreted(form, request):
    """The fp8 kernel (interpreted e4m3 dots) writes exactly the masked fp8 reference scores, in the
    dot layouts the GPU uses (keys as the dot's rows: the prefill configs) and the decode form."""
    import triton

    seed_everything(request.node.name)
    B, S, T, H, D = 2, 2 if form == "decode" else 20, 70, 8, 32
    q, k, w = indexer_inputs(B, S, T, H, D, torch.bfloat16)
    mask = torch.rand(B, S, T) > 0.3
    q8, k8, wq, ks = quantize_indexer(q, k, w)
    kw = {"decode_block_s": 2} if form == "decode" else {"num_splits": 2}
    if form == "key_rows":
        kw["config"] = triton.Config({"BLOCK_S": 4, "BLOCK_T": 16, "HEAD_MAJOR": False, "KEY_ROWS": True})
    row_start, n_rows = S // 2, S - S // 2
    width = T - S + row_start + n_rows
    out = torch.full((B, n_rows, width), float("nan"))
    indexer_scores(q8, k8, wq, mask, True, row_start, n_rows, width, out, k_scale=ks, **kw)
    want = _fp8_masked(q, k, w, True, mask)[:, row_start:, :width]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unordered"])
def test_fp8_topk_interpreted(sorted_, request):
    """indexer_topk(indexer_precision="fp8") through the Triton path: chunked causal prefill with a
    key range (left padding), top-k = the fp8 reference's (ties aside)."""
    seed = seed_everything(request.node.name)
    B, S, T = 2, 24, 60
    q, k, w = indexer_inputs(B, S, T, 8, 32, torch.bfloat16)
    pad = torch.tensor([0, 9])[:, None].expand(B, S)
    key_range = torch.stack((pad, torch.full_like(pad, T - 1), T - pad), -1).int()
    got = indexer_topk(q, k, w, 10, causal=True, use_triton=True, sorted=sorted_, key_range=key_range,
                       indexer_precision="fp8")
    try:
        check_topk(got, _fp8_masked(q, k, w, True, None, key_range), 10, ordered=sorted_)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B,S,T,topk", [(1, 2048, 2048, 256), (2, 300, 5000, 2048), (2, 1, 20000, 2048)],
                         ids=["prefill", "queries_at_end", "decode"])
def test_fp8_indexer_gpu(B, S, T, topk, request):
    """e4m3 tensor-core dots (wgmma on Hopper) vs the fp32 reference of the same quantised values:
    scores close (only the accumulation differs), top-k sets equal up to near-ties."""
    seed = seed_everything(request.node.name)
    q, k, w = indexer_inputs(B, S, T, 32, 128, torch.bfloat16, device="cuda")
    want = _fp8_masked(q, k, w)
    got = indexer_topk(q, k, w, topk, sorted=False, indexer_precision="fp8")
    try:
        check_topk(got, want, topk, rel_tol=2e-3, ordered=False)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None
    if S > 1:
        q8, k8, wq, ks = quantize_indexer(q, k, w)
        out = torch.empty(B, S, T, device="cuda")
        indexer_scores(q8, k8, wq, None, True, 0, S, T, out, k_scale=ks)
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(out), fin)
        assert float((out[fin] - want[fin]).norm() / want[fin].norm()) < 1e-3


def test_prequantised_inputs_are_taken_as_they_are(request):
    """e4m3 q and k with key scales (a model that quantised them itself, DeepSeek's fp8_index) are not
    quantised again: the op's fp8 scores are Σ_h w·ReLU(q8·k8) · k_scale on those very values."""
    seed_everything(request.node.name)
    q, k, w = indexer_inputs(1, 4, 24, 4, 32, torch.float32)
    q8, k8, k_scale = q.to(FP8_DTYPE), k.to(FP8_DTYPE), torch.rand(1, 24) + 0.5
    got_q, got_k, got_w, got_scale = quantize_indexer(q8, k8, w, k_scale)
    assert got_q is q8 and got_k is k8 and got_scale is k_scale and torch.equal(got_w, w.float())
    want = indexer_scores_ref(q8.float(), k8.float(), w) * k_scale[:, None, :]
    ids = indexer_topk_ref(q8, k8, w, 6, causal=False, indexer_precision="fp8", k_scale=k_scale)
    torch.testing.assert_close(ids, want.topk(6, dim=-1).indices.int())


def test_per_key_factor_on_unquantised_keys(request):
    """fp8 with a k_scale on bf16 keys (a model's per-key factor on the scores): k is quantised as
    usual and the factor multiplies its scales, so the scores are the factor times the fp8 scores."""
    seed_everything(request.node.name)
    q, k, w = indexer_inputs(1, 4, 24, 4, 32, torch.bfloat16)
    factor = torch.randn(1, 24)
    _, k8, _, scales = quantize_indexer(q, k, w, factor)
    _, k8_plain, _, scales_plain = quantize_indexer(q, k, w)
    assert torch.equal(k8.view(torch.uint8), k8_plain.view(torch.uint8))
    torch.testing.assert_close(scales, scales_plain * factor)
