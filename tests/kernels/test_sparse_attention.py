"""Sparse attention (MHA/GQA and MLA absorbed): Triton kernel vs the torch reference.

CPU tensors + use_triton=True run the kernel's Triton-interpreter twin; no env var needed.
"""

import pytest
import torch

from ic_compile.kernels import _triton_utils
from ic_compile.kernels.reference import sparse_attention_ref, sparse_mla_ref
from ic_compile.kernels.sparse_attention import (
    sparse_attention,
    sparse_attention_triton,
    sparse_mla,
    sparse_mla_triton,
)
from ic_compile.kernels.testing import random_indices, repro, seed_everything

from marks import needs_cuda, needs_triton
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel output buffers (and split partials) start as NaN: a missed write fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _assert_close(got, want, dtype, seed):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), f"NaN in output {repro(seed)}"
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=lambda m: f"{m} {repro(seed)}")


# ----------------------------------------------------------------------------- reference

def test_reference_dense_equivalence(request):
    """All keys selected, causal -> ordinary causal attention (queries at the end)."""
    seed_everything(request.node.name)
    B, S, T, Hq, Hk, D = 2, 5, 9, 4, 2, 8
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, T, Hk, D), torch.randn(B, T, Hk, D)
    idx = torch.arange(T, dtype=torch.int32).flip(0).expand(B, S, T)  # order must not matter
    got = sparse_attention_ref(q, k, v, idx, 0.5)
    kk, vv = k.repeat_interleave(Hq // Hk, dim=2), v.repeat_interleave(Hq // Hk, dim=2)
    allowed = torch.arange(T)[None, :] <= (T - S + torch.arange(S))[:, None]  # [S,T]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=allowed, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_no_valid_key_gives_zeros():
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    idx = torch.tensor([[[-1, -1], [3, 2]]], dtype=torch.int32)  # row 0 empty; row 1 (pos 3) fine
    out = sparse_attention_ref(q, k, v, idx, 1.0)
    assert torch.equal(out[0, 0], torch.zeros(2, 8)) and out[0, 1].abs().sum() > 0


# ----------------------------------------------------------------------------- triton: MHA / GQA

GQA_CASES = {
    # name: (B, S, T, Hq, Hk, Dqk, Dv, K, causal, num_splits)
    "gqa_prefill": (2, 6, 40, 8, 2, 24, 20, 24, True, None),  # Dqk = 16 + padded 8-wide tail
    "mha": (1, 5, 33, 4, 4, 32, 32, 20, True, None),
    "queries_at_end": (2, 4, 50, 4, 1, 32, 16, 40, True, None),  # many selected keys are in the future
    "non_causal": (2, 4, 30, 4, 2, 16, 16, 30, False, None),
    "decode_split": (2, 1, 80, 8, 2, 32, 32, 64, True, 3),
    "decode_default_split": (1, 1, 400, 16, 1, 48, 32, 300, True, None),  # 3 splits by default
    "many_heads": (1, 2, 20, 80, 1, 16, 16, 18, True, None),  # 2 head blocks per kv head
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GQA_CASES))
def test_sparse_attention_triton(case, dtype, request):
    seed = seed_everything(request.node.name)
    B, S, T, Hq, Hk, Dqk, Dv, K, causal, splits = GQA_CASES[case]
    q = torch.randn(B, S, Hq, Dqk).to(dtype)
    k, v = torch.randn(B, T, Hk, Dqk).to(dtype), torch.randn(B, T, Hk, Dv).to(dtype)
    idx = random_indices(B, S, T, K)
    scale = Dqk**-0.5
    got = sparse_attention_triton(q, k, v, idx, scale, causal, num_splits=splits)
    _assert_close(got, sparse_attention_ref(q, k, v, idx, scale, causal), dtype, seed)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2])
def test_sparse_attention_triton_empty_rows_and_int64(splits, request):
    seed = seed_everything(request.node.name)
    B, S, T, H, D, K = 2, 4, 30, 4, 16, 20
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, T, 1, D), torch.randn(B, T, 1, D)
    idx = random_indices(B, S, T, K, dtype=torch.int64)
    idx[0, 1] = -1  # no key at all
    idx[1, 0] = torch.arange(T - S + 1, T - S + 1 + K)  # only future keys -> nothing valid (causal)
    got = sparse_attention_triton(q, k, v, idx, 0.25, True, num_splits=splits)
    assert torch.equal(got[0, 1], torch.zeros(H, D)) and torch.equal(got[1, 0], torch.zeros(H, D))
    _assert_close(got, sparse_attention_ref(q, k, v, idx, 0.25, True), torch.float32, seed)


@needs_triton
def test_sparse_attention_triton_noncontiguous(request):
    seed = seed_everything(request.node.name)
    B, S, T, H, D, K = 1, 3, 25, 4, 16, 16
    qkv = torch.randn(B, T, 3, H, D)  # packed projections: strided q/k/v views
    q, k, v = qkv[:, -S:, 0], qkv[:, :, 1], qkv[:, :, 2]
    idx = random_indices(B, S, T, K).transpose(1, 2).contiguous().transpose(1, 2)
    got = sparse_attention_triton(q, k, v, idx, 0.3)
    _assert_close(got, sparse_attention_ref(q, k, v, idx, 0.3), torch.float32, seed)


# ----------------------------------------------------------------------------- triton: MLA absorbed

MLA_CASES = {
    # name: (B, S, T, H, Dl, Dr, dv, K, num_splits)   kv row = Dl + Dr, value = kv[..., :dv]
    "prefill": (2, 5, 48, 8, 32, 16, 32, 32, None),  # dv == power-of-two part -> V_FROM_K
    "dv_lt_latent": (1, 4, 40, 4, 32, 16, 16, 24, None),  # separate value load
    "decode": (2, 1, 64, 20, 32, 16, 32, 48, 4),  # H=20: padded head block
    "decode_default_split": (1, 1, 90, 16, 64, 16, 64, 80, None),
    # 16 heads x 5 splits x 128 value columns: the split merge runs 2 programs of 64 columns per head
    "decode_combine_chunks": (1, 1, 300, 16, 128, 16, 128, 256, 5),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(MLA_CASES))
def test_sparse_mla_triton(case, dtype, request):
    seed = seed_everything(request.node.name)
    B, S, T, H, Dl, Dr, dv, K, splits = MLA_CASES[case]
    q = torch.randn(B, S, H, Dl + Dr).to(dtype)
    kv = torch.randn(B, T, Dl + Dr).to(dtype)
    idx = random_indices(B, S, T, K)
    scale = (Dl + Dr) ** -0.5
    got = sparse_mla_triton(q, kv, idx, scale, dv, True, num_splits=splits)
    _assert_close(got, sparse_mla_ref(q, kv, idx, scale, dv, True), dtype, seed)


def _latent_and_rope(kv: torch.Tensor, dl: int, t_max: int | None = None):
    """kv [B,T,Dl+Dr] -> latent [B,T,Dl], rope [B,T,Dr] in two buffers like a KV cache's; t_max:
    buffers of t_max >= T positions with T filled (views [:, 0, :T] of [B,1,t_max,D]: strided)."""
    B, T, _ = kv.shape
    t_max = t_max or T
    latent_buf = torch.full((B, 1, t_max, dl), float("nan"), dtype=kv.dtype)  # unfilled rows: never read
    rope_buf = torch.full((B, 1, t_max, kv.shape[-1] - dl), float("nan"), dtype=kv.dtype)
    latent_buf[:, 0, :T], rope_buf[:, 0, :T] = kv[..., :dl], kv[..., dl:]
    return latent_buf[:, 0, :T], rope_buf[:, 0, :T]


# name: (B, S, T, H, Dl, Dr, dv, K, num_splits, t_max)   rope apart: kv = latent [B,T,Dl], rope [B,T,Dr]
ROPE_CASES = {
    "prefill": (2, 5, 48, 8, 32, 16, 32, 32, 1, None),  # V_FROM_K: value = the latent tile
    "decode_split": (2, 1, 64, 20, 32, 16, 32, 48, 4, None),
    "decode_default_split": (1, 1, 90, 16, 64, 16, 64, 80, None, None),
    "cache_views": (2, 1, 40, 8, 32, 16, 32, 30, 2, 56),  # strided views of longer cache buffers
    "dv_lt_latent": (1, 4, 40, 4, 32, 16, 16, 24, 1, 50),  # separate value load
    "cat_fallback": (2, 3, 40, 4, 24, 8, 24, 24, 2, 50),  # Dl = 24 not the power-of-two part of 32
}


def _query_parts(q: torch.Tensor, dl: int):
    """q [B,S,H,Dl+Dr] -> q [B,S,H,Dl], q_rope [B,S,H,Dr], as the absorbed lowering has them: an
    einsum's output and a transposed view of the projected query (strided)."""
    q_rope = q[..., dl:].transpose(1, 2).contiguous().transpose(1, 2)  # [B,S,H,Dr], strides of [B,H,S,Dr]
    return q[..., :dl].contiguous(), q_rope


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("apart", ["kv", "q", "q_and_kv"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_sparse_mla_triton_rope_apart_equals_concatenated(case, apart, dtype, request):
    """Latent and rope in two (cache) buffers, and/or the query's latent and rope parts in two
    tensors, give the same output as their concatenations, bit for bit: the kernel reads the
    same split (D_A = Dl, D_B = Dr) from two pointers."""
    seed = seed_everything(request.node.name)
    B, S, T, H, Dl, Dr, dv, K, splits, t_max = ROPE_CASES[case]
    q = torch.randn(B, S, H, Dl + Dr).to(dtype)
    kv = torch.randn(B, T, Dl + Dr).to(dtype)
    latent, rope = _latent_and_rope(kv, Dl, t_max) if "kv" in apart else (kv, None)
    q_in, q_rope = _query_parts(q, Dl) if "q" in apart else (q, None)
    idx = random_indices(B, S, T, K)
    scale = (Dl + Dr) ** -0.5
    got = sparse_mla_triton(q_in, latent, idx, scale, dv, True, num_splits=splits, rope=rope, q_rope=q_rope)
    assert torch.equal(got, sparse_mla_triton(q, kv, idx, scale, dv, True, num_splits=splits)), repro(seed)
    _assert_close(got, sparse_mla_ref(q, kv, idx, scale, dv, True), dtype, seed)


@needs_triton
def test_sparse_mla_rope_apart_reads_no_concatenation(monkeypatch, request):
    """Dl the power-of-two part: no torch.cat (at decode it would copy the whole cache);
    otherwise (the fallback) exactly one."""
    seed_everything(request.node.name)
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **kw: cats.append(1) or real_cat(*a, **kw))
    q, idx = torch.randn(1, 1, 4, 48), random_indices(1, 1, 30, 16)
    sparse_mla_triton(q, torch.randn(1, 30, 32), idx, 0.2, 32, rope=torch.randn(1, 30, 16))
    assert cats == []
    sparse_mla_triton(q, torch.randn(1, 30, 40), idx, 0.2, 32, rope=torch.randn(1, 30, 8))
    assert cats == [1]


def test_reference_rope_apart_equals_concatenated(request):
    seed_everything(request.node.name)
    kv = torch.randn(2, 30, 48)
    latent, rope = _latent_and_rope(kv, 32, t_max=40)
    q, idx = torch.randn(2, 3, 4, 48), random_indices(2, 3, 30, 20)
    assert torch.equal(sparse_mla_ref(q, latent, idx, 0.2, 32, rope=rope), sparse_mla_ref(q, kv, idx, 0.2, 32))
    q_latent, q_rope = _query_parts(q, 32)
    assert torch.equal(sparse_mla_ref(q_latent, latent, idx, 0.2, 32, rope=rope, q_rope=q_rope),
                       sparse_mla_ref(q, kv, idx, 0.2, 32))


@needs_triton
def test_dispatch(request):
    seed = seed_everything(request.node.name)
    q, kv = torch.randn(1, 2, 4, 48), torch.randn(1, 10, 48)
    idx = random_indices(1, 2, 10, 8)
    ref = sparse_mla(q, kv, idx, 0.2, 32)  # CPU default -> reference
    assert torch.equal(ref, sparse_mla_ref(q, kv, idx, 0.2, 32))
    _assert_close(sparse_mla(q, kv, idx, 0.2, 32, use_triton=True), ref, torch.float32, seed)
    k, v = kv[:, :, None], kv[:, :, None, :32]
    _assert_close(sparse_attention(q, k, v, idx, 0.2, use_triton=True), ref, torch.float32, seed)
    latent, rope = _latent_and_rope(kv, 32)
    assert torch.equal(sparse_mla(q, latent, idx, 0.2, 32, rope=rope), ref)
    _assert_close(sparse_mla(q, latent, idx, 0.2, 32, use_triton=True, rope=rope), ref, torch.float32, seed)


# ----------------------------------------------------------------------------- real GPU

@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B,S,T,H,K", [(1, 256, 4096, 64, 2048), (2, 64, 3000, 20, 2048), (8, 1, 8192, 64, 2048),
                                       (1, 1, 70000, 128, 2048)])
def test_sparse_mla_gpu(B, S, T, H, K, request):
    seed = seed_everything(request.node.name)
    q = torch.randn(B, S, H, 576, device="cuda").bfloat16()
    kv = torch.randn(B, T, 576, device="cuda").bfloat16()
    idx = random_indices(B, S, T, min(K, T), device="cuda")
    want = sparse_mla_ref(q, kv, idx, 576**-0.5, 512)
    _assert_close(sparse_mla(q, kv, idx, 576**-0.5, 512), want, torch.bfloat16, seed)
    # the KV cache's layout: latent and rope in two buffers (here of T + 100 positions), read apart
    latent = torch.empty(B, 1, T + 100, 512, device="cuda", dtype=torch.bfloat16)
    rope = torch.empty(B, 1, T + 100, 64, device="cuda", dtype=torch.bfloat16)
    latent[:, 0, :T], rope[:, 0, :T] = kv[..., :512], kv[..., 512:]
    got = sparse_mla(q, latent[:, 0, :T], idx, 576**-0.5, 512, rope=rope[:, 0, :T])
    _assert_close(got, want, torch.bfloat16, f"{seed} (rope apart)")
    q_latent, q_rope = _query_parts(q, 512)
    got = sparse_mla(q_latent, latent[:, 0, :T], idx, 576**-0.5, 512, rope=rope[:, 0, :T], q_rope=q_rope)
    _assert_close(got, want, torch.bfloat16, f"{seed} (q and kv rope apart)")


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("H,splits", [(20, 1), (64, 1), (20, 4)], ids=["h20", "h64", "h20_decode_split"])
def test_every_mla_config_on_gpu(H, splits, request):
    """Each autotune candidate launched on its own: the autotuner may pick any of them."""
    from ic_compile.kernels.sparse_attention import _block_h_candidates, _configs

    _check_mla_configs_on_gpu(_configs(576, _block_h_candidates(H)), H, splits, request)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("H,splits", [(20, 1), (64, 1), (20, 4)], ids=["h20", "h64", "h20_decode_split"])
def test_three_stage_mla_configs_on_gpu(H, splits, request):
    """The 3-stage wide-key configs (double-buffered gathers): right, but not autotune candidates,
    since they did not win in bench/sweep_sparse_mla.py (kernels/sparse_attention._configs)."""
    import triton

    from ic_compile.kernels.sparse_attention import _block_h_candidates, _configs

    configs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=3)
               for c in _configs(576, _block_h_candidates(H))]
    _check_mla_configs_on_gpu(configs, H, splits, request)


def _check_mla_configs_on_gpu(configs, H: int, splits: int, request) -> None:
    from triton.runtime.errors import OutOfResources

    seed = seed_everything(request.node.name)
    S = 1 if splits > 1 else 64
    q = torch.randn(2, S, H, 576, device="cuda").bfloat16()
    kv = torch.randn(2, 3000, 576, device="cuda").bfloat16()
    idx = random_indices(2, S, 3000, 2048, device="cuda")
    want = sparse_mla_ref(q, kv, idx, 576**-0.5, 512)
    launched = 0
    for cfg in configs:
        try:
            got = sparse_mla_triton(q, kv, idx, 576**-0.5, 512, num_splits=splits, config=cfg)
        except OutOfResources:
            continue  # the autotuner skips these too
        _assert_close(got, want, torch.bfloat16, f"{seed} config {cfg}")
        launched += 1
    assert launched, "no launch config fits this GPU"


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,S,T,Hq,Hk,D,K", [(2, 128, 2048, 32, 4, 128, 512), (4, 1, 5000, 16, 16, 192, 1024)])
def test_sparse_attention_gpu(B, S, T, Hq, Hk, D, K, dtype, request):
    seed = seed_everything(request.node.name)
    q = torch.randn(B, S, Hq, D, device="cuda").to(dtype)
    k, v = torch.randn(B, T, Hk, D, device="cuda").to(dtype), torch.randn(B, T, Hk, 128, device="cuda").to(dtype)
    idx = random_indices(B, S, T, K, device="cuda")
    got = sparse_attention(q, k, v, idx, D**-0.5)
    _assert_close(got, sparse_attention_ref(q, k, v, idx, D**-0.5), dtype, seed)


# ----------------------------------------------------------------------------- GPU launch path, interpreted

@needs_triton
@pytest.mark.parametrize("layout", ["mla", "mla_rope_apart", "gqa"])
def test_gpu_configs_in_interpreter(layout, request, monkeypatch):
    """Drive the CUDA dispatch (autotuner, grid lambdas, key names, kwargs) once per sm_90
    config, with the kernel interpreted: each real block shape must give the right result."""
    from ic_compile.kernels import sparse_attention as mod

    seed = seed_everything(request.node.name)
    if layout.startswith("mla"):  # real MLA dims: 576 = 512 + 64, dv 512, H = 20 (one padded head block)
        B, S, T, H, K = 1, 2, 100, 20, 70
        q, kv = torch.randn(B, S, H, 576).bfloat16(), torch.randn(B, T, 576).bfloat16()
        idx = random_indices(B, S, T, K)
        apart = layout == "mla_rope_apart"  # the lowering's layout: q and kv each in two parts
        latent, rope = _latent_and_rope(kv, 512, t_max=T + 20) if apart else (kv, None)
        q_in, q_rope = _query_parts(q, 512) if apart else (q, None)
        run = lambda: sparse_mla_triton(q_in, latent, idx, 576**-0.5, 512, rope=rope, q_rope=q_rope)  # noqa: E731
        want = sparse_mla_ref(q, kv, idx, 576**-0.5, 512)
        dtotal, G = 576, H
    else:
        B, S, T, Hq, Hk, D, K = 1, 2, 60, 8, 2, 192, 40
        q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, T, Hk, D), torch.randn(B, T, Hk, 128)
        idx = random_indices(B, S, T, K)
        run = lambda: sparse_attention_triton(q, k, v, idx, D**-0.5, num_splits=2)  # noqa: E731
        want = sparse_attention_ref(q, k, v, idx, D**-0.5)
        dtotal, G = D, Hq // Hk
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton.jit -> interpreter while _TUNED is rebuilt
    monkeypatch.setattr(mod, "interpreting", lambda x: False)  # take the GPU branch
    for cfg in mod._configs(dtotal, mod._block_h_candidates(G)):
        monkeypatch.setattr(mod, "_TUNED", {})
        monkeypatch.setattr(mod, "_configs", lambda *a, cfg=cfg: [cfg])
        with _triton_utils._jit_helpers_interpreted():
            _assert_close(run(), want, q.dtype, seed)
        assert (dtotal > 256, mod._block_h_candidates(G)) in mod._TUNED, "the autotuned (GPU) launcher was not used"
