"""kernels/moe_router.py (the Triton kernel in the interpreter) == reference.moe_route_ref (HF's torch
code): group-limited and plain, with and without bias / renormalisation, E not a power of two;
configurations the kernel does not take are refused with the reason; the op's fake gives the shapes."""

import pytest
import torch

from ic_compile.kernels.moe_router import moe_route
from ic_compile.kernels.reference import moe_route_ref
from ic_compile.kernels.testing import repro, seed_everything

from marks import needs_cuda, needs_triton

CASES = {  # T, E, top_k, n_group, topk_group, bias, renormalize, scale
    "glm_flash": (3, 64, 4, 1, 1, True, True, 1.8),
    "deepseek_v3": (5, 256, 8, 8, 4, True, True, 2.5),
    "kimi_384": (2, 384, 8, 1, 1, True, True, 2.827),
    "no_bias_no_norm": (4, 32, 2, 4, 2, False, False, 1.0),
    "one_group_kept": (3, 64, 6, 8, 1, True, True, 1.0),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_reference(case, request):
    seed = seed_everything(request.node.name)
    T, E, k, groups, kept, has_bias, renormalize, scale = CASES[case]
    for logit_scale in (1.0, 4.0):  # 4: sigmoids near 1, where the bias decides (not at exactly 1.0: ties)
        logits = logit_scale * torch.randn(T, E)
        bias = 0.2 * torch.randn(E) if has_bias else None
        got_w, got_ids = moe_route(logits, bias, k, groups, kept, renormalize, scale, use_triton=True)
        want_w, want_ids = moe_route_ref(logits, bias, k, groups, kept, renormalize, scale)
        assert torch.equal(got_ids, want_ids), f"{case} x{logit_scale} {repro(seed)}"
        torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7, msg=repro(seed))
        if groups > 1:  # every pick lies in one of the `kept` groups
            assert (got_ids // (E // groups)).unique(dim=None).numel() <= kept * T


@pytest.mark.parametrize("E,k,groups,kept,why", [(64, 32, 1, 1, "top_k 32"), (2048, 8, 1, 1, "2048 experts"),
                                                 (96, 8, 3, 2, "in 3 groups"), (64, 4, 4, 5, "topk_group 5")])
def test_refuses_what_it_cannot_compute(E, k, groups, kept, why):
    with pytest.raises(ValueError, match=why):
        moe_route(torch.randn(2, E), None, k, groups, kept)


def test_op_fake_shapes():
    import ic_compile.kernels.ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        weights, ids = torch.ops.ic.moe_route(torch.empty(7, 64), torch.empty(64), 4, 1, 1, True, 1.0)
    assert weights.shape == ids.shape == (7, 4) and weights.dtype == torch.float32 and ids.dtype == torch.int64


@pytest.mark.parametrize("E_PAD,groups,kept,k", [(64, 1, 1, 4), (256, 8, 4, 8), (512, 1, 1, 8)])
def test_compiles_for_sm90(E_PAD, groups, kept, k):
    from test_sm90_compile import COMPILER_MODE, HAS_NVIDIA_BACKEND, compile_sm90
    if not (HAS_NVIDIA_BACKEND and COMPILER_MODE):
        pytest.skip("triton's NVIDIA backend (ptxas) in compiler mode not available")
    from ic_compile.kernels.moe_router import _route_kernel
    res = compile_sm90(_route_kernel, dict(logits_ptr="fp32", bias_ptr="fp32", w_ptr="fp32", ids_ptr="i64"),
                       dict(E=E_PAD, sl_t=E_PAD, sl_e=1, sw_t=k, si_t=k), dict(SCALE=2.5),
                       dict(E_PAD=E_PAD, GROUPS=groups, TOPK_GROUP=kept, TOPK=k, K_PAD=k, HAS_BIAS=True,
                            RENORMALIZE=True, PDL=groups == 1), num_warps=1 if E_PAD <= 128 else 4, num_stages=1)
    assert res["stack"] == 0, f"register spills: {res['stack']} bytes"
    assert ("griddepcontrol.wait" in res["ptx"]) == (groups == 1)  # PDL (an H100's launch) or not


def test_export_decomposition_is_the_reference():
    """ONNX / TensorRT export runs ic::moe_route through its standard-op decomposition."""
    import ic_compile.kernels.ops  # noqa: F401
    from ic_compile.export.decompose import DECOMPOSITIONS
    logits, bias = torch.randn(3, 64), torch.randn(64)
    got = DECOMPOSITIONS["ic::moe_route"](logits, bias, 4, 8, 2, True, 2.5)
    want = torch.ops.ic.moe_route(logits, bias, 4, 8, 2, True, 2.5)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_kernel_equals_reference(case, request):
    seed = seed_everything(request.node.name)
    T, E, k, groups, kept, has_bias, renormalize, scale = CASES[case]
    logits = torch.randn(T, E, device="cuda")
    bias = 0.2 * torch.randn(E, device="cuda") if has_bias else None
    got_w, got_ids = moe_route(logits, bias, k, groups, kept, renormalize, scale)  # CUDA -> the JIT kernel
    want_w, want_ids = moe_route_ref(logits, bias, k, groups, kept, renormalize, scale)
    assert torch.equal(got_ids, want_ids), repro(seed)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7, msg=repro(seed))
