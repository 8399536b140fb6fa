"""Sparse MLA with keys as the tensor-core rows (kernels/sparse_mla_keys_major.py) vs the reference."""

import pytest
import torch

from ic_compile.kernels import _triton_utils
from ic_compile.kernels.reference import sparse_mla_ref
from ic_compile.kernels.sparse_mla_keys_major import sparse_mla_keys_major, supports
from ic_compile.kernels.testing import random_indices, repro, seed_everything

from marks import needs_cuda, needs_triton

pytestmark = needs_triton
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _check(q, kv, idx, dv, causal, seed):
    scale = q.shape[-1] ** -0.5
    got = sparse_mla_keys_major(q, kv, idx, scale, dv, causal)
    want = sparse_mla_ref(q, kv, idx, scale, dv, causal)
    assert got.dtype == want.dtype and got.shape == want.shape and not torch.isnan(got).any(), repro(seed)
    torch.testing.assert_close(got.float(), want.float(), **TOL[q.dtype], msg=lambda m: f"{m} {repro(seed)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,S,T,H,Dl,Dr,K,causal", [
    (2, 5, 48, 8, 32, 16, 32, True),  # -1 slots (random_indices), causal drops later keys
    (1, 6, 30, 20, 32, 16, 16, True),  # 20 heads: padded head block
    (1, 3, 40, 70, 32, 16, 24, False),  # three head blocks (32 + 32 + 6), not causal
    (2, 1, 64, 3, 64, 8, 48, True),  # decode-shaped query, short rope tail
], ids=["prefill", "h20", "two_head_blocks", "one_query"])
def test_matches_reference(B, S, T, H, Dl, Dr, K, causal, dtype, request):
    seed = seed_everything(request.node.name)
    q = torch.randn(B, S, H, Dl + Dr).to(dtype)
    kv = torch.randn(B, T, Dl + Dr).to(dtype)
    _check(q, kv, random_indices(B, S, T, K), Dl, causal, seed)


def test_rows_without_keys_are_zero_and_int64_indices(request):
    seed = seed_everything(request.node.name)
    q, kv = torch.randn(1, 4, 4, 48), torch.randn(1, 12, 48)
    idx = random_indices(1, 4, 12, 8, dtype=torch.int64)
    idx[0, 1] = -1
    _check(q, kv, idx, 32, True, seed)
    assert not sparse_mla_keys_major(q, kv, idx, 0.1, 32)[0, 1].any()


def test_supports_only_values_that_are_the_leading_power_of_two():
    q, kv = torch.randn(1, 1, 2, 576), torch.randn(1, 3, 576)
    assert supports(q, kv, 512) and not supports(q, kv, 256)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B,S,T,H", [(1, 256, 4096, 20), (2, 64, 3000, 16), (1, 128, 20000, 32)])
def test_gpu_matches_reference(B, S, T, H, request):
    seed = seed_everything(request.node.name)
    q = torch.randn(B, S, H, 576, device="cuda").bfloat16()
    kv = torch.randn(B, T, 576, device="cuda").bfloat16()
    _check(q, kv, random_indices(B, S, T, 2048, device="cuda"), 512, True, seed)
