"""kernels/indexer_scores_wgmma.py: the Gluon (async wgmma) prefill score kernel.

Gluon has no CPU interpreter, so here on the CPU the kernel is compiled ahead of time for sm_90 with
the installed triton (as tests/kernels/test_sm90_compile.py does for the Triton kernels) and its code
is checked for what the design needs: each key tile's wgmma left in flight while the previous tile's
epilogue runs (a `wgmma.wait_group 1` in the loop), no register spills, shared memory that fits.
The values are checked on a GPU (marked gpu): the same scores as the Triton kernel and the
reference, every tile form (causal, key ranges, bool masks, fp8 with key scales, chunks, splits).
"""
import re

import pytest
import torch

from ic_compile.kernels import indexer_topk as indexer_mod
from ic_compile.kernels.indexer_scores_wgmma import HAS_GLUON, wgmma_scores_supported
from ic_compile.kernels.key_range import key_range_of
from ic_compile.kernels.testing import indexer_inputs, masked_scores, repro, seed_everything

from marks import needs_cuda
from test_sm90_compile import COMPILER_MODE, HAS_NVIDIA_BACKEND, MAX_SMEM, _resource_usage

needs_gluon_compiler = [
    pytest.mark.skipif(not (HAS_GLUON and HAS_NVIDIA_BACKEND), reason="triton with Gluon and ptxas not available"),
    pytest.mark.skipif(HAS_NVIDIA_BACKEND and not COMPILER_MODE,
                       reason="triton was imported with TRITON_INTERPRET=1: cannot compile in this process"),
]
_INT_ARGS = ("S T H D row_start n_rows width sq_b sq_s sq_h sk_b sk_t sw_b sw_s sw_h sks_b sks_t sm_b sm_s sm_t "
             "sr_b sr_s sr_c so_b so_s so_t").split()


def compile_wgmma_sm90(dtype="bf16", causal=True, mask=False, key_range=False, kscale=False, warps=8, stages=4,
                       rows=256, h_pad=32, block_t=64, L=4096) -> dict:
    """AOT-compile the kernel for sm_90 with JIT-like specialisation (unit strides constexpr, multiples
    of 16 divisible, pointers 16-byte aligned) for q [1,L,32,128], k [1,L,128], out [1,L,L]."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    from triton.experimental.gluon._runtime import GluonASTSource

    from ic_compile.kernels.indexer_scores_wgmma import _indexer_scores_wgmma_kernel as fn

    D = 128
    values = dict(S=L, T=L, H=32, D=D, row_start=0, n_rows=L, width=L, sq_b=L * 32 * D, sq_s=32 * D, sq_h=D,
                  sk_b=L * D, sk_t=D, sw_b=L * 32, sw_s=32, sw_h=1, sks_b=L, sks_t=1,
                  sm_b=L * L if mask else 0, sm_s=L if mask else 0, sm_t=1, sr_b=L * 3, sr_s=3, sr_c=1,
                  so_b=L * L, so_s=L, so_t=1)
    pointers = dict(q_ptr=dtype, k_ptr=dtype, w_ptr="fp32", ks_ptr="fp32", mask_ptr="u8", range_ptr="i32",
                    out_ptr="fp32")
    constants = dict(BLOCK_S=rows // h_pad, H_PAD=h_pad, D_PAD=D, BLOCK_T=block_t, STAGES=stages, SWIZZLE=128,
                     CAUSAL=causal, HAS_MASK=mask, HAS_RANGE=key_range, KSCALE=kscale, num_warps=warps)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name], attrs[(i,)] = "*" + pointers[name], [["tt.divisibility", 16]]
        elif values[name] == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton_compile(GluonASTSource(fn, signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    return {"shared": kernel.metadata.shared, "ptx": kernel.asm["ptx"], **_resource_usage(kernel.asm["cubin"])}


@needs_gluon_compiler[0]
@needs_gluon_compiler[1]
@pytest.mark.parametrize("form", [dict(), dict(key_range=True), dict(mask=True), dict(kscale=True),
                                  dict(dtype="fp8e4nv", kscale=True), dict(causal=False, key_range=True),
                                  dict(warps=4, rows=128), dict(h_pad=64)],
                         ids=["causal", "key_range", "bool_mask", "key_scale", "fp8", "range_not_causal",
                              "4_warps", "64_heads"])
def test_compiles_with_the_mma_in_flight_during_the_epilogue(form):
    res = compile_wgmma_sm90(**form)
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", res["ptx"])
    assert "1" in waits, f"every wgmma is waited for at once (waits {waits}): no MMA / epilogue overlap"
    assert res["stack"] == 0, f"register spills: {res['stack']} bytes"
    assert 0 < res["regs"] <= 255 and res["shared"] <= MAX_SMEM, res
    k_steps = 128 // (32 if form.get("dtype") == "fp8e4nv" else 16)
    assert res["ptx"].count("wgmma.mma_async") == 2 * k_steps, "two dot sites (prologue, loop) of D / k steps each"


def test_not_taken_where_it_cannot_run():
    q, k, _ = indexer_inputs(1, 256, 256, 32, 128, torch.bfloat16)
    assert not wgmma_scores_supported(q, k, decode=False)  # CPU: the Triton kernel (interpreter) runs


# ----------------------------------------------------------------------------- real GPU

def _scores(q, k, w, wgmma: bool, monkeypatch, **kw):
    monkeypatch.setattr(indexer_mod, "_WGMMA_SCORES", wgmma)
    parts = [scores.clone() for _, _, scores in indexer_mod.chunked_scores(q, k, w, **kw)]
    return torch.cat(parts, dim=1) if len({p.shape[-1] for p in parts}) == 1 else parts


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["causal", "prefix", "odd_length", "key_range", "bool_mask", "fp8", "64_heads",
                                  "chunks_and_splits", "batch"])
def test_gpu_scores_equal_the_triton_kernel(case, request, monkeypatch):
    seed = seed_everything(request.node.name)
    B, S, T, H, kw = {"causal": (1, 4096, 4096, 32, {}), "prefix": (1, 1000, 5000, 32, {}),
                      "odd_length": (1, 3001, 3001, 32, {}), "key_range": (1, 2048, 2048, 32, {}),
                      "bool_mask": (1, 2048, 2048, 32, {}), "fp8": (1, 4096, 4096, 32, {"indexer_precision": "fp8"}),
                      "64_heads": (1, 2048, 2048, 64, {}),
                      "chunks_and_splits": (1, 3000, 3000, 32, {"chunk_rows": 512, "num_splits": 3}),
                      "batch": (2, 1500, 1500, 32, {"chunk_rows": 1024})}[case]
    q, k, w = indexer_inputs(B, S, T, H, 128, torch.bfloat16, device="cuda")
    if not wgmma_scores_supported(q, k, decode=False):
        pytest.skip("not a Hopper GPU with Gluon")
    if case in ("key_range", "bool_mask"):
        causal = torch.ones(S, T, dtype=torch.bool, device="cuda").tril(T - S)
        window = causal & ~torch.ones_like(causal).tril(T - S - 700)  # sliding window of 700 keys
        if case == "key_range":
            kw["key_range"] = key_range_of(window[None].expand(B, S, T))
        else:
            kw["mask"] = window[None] & (torch.rand(B, 1, T, device="cuda") > 0.1)  # and some keys dropped
    got = _scores(q, k, w, True, monkeypatch, **kw)
    want = _scores(q, k, w, False, monkeypatch, **kw)
    for g, x in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
        assert torch.equal(torch.isinf(g), torch.isinf(x)), f"masked keys differ {repro(seed)}"
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-5, msg=repro(seed))
    if case == "causal":  # and the reference, outright
        ref = masked_scores(q.float(), k.float(), w.float())
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3, msg=repro(seed))


@pytest.mark.gpu
@needs_cuda
def test_gpu_topk_through_the_op_equals_the_triton_kernels(request, monkeypatch):
    seed = seed_everything(request.node.name)
    q, k, w = indexer_inputs(1, 8192, 8192, 32, 128, torch.bfloat16, device="cuda")
    if not wgmma_scores_supported(q, k, decode=False):
        pytest.skip("not a Hopper GPU with Gluon")
    picks = {}
    for wgmma in (False, True):
        monkeypatch.setattr(indexer_mod, "_WGMMA_SCORES", wgmma)
        picks[wgmma] = indexer_mod.indexer_topk(q, k, w, 2048, sorted=False).sort(-1).values
    mismatching = (picks[True] != picks[False]).any(-1).sum().item()
    assert mismatching <= 2, f"{mismatching} rows pick other keys {repro(seed)}"  # near-ties only

