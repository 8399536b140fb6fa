"""Indexer top-k: Triton kernel (CPU via the Triton interpreter, or CUDA) vs the torch reference.

No TRITON_INTERPRET needed: CPU tensors + use_triton=True run the kernel's interpreter twin
(see ic_compile.kernels._triton_utils), nothing global is changed.
"""

import pytest
import torch

from ic_compile.kernels import _triton_utils
from ic_compile.kernels.indexer_topk import indexer_scores, indexer_topk, indexer_topk_triton
from ic_compile.kernels.reference import indexer_topk_ref
from ic_compile.kernels.testing import (
    check_topk,
    indexer_inputs,
    masked_scores,
    repro,
    seed_everything,
)

from marks import needs_cuda, needs_triton


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel output buffers start as garbage: a missed write fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


# ----------------------------------------------------------------------------- reference

def _naive_topk(q, k, w, topk, mask, causal):
    """Row-by-row python reference of the reference (tiny shapes)."""
    B, S, H, _ = q.shape
    T = k.shape[1]
    out = torch.full((B, S, topk), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            cand = []
            for t in range(T):
                if causal and t > T - S + s:
                    continue
                if mask is not None and not bool(mask.expand(B, S, T)[b, s, t]):
                    continue
                score = sum(float(w[b, s, h]) * max(0.0, float(q[b, s, h] @ k[b, t])) for h in range(H))
                cand.append((score, t))
            cand.sort(key=lambda c: -c[0])
            for j, (_, t) in enumerate(cand[:topk]):
                out[b, s, j] = t
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S,T,topk", [(5, 5, 3), (3, 9, 4), (4, 6, 10)])
def test_reference_matches_naive(S, T, topk, causal, request):
    seed_everything(request.node.name)
    q, k, w = indexer_inputs(2, S, T, 3, 8, torch.float64)
    q, k = q + 1.0, k + 1.0  # mostly positive logits: no exact ties at relu's 0 (ties order freely)
    mask = torch.rand(2, 1, T) > 0.2
    assert torch.equal(indexer_topk_ref(q, k, w, topk, mask, causal), _naive_topk(q, k, w, topk, mask, causal))


# ----------------------------------------------------------------------------- triton (interpreter / CUDA)

def _check_against_reference(q, k, w, topk, mask=None, causal=True, seed=0, **kw):
    got = indexer_topk_triton(q, k, w, topk, mask, causal, **kw)
    assert got.shape == (q.shape[0], q.shape[1], topk) and got.dtype == torch.int32
    scores = masked_scores(q.float(), k.float(), w.float(), mask, causal)
    try:
        check_topk(got, scores, topk)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None


CASES = {
    # name: (B, S, T, H, D, topk, extra kwargs)
    "prefill_square": (2, 40, 40, 8, 32, 12, {}),  # causal edges: first rows have < topk keys
    "prefill_queries_at_end": (1, 24, 90, 8, 32, 16, {}),
    "prefill_chunked": (2, 40, 75, 8, 32, 16, {"chunk_rows": 16}),  # 3 chunks, growing width
    "prefill_split_keys": (1, 20, 100, 8, 32, 8, {"num_splits": 3}),
    "T_lt_topk": (2, 12, 12, 8, 32, 20, {}),
    "odd_heads_dims": (1, 40, 50, 6, 40, 10, {}),  # H, D not powers of two
    "more_queries_than_keys": (1, 40, 20, 16, 32, 8, {"chunk_rows": 8}),  # first chunks see no key
    "decode": (2, 1, 150, 4, 32, 32, {"num_splits": 3}),
    "decode_default_splits": (3, 1, 200, 16, 32, 24, {}),
    "decode_multi_query": (2, 4, 60, 8, 32, 16, {}),  # small S -> decode form (one program row)
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_indexer_topk_triton(case, dtype, request):
    seed = seed_everything(request.node.name)
    B, S, T, H, D, topk, kw = CASES[case]
    q, k, w = indexer_inputs(B, S, T, H, D, dtype)
    _check_against_reference(q, k, w, topk, seed=seed, **kw)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S", [1, 30])
def test_indexer_topk_triton_padding_mask(S, causal, request):
    seed = seed_everything(request.node.name)
    B, T, H, D, topk = 3, 64, 8, 32, 16
    q, k, w = indexer_inputs(B, S, T, H, D)
    lengths = torch.tensor([T, T - 17, 5])  # right padding per batch row
    mask = (torch.arange(T)[None, :] < lengths[:, None])[:, None, :]  # [B,1,T] broadcast
    _check_against_reference(q, k, w, topk, mask, causal, seed=seed)
    full = torch.rand(B, S, T) > 0.5  # arbitrary dense [B,S,T] mask
    full[0, 0] = False  # a row with no allowed key -> all -1
    _check_against_reference(q, k, w, topk, full, causal, seed=seed)


@needs_triton
def test_indexer_topk_triton_noncontiguous(request):
    seed = seed_everything(request.node.name)
    q, k, w = indexer_inputs(2, 36, 50, 8, 48)
    q, k, w = q[..., :32], k[..., 8:40], w.transpose(1, 2).contiguous().transpose(1, 2)
    _check_against_reference(q, k, w, 10, seed=seed)


@needs_triton
@pytest.mark.parametrize("kw", [{}, {"num_splits": 2}, {"decode_block_s": 2}, "head_major", "key_rows"],
                         ids=["prefill", "split", "decode", "head_major", "key_rows"])
def test_indexer_scores_every_column_written(kw, request):
    """The score buffer (poisoned with NaN) holds exactly the masked scores, -inf included."""
    seed_everything(request.node.name)
    if kw in ("head_major", "key_rows"):  # dot rows (head, query) / keys, as some GPU autotune configs use
        import triton
        kw = {"config": triton.Config({"BLOCK_S": 4, "BLOCK_T": 16, "HEAD_MAJOR": kw == "head_major",
                                       "KEY_ROWS": kw == "key_rows"})}
    B, S, T, H, D = 2, 2 if "decode_block_s" in kw else 20, 70, 8, 32
    q, k, w = indexer_inputs(B, S, T, H, D)
    mask = torch.rand(B, S, T) > 0.3
    row_start, n_rows = S // 2, S - S // 2
    width = T - S + row_start + n_rows
    out = torch.full((B, n_rows, width), float("nan"))
    indexer_scores(q, k, w, mask, True, row_start, n_rows, width, out, **kw)
    want = masked_scores(q, k, w, mask, True)[:, row_start:, :width]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("key_rows", [False, True], ids=["query_rows", "key_rows"])
@pytest.mark.parametrize("limits", ["causal", "left_padded_causal", "left_padded"])
def test_open_tiles_store_what_masked_tiles_would(limits, key_rows, request):
    """Tiles where every key is allowed for every query of the block skip the mask ("open" tiles):
    the buffer (poisoned) equals the reference, and exactly the output of a launch with an all-True
    bool mask (HAS_MASK: no open tiles, every tile masked). 18 query rows in blocks of 4 (a partial
    last block), a left padding in one batch row, keys past the diagonal."""
    import triton

    seed_everything(request.node.name)
    B, S, T = 2, 40, 100
    q, k, w = indexer_inputs(B, S, T, 8, 32)
    causal = limits != "left_padded"
    key_range = None
    if limits != "causal":
        pad = torch.tensor([0, 37])[:, None].expand(B, S)  # batch row 1: keys < 37 are padding
        key_range = torch.stack((pad, torch.full_like(pad, T - 1), T - pad), -1).int()
    row_start, n_rows = 22, 18
    width = T - S + row_start + n_rows if causal else T
    outs = []
    config = triton.Config({"BLOCK_S": 4, "BLOCK_T": 16, "HEAD_MAJOR": False, "KEY_ROWS": key_rows})
    for mask in (None, torch.ones(B, S, T, dtype=torch.bool)):  # open tiles, then every tile masked
        out = torch.full((B, n_rows, width), float("nan"))
        indexer_scores(q, k, w, mask, causal, row_start, n_rows, width, out, config=config, key_range=key_range)
        outs.append(out)
    want = masked_scores(q, k, w, None, causal, key_range)[:, row_start:row_start + n_rows, :width]
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1])


@needs_triton
def test_dispatch(request, monkeypatch):
    seed_everything(request.node.name)
    q, k, w = indexer_inputs(1, 3, 20, 4, 16)
    ref = indexer_topk(q, k, w, 5, use_triton=False)
    assert torch.equal(ref, indexer_topk_ref(q, k, w, 5))
    assert torch.equal(indexer_topk(q, k, w, 5, use_triton=True).sort(-1).values, ref.sort(-1).values)
    calls = []
    monkeypatch.setattr("ic_compile.kernels.indexer_topk.indexer_topk_triton",
                        lambda *a, **kw: calls.append(1) or ref)
    indexer_topk(q, k, w, 5)  # CPU default: reference
    assert not calls
    monkeypatch.setenv("IC_KERNELS_TRITON", "1")
    indexer_topk(q, k, w, 5)
    assert calls


# ----------------------------------------------------------------------------- real GPU

@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B,S,T,H,topk", [(2, 1024, 1024, 32, 256), (1, 300, 4096, 64, 2048),
                                          (4, 1, 20000, 32, 2048), (2, 3, 5000, 32, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_indexer_topk_gpu(B, S, T, H, topk, dtype, request):
    seed = seed_everything(request.node.name)
    q, k, w = indexer_inputs(B, S, T, H, 128, dtype, device="cuda")
    mask = None
    if B == 2:  # right padding of the second sequence
        lengths = torch.tensor([T, T - 100], device="cuda")
        mask = (torch.arange(T, device="cuda")[None, :] < lengths[:, None])[:, None, :]
    got = indexer_topk(q, k, w, topk, mask)  # CUDA -> Triton (autotuned JIT kernel)
    try:
        check_topk(got, masked_scores(q.float(), k.float(), w.float(), mask), topk)
    except AssertionError as e:
        raise AssertionError(f"{e} {repro(seed)}") from None


# ----------------------------------------------------------------------------- GPU launch path, interpreted

@needs_triton
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_gpu_configs_in_interpreter(mode, request, monkeypatch):
    """Drive the CUDA dispatch (autotuner, grid lambdas, key names, kwargs) once per sm_90
    config, with the kernel interpreted: each real block shape must give the right result."""
    from ic_compile.kernels import indexer_topk as mod

    seed = seed_everything(request.node.name)
    B, S, T, H, D, topk = (1, 12, 150, 32, 128, 16) if mode == "prefill" else (2, 1, 300, 32, 128, 16)
    q, k, w = indexer_inputs(B, S, T, H, D)
    h_pad = 32
    all_configs = mod._prefill_configs(h_pad) if mode == "prefill" else mod._decode_configs()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton.jit -> interpreter while _TUNED is rebuilt
    monkeypatch.setattr(mod, "interpreting", lambda x: False)  # take the GPU branch
    for cfg in all_configs:
        monkeypatch.setattr(mod, "_TUNED", {})
        monkeypatch.setattr(mod, f"_{mode}_configs", lambda *a, cfg=cfg: [cfg])
        with _triton_utils._jit_helpers_interpreted():
            _check_against_reference(q, k, w, topk, seed=seed)
        assert len(mod._TUNED) == 2, "the autotuned (GPU) launcher was not used"


# ----------------------------------------------------------------------------- launch shape (host side)

def test_prefill_splits_fill_whole_waves():
    """Key splits: chunks of 1280 rows at 200K (160 programs of 8 queries) and 1024 at 256K (128)
    no longer leave a third / half of the 264 program slots of 132 SMs idle (the cliff past 128K);
    256 programs (2048 rows at 128K) keep one split; narrow chunks are not split below 512 keys."""
    from ic_compile.kernels.indexer_topk import PREFILL_CTAS_PER_SM, prefill_splits

    slots = PREFILL_CTAS_PER_SM * 132
    for programs, width in ((160, 200000), (128, 262144), (256, 131072), (512, 32768), (40, 100000)):
        s = prefill_splits(programs, width, 64, 132)
        p = programs * s
        assert p / (-(-p // slots) * slots) >= 0.95, (programs, width, s)
    assert prefill_splits(256, 131072, 64, 132) == 1
    assert prefill_splits(160, 1536, 64, 132) == 3  # at most width / 512 splits: the busiest of 1-3
    assert prefill_splits(3, 300, 64, 132) == 1


def test_causal_chunk_rows():
    """Causal chunks: the 1 GiB budget, at least 2048 rows while the buffer stays under 2 GiB, at
    most 4096; not causal: the budget alone."""
    from ic_compile.kernels.indexer_topk import _chunk_rows

    assert _chunk_rows(1, 32768, 256, True) == 4096
    assert _chunk_rows(1, 131072, 256, True) == 2048
    assert _chunk_rows(1, 200000, 256, True) == 2048
    assert _chunk_rows(1, 262144, 256, True) == 2048
    assert _chunk_rows(1, 524288, 256, True) == 1024
    assert _chunk_rows(1, 200000, 256, False) == 1280


@needs_triton
@pytest.mark.parametrize("case", ["prefill_chunked", "decode", "decode_multi_query"])
def test_per_key_scale_in_the_kernel(case, request):
    """k_scale [B,T] (a model's per-key factor, DeepSeek's `fp8_index(...) * k_scale`) in the scaled
    kernel with bf16 inputs (interpreter): a valid top-k of the reference's scaled scores, any sign."""
    seed = seed_everything(request.node.name)
    B, S, T, H, D, topk, kw = CASES[case]
    q, k, w = indexer_inputs(B, S, T, H, D, torch.bfloat16)
    k_scale = torch.randn(B, T)
    scores = masked_scores(q.float(), k.float(), w.float(), None, True)  # [B,S,T], -inf = not allowed
    scores = torch.where(scores.isinf(), scores, scores * k_scale[:, None, :])
    want = scores.topk(min(topk, T), dim=-1).values  # the best scores, negatives included
    for ordered in (True, False):  # torch.topk / topk_select (signed keys)
        got = indexer_topk_triton(q, k, w, topk, k_scale=k_scale, sorted=ordered, **kw)
        picked = scores.gather(-1, got[..., :want.shape[-1]].long()).sort(-1, descending=True).values
        torch.testing.assert_close(picked, want, rtol=1e-4, atol=1e-4, msg=f"sorted={ordered} {repro(seed)}")


@needs_triton
@pytest.mark.parametrize("case", ["prefill_chunked", "more_queries_than_keys", "T_lt_topk", "decode"])
def test_picked_scores_are_the_ranked_scores(case, request):
    """scores_out (ic::indexer_topk_scored's values): each picked key's score, read back from the
    chunk's buffer before the next chunk reuses it, -inf in empty slots; equal to the reference's."""
    seed = seed_everything(request.node.name)
    B, S, T, H, D, topk, kw = CASES[case]
    q, k, w = indexer_inputs(B, S, T, H, D, torch.bfloat16)
    scores = masked_scores(q.float(), k.float(), w.float(), None, True)
    for ordered in (True, False):
        picked = torch.full((B, S, topk), 7.0)  # overwritten everywhere
        got = indexer_topk_triton(q, k, w, topk, sorted=ordered, scores_out=picked, **kw)
        want = scores.gather(-1, got.clamp(min=0).long()).masked_fill(got < 0, float("-inf"))
        torch.testing.assert_close(picked, want, rtol=1e-5, atol=1e-5, msg=f"sorted={ordered} {repro(seed)}")
    ref_picked = torch.empty(B, S, topk)
    ref = indexer_topk_ref(q, k, w, topk, scores_out=ref_picked)
    torch.testing.assert_close(ref_picked, scores.gather(-1, ref.clamp(min=0).long()).masked_fill(ref < 0, float("-inf")))
