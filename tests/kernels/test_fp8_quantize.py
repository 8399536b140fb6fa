"""kernels/fp8_quantize.py (the Triton kernel in the interpreter, and on a GPU) == fp8_indexer's torch
reference bit for bit: e4m3 bytes (every e4m3 value and every midpoint between two, ties to even;
subnormals, zeros, -0.0, outliers), fp32 scales, the head weights times the scales; the key-cache
scatter writes only its rows and sets `filled`."""

import pytest
import torch

from ic_compile.kernels.fp8_indexer import FP8_DTYPE, FP8_MAX, quantize_rows, quantize_rows_ref
from ic_compile.kernels.fp8_quantize import quantize_rows_into, quantize_rows_triton
from ic_compile.kernels.testing import repro, seed_everything

from marks import needs_cuda, needs_triton

D = 128


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def _awkward_rows(dtype, device="cpu"):
    """[4, 6, D]: scaled gaussians, a zero row, -0.0 entries, a tiny row (scale floor 1e-4), an outlier."""
    x = torch.randn(4, 6, D, device=device) * torch.rand(4, 6, 1, device=device) * 10
    x[0, 0] = 0
    x[0, 1, :7] = -0.0
    x[1, 1] = 1e-7
    x[2, 2, 3] = 1e4
    return x.to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_rows_and_weights_equal_the_reference(dtype, request):
    seed = seed_everything(request.node.name)
    x, w = _awkward_rows(dtype), torch.randn(4, 6).to(dtype)
    x8, scale, weighted = quantize_rows_triton(x, w)
    x8_want, scale_want = quantize_rows_ref(x)
    assert _same_bits(x8, x8_want), repro(seed)
    assert torch.equal(scale, scale_want) and torch.equal(weighted, w.float() * scale_want), repro(seed)
    strided = torch.cat((x, x), -1)[..., :D]  # rows of stride 2D
    assert _same_bits(quantize_rows_triton(strided)[0], x8_want)


@needs_triton
def test_every_e4m3_value_and_midpoint_rounds_as_torch():
    """Rows holding 448 have scale 1 exactly, so x / scale = x: every positive e4m3 value, every midpoint
    between neighbours (a tie: to the even code) and points just off them, both signs."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).float()  # 0 .. 448, no NaN
    mids = (values[1:] + values[:-1]) / 2
    probes = torch.cat((values, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)))
    probes = torch.cat((probes, -probes))
    rows = torch.nn.functional.pad(probes, (0, (-probes.numel()) % (D - 1))).view(-1, D - 1)
    x = torch.cat((rows, torch.full((rows.shape[0], 1), FP8_MAX)), 1)
    x8, scale = quantize_rows_triton(x)
    assert torch.equal(scale, torch.ones_like(scale))
    want = x.to(FP8_DTYPE)
    bad = (x8.view(torch.uint8) != want.view(torch.uint8)).nonzero()
    assert not len(bad), [(x[tuple(i)].item(), x8[tuple(i)].float().item(), want[tuple(i)].float().item())
                          for i in bad[:5]]


@needs_triton
@pytest.mark.parametrize("filled_in_kernel", [True, False], ids=["decode", "prefill"])
def test_scatter_into_a_key_cache_mirror(filled_in_kernel, request, monkeypatch):
    """new rows [b, n, D] at unsorted positions of batch rows [0, b) of a [Bmax, T, D] mirror: those rows
    equal the reference, every other row is untouched, filled = max(positions) + 1 (set by the kernel
    for a few positions, after it for many)."""
    from ic_compile.kernels import fp8_quantize

    monkeypatch.setattr(fp8_quantize, "MAX_FILLED_IN_KERNEL", 1024 if filled_in_kernel else 2)
    seed = seed_everything(request.node.name)
    keys = torch.full((3, 40, D), 0.5).to(FP8_DTYPE)
    scales = torch.full((3, 40), -1.0)
    filled = torch.tensor(3)
    new, positions = torch.randn(2, 4, D).bfloat16(), torch.tensor([9, 3, 12, 4])
    before = keys.clone()
    quantize_rows_into(new, positions, keys, scales, filled)
    want8, want_scale = quantize_rows_ref(new)
    assert _same_bits(keys[:2, positions], want8) and torch.equal(scales[:2, positions], want_scale), repro(seed)
    untouched = torch.ones(3, 40, dtype=torch.bool)
    untouched[:2, positions] = False
    assert _same_bits(keys[untouched], before[untouched]) and (scales[untouched] == -1).all()
    assert filled.item() == 13


@needs_triton
def test_quantize_rows_takes_the_kernel_where_kernels_run(monkeypatch):
    """IC_KERNELS_TRITON=1 on CPU routes quantize_rows through the kernel (the interpreter): same bits."""
    x = _awkward_rows(torch.bfloat16)
    want = quantize_rows_ref(x)
    monkeypatch.setenv("IC_KERNELS_TRITON", "1")
    got = quantize_rows(x)
    assert _same_bits(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rejects_weights_of_another_shape():
    with pytest.raises(ValueError, match="row weights"):
        quantize_rows_triton(torch.randn(2, 3, D), torch.randn(3, 2))


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("rows", [32, 200000])
def test_kernel_equals_the_reference_gpu(rows, request):
    """A decode step's q heads (32 rows) and a 200K-key cache, bf16, on the GPU: the same bits as the
    torch reference (its division and e4m3 cast are IEEE / round-to-nearest-even too)."""
    seed = seed_everything(request.node.name)
    x = (torch.randn(rows, D, device="cuda") * torch.rand(rows, 1, device="cuda") * 10).bfloat16()
    w = torch.randn(rows, device="cuda").bfloat16()
    x8, scale, weighted = quantize_rows_triton(x, w)
    x8_want, scale_want = quantize_rows_ref(x)
    assert _same_bits(x8, x8_want), repro(seed)
    assert torch.equal(scale, scale_want) and torch.equal(weighted, w.float() * scale_want), repro(seed)


@pytest.mark.parametrize("scatter,weights", [(False, True), (True, False)], ids=["q_rows", "key_cache"])
def test_compiles_for_sm90(scatter, weights):
    from test_sm90_compile import COMPILER_MODE, HAS_NVIDIA_BACKEND, compile_sm90
    if not (HAS_NVIDIA_BACKEND and COMPILER_MODE):
        pytest.skip("triton's NVIDIA backend (ptxas) in compiler mode not available")
    from ic_compile.kernels.fp8_quantize import BLOCK_R, MIN_AMAX, _quantize_rows_kernel
    res = compile_sm90(_quantize_rows_kernel, dict(x_ptr="bf16", x8_ptr="u8", s_ptr="fp32", w_ptr="bf16", ws_ptr="fp32",
                                                   pos_ptr="i64", filled_ptr="i64"),
                       dict(R=32, N=32, D=D, sx_r=D, T_DST=200000), {},
                       dict(BLOCK_R=BLOCK_R, D_PAD=D, HAS_W=weights, SCATTER=scatter, FILLED_BLOCK=16 if scatter else 0,
                            FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX), 4, 1)
    assert res["stack"] == 0, f"register spills: {res['stack']} bytes"
