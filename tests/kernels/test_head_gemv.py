"""kernels/head_gemv.py (the Triton kernel in the interpreter) == reference.head_gemv_ref == an einsum per
form: both forms, 1-4 tokens, output and K tails, the weights as the strided head slices of an MLA kv_b
weight; inputs the kernel does not take are refused with the reason; the custom op's schema and fake."""

import pytest
import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic.*)
from ic_compile.kernels import _triton_utils
from ic_compile.kernels.head_gemv import MAX_TOKENS, head_gemv, head_gemv_triton
from ic_compile.kernels.reference import head_gemv_ref
from ic_compile.kernels.testing import repro, seed_everything

from marks import needs_cuda, needs_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
H, DN, DV, DL = 3, 24, 40, 48  # heads, nope / value dims, latent width: no dim a multiple of a block


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs start as NaN: an output the kernel misses fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _kv_b(dtype, device="cpu"):
    """An MLA kv_b weight viewed per head: [H, dn+dv, Dl]; its [:, :dn] slice is W_UK (transposed form,
    x of width dn), its [:, dn:] slice W_UV (row form, x of width Dl)."""
    return (torch.randn(H * (DN + DV), DL, device=device) * DL**-0.5).to(dtype).view(H, DN + DV, DL)


def _forms(weight):
    return {"uk_transposed": (weight[:, :DN], True, DN), "uv_rows": (weight[:, DN:], False, DL)}


def _assert_close(got, want, dtype, seed, what=""):
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), (got.shape, want.shape)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=lambda m: f"{m} {what} {repro(seed)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_is_a_product_per_head(dtype, request):
    seed = seed_everything(request.node.name)
    for name, (w, transposed, K) in _forms(_kv_b(dtype)).items():
        x = torch.randn(2, H, K).to(dtype)
        want = torch.stack([torch.stack([(w[h].float().T if transposed else w[h].float()) @ x[t, h].float()
                                         for h in range(H)]) for t in range(2)]).to(dtype)
        _assert_close(head_gemv_ref(x, w, transposed), want, dtype, seed, name)


@needs_triton
@pytest.mark.parametrize("T", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(dtype, T, request):
    seed = seed_everything(request.node.name)
    for name, (w, transposed, K) in _forms(_kv_b(dtype)).items():
        x = torch.randn(T, H, K).to(dtype)
        _assert_close(head_gemv(x, w, transposed, use_triton=True), head_gemv_ref(x, w, transposed), dtype, seed,
                      name)


@needs_triton
def test_triton_small_tiles_strided_x(request):
    """Several K steps and output blocks per head; x a view with head and token strides of its own."""
    seed = seed_everything(request.node.name)
    for name, (w, transposed, K) in _forms(_kv_b(torch.bfloat16)).items():
        x = torch.randn(2, H + 1, 2 * K).bfloat16()[:, 1:, :K]  # [T,H,K], row strides not K
        want = head_gemv_ref(x, w, transposed)
        for tile in [(16, 16), (4, 32)]:
            _assert_close(head_gemv_triton(x, w, transposed, tile=tile), want, torch.bfloat16, seed, f"{name} {tile}")


def test_rejects_what_the_kernel_does_not_take():
    w = _kv_b(torch.float32)[:, DN:]  # [H, dv, Dl]
    with pytest.raises(ValueError, match="not \\[H,N,K\\]"):
        head_gemv(torch.randn(1, H, DL - 1), w, use_triton=False)
    with pytest.raises(ValueError, match="not \\[H,K,N\\]"):
        head_gemv(torch.randn(1, H, DL), w, transposed=True, use_triton=False)
    with pytest.raises(ValueError, match="dtype"):
        head_gemv(torch.randn(1, H, DL).bfloat16(), w, use_triton=False)
    with pytest.raises(ValueError, match="must be \\[T,H,K\\]"):
        head_gemv(torch.randn(H, DL), w, use_triton=False)
    with pytest.raises(ValueError, match="unit stride"):
        head_gemv_triton(torch.randn(1, H, DL), w.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS}"):
        head_gemv_triton(torch.randn(MAX_TOKENS + 1, H, DL), w)


def test_more_rows_than_the_kernel_takes_use_the_reference():
    w = _kv_b(torch.float32)[:, DN:]
    x = torch.randn(MAX_TOKENS + 2, H, DL)
    _assert_close(head_gemv(x, w, use_triton=True), head_gemv_ref(x, w), torch.float32, 0)


def test_schema_and_opcheck(request):
    seed_everything(request.node.name)
    assert str(torch.ops.ic.head_gemv.default._schema) == "ic::head_gemv(Tensor x, Tensor w, bool transposed) -> Tensor"
    for w, transposed, K in _forms(_kv_b(torch.float32)).values():
        torch.library.opcheck(torch.ops.ic.head_gemv.default, (torch.randn(2, H, K), w, transposed))


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("T", [1, 4])
def test_glm_shapes_gpu(T, request):
    """GLM-4.7-Flash's absorbed products (20 heads, dn 192, dv 256, Dl 512) vs the einsums the model
    ran before (cuBLAS)."""
    seed = seed_everything(request.node.name)
    heads, dn, dv, dl = 20, 192, 256, 512
    weight = (torch.randn(heads * (dn + dv), dl, device="cuda") * dl**-0.5).bfloat16().view(heads, dn + dv, dl)
    q, o = torch.randn(T, heads, dn, device="cuda").bfloat16(), torch.randn(T, heads, dl, device="cuda").bfloat16()
    _assert_close(torch.ops.ic.head_gemv(q, weight[:, :dn], True), torch.einsum("thd,hdc->thc", q, weight[:, :dn]),
                  torch.bfloat16, seed, "W_UK")
    _assert_close(torch.ops.ic.head_gemv(o, weight[:, dn:], False), torch.einsum("thc,hvc->thv", o, weight[:, dn:]),
                  torch.bfloat16, seed, "W_UV")
