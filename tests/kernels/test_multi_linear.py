"""kernels/multi_linear.py (the Triton kernel in the interpreter) == reference.multi_linear_ref == a
linear per weight: one to six weights (more than one launch group), row tails, 1-4 tokens, a strided
x, half weights upcast for an fp32 x; inputs the kernel does not take are refused with the reason;
the custom op's schema and fake; the RMSNorm prologue (x normed, a residual added first) rounds as
the model's norm rounds."""

import pytest
import torch
from torch.nn import functional as F

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic.*)
from ic_compile.kernels import _triton_utils
from ic_compile.kernels.multi_linear import MAX_TOKENS, multi_linear, multi_linear_triton
from ic_compile.kernels.reference import multi_linear_ref, rms_norm_ref
from ic_compile.kernels.testing import repro, seed_everything

from marks import needs_cuda, needs_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
K = 96
ROWS = (40, 7, 64, 33, 20, 5)  # six weights: two launch groups; no row count a multiple of a block


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs start as NaN: a row the kernel misses fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _weights(rows, dtype, device="cpu"):
    return [(torch.randn(n, K, device=device) * K**-0.5).to(dtype) for n in rows]


def _assert_close(got, want, dtype, seed, what=""):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous(), (i, g.shape, w.shape)
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype], msg=lambda m: f"{m} weight {i} {what} {repro(seed)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_is_a_linear_per_weight(dtype, request):
    seed = seed_everything(request.node.name)
    weights, x = _weights(ROWS[:3], dtype), torch.randn(2, K).to(dtype)
    _assert_close(multi_linear_ref(x, weights), [F.linear(x, w) for w in weights], dtype, seed)


@needs_triton
@pytest.mark.parametrize("count", [1, 2, 4, 6])
@pytest.mark.parametrize("T", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(dtype, T, count, request):
    seed = seed_everything(request.node.name)
    weights, x = _weights(ROWS[:count], dtype), torch.randn(T, K).to(dtype)
    _assert_close(multi_linear(x, weights, use_triton=True), multi_linear_ref(x, weights), dtype, seed)


@needs_triton
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_x_reads_and_upcasts_half_weights(weight_dtype, request):
    """An fp32 x with bf16/fp16 weights: a linear on the upcast weights (HF's routers), to fp32 sums."""
    seed = seed_everything(request.node.name)
    weights, x = _weights(ROWS[:2], weight_dtype), torch.randn(1, K)
    want = [F.linear(x, w.float()) for w in weights]
    _assert_close(multi_linear(x, weights, use_triton=True), want, torch.float32, seed)


@needs_triton
def test_triton_small_tiles_strided_rows(request):
    """Several K steps per row, 16-row blocks, weights and x as row-strided views of larger buffers."""
    seed = seed_everything(request.node.name)
    weights = [torch.cat((w, w[:, :8]), 1)[:, :K] for w in _weights(ROWS[:4], torch.bfloat16)]  # row stride K + 8
    x = torch.randn(3, 2 * K).bfloat16()[:, :K]  # row stride 2K
    want = multi_linear_ref(x, weights)
    for tile in [(16, 32), (4, 128)]:
        _assert_close(multi_linear_triton(x, weights, tile=tile), want, torch.bfloat16, seed, str(tile))


def _norm_inputs(T, dtype, residual, device="cpu"):
    x = (3 * torch.randn(T, K, device=device)).to(dtype)
    r = torch.randn(T, K, device=device).to(dtype) if residual else None
    return x, r, (1 + 0.3 * torch.randn(K, device=device)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_reference_is_the_models_norm(dtype, request):
    """rms_norm_ref: HF's RMSNorm class (two roundings) bit for bit; scale_then_round: F.rms_norm."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRMSNorm

    seed_everything(request.node.name)
    x, r, weight = _norm_inputs(3, dtype, residual=True)
    norm = GlmMoeDsaRMSNorm(K, eps=1e-5).to(dtype)
    norm.weight.data.copy_(weight)
    assert torch.equal(rms_norm_ref(x, weight, 1e-5, r), norm(x + r))
    torch.testing.assert_close(rms_norm_ref(x, weight, 1e-5, scale_then_round=True),
                               F.rms_norm(x, (K,), weight, 1e-5), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("scale_then_round", [False, True], ids=["hf", "functional"])
@pytest.mark.parametrize("residual", [False, True], ids=["x", "x+residual"])
def test_rms_norm_prologue_rounds_as_the_model(residual, scale_then_round, request):
    """Through identity weights the op returns its normed rows: fp16 (which the interpreter rounds as
    a GPU does; it truncates bf16) equal to the reference in >= 99% of elements (rstd may differ by an
    ulp), where the other rounding order matches only ~75%."""
    seed = seed_everything(request.node.name)
    x, r, weight = _norm_inputs(4, torch.float16, residual)
    (got,) = multi_linear_triton(x, [torch.eye(K).half()], tile=(8, 32), norm_weight=weight, eps=1e-6, residual=r,
                                 scale_then_round=scale_then_round)
    same = (got == rms_norm_ref(x, weight, 1e-6, r, scale_then_round)).float().mean().item()
    assert same >= 0.99, f"{same:.3f} of the normed rows equal {repro(seed)}"
    torch.testing.assert_close(got, rms_norm_ref(x, weight, 1e-6, r, scale_then_round), rtol=1e-3, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("one_load", [True, False], ids=["rstd_one_load", "rstd_loop"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_prologue_matches_reference(dtype, T, one_load, request, monkeypatch):
    """Six weights (two launch groups, each norms again), several K steps, with and without the residual;
    rstd from one load of the rows or a loop over K. bf16 within 5%: the interpreter truncates the
    normed rows to bf16 (a GPU rounds them: the GPU test)."""
    from ic_compile.kernels import multi_linear as mod

    monkeypatch.setattr(mod, "RSTD_ONE_LOAD_ELEMS", 8192 if one_load else 0)
    seed = seed_everything(request.node.name)
    weights = _weights(ROWS, dtype)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    for residual in (False, True):
        x, r, weight = _norm_inputs(T, dtype, residual)
        norm = dict(norm_weight=weight, eps=1e-5, residual=r)
        want = multi_linear_ref(x, weights, **norm)
        for g, w in zip(multi_linear_triton(x, weights, tile=(16, 32), **norm), want):
            torch.testing.assert_close(g.float(), w.float(), **tol,
                                       msg=lambda m: f"{m} residual={residual} {repro(seed)}")
        _assert_close(multi_linear(x, weights, use_triton=False, **norm), multi_linear_ref(x, weights, **norm),
                      dtype, seed, "reference path")


@needs_triton
@pytest.mark.parametrize("T", [1, 3])
def test_side_outputs_are_the_normed_rows_and_the_sum(T, request):
    """write_normed / write_sum: after the products, the normed rows and x + residual, equal to the
    reference's (fp16 in the interpreter rounds as a GPU does; the sum is one rounded add, bit-equal),
    written by one program even with six weights in two launch groups; out_dtype=fp32 gives fp32
    products of the half-precision normed rows (a router's upcast logits)."""
    seed = seed_everything(request.node.name)
    weights = _weights(ROWS, torch.float16)
    x, r, weight = _norm_inputs(T, torch.float16, True)
    norm = dict(norm_weight=weight, eps=1e-6, residual=r, write_normed=True, write_sum=True)
    got = multi_linear_triton(x, weights, tile=(16, 32), **norm)
    want = multi_linear_ref(x, weights, **norm)
    assert len(got) == len(ROWS) + 2
    torch.testing.assert_close(got[-2], want[-2], rtol=1e-3, atol=1e-3, msg=lambda m: f"{m} normed {repro(seed)}")
    assert torch.equal(got[-1], x + r), repro(seed)
    for g, w in zip(got[:-2], want[:-2]):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2, msg=lambda m: f"{m} {repro(seed)}")
    (logits, normed) = multi_linear_triton(x, weights[:1], norm_weight=weight, eps=1e-6, residual=r,
                                           write_normed=True, out_dtype=torch.float32)
    assert logits.dtype == torch.float32 and normed.dtype == torch.float16
    torch.testing.assert_close(logits, normed.float() @ weights[0].float().T, rtol=1e-4, atol=1e-4)


def test_rejects_what_the_kernel_does_not_take():
    weights, x = _weights(ROWS[:2], torch.float32), torch.randn(2, K)
    with pytest.raises(ValueError, match="not \\[N,96\\]"):
        multi_linear(x, [weights[0], weights[1][:, :-1]], use_triton=False)
    with pytest.raises(ValueError, match="dtype"):
        multi_linear(x.bfloat16(), [weights[0].bfloat16(), weights[1]], use_triton=False)  # no linear is that
    with pytest.raises(ValueError, match="share one dtype"):
        multi_linear(x, [weights[0].bfloat16(), weights[1]], use_triton=False)  # one launch reads one dtype
    with pytest.raises(ValueError, match="at least one weight"):
        multi_linear(x, [], use_triton=False)
    with pytest.raises(ValueError, match="unit stride"):
        multi_linear_triton(x, [weights[0].T.contiguous().T])
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS}"):
        multi_linear_triton(torch.randn(MAX_TOKENS + 1, K), weights)
    with pytest.raises(ValueError, match="RMSNorm weight must be \\[96\\]"):
        multi_linear(x, weights, use_triton=False, norm_weight=torch.ones(K - 1))
    with pytest.raises(ValueError, match="or fp32 with scale_then_round"):
        multi_linear(x.bfloat16(), [w.bfloat16() for w in weights], use_triton=False, norm_weight=torch.ones(K))
    with pytest.raises(ValueError, match="residual must be x's shape"):
        multi_linear(x, weights, use_triton=False, norm_weight=torch.ones(K), residual=torch.randn(1, K))
    with pytest.raises(ValueError, match="need the RMSNorm prologue"):
        multi_linear(x, weights, use_triton=False, write_normed=True)
    with pytest.raises(ValueError, match="write_sum needs a residual"):
        multi_linear_triton(x, weights, norm_weight=torch.ones(K), write_sum=True)


def test_more_rows_than_the_kernel_takes_use_the_reference():
    """multi_linear itself falls back to the reference above MAX_TOKENS rows (the pass never asks)."""
    weights, x = _weights(ROWS[:2], torch.float32), torch.randn(MAX_TOKENS + 3, K)
    _assert_close(multi_linear(x, weights, use_triton=True), multi_linear_ref(x, weights), torch.float32, 0)


def test_schema_and_opcheck(request):
    seed_everything(request.node.name)
    assert str(torch.ops.ic.multi_linear.default._schema) == (
        "ic::multi_linear(Tensor x, Tensor[] weights, Tensor? norm_weight=None, float eps=0., Tensor? residual=None, "
        "bool scale_then_round=False, bool write_normed=False, bool write_sum=False, ScalarType? out_dtype=None) "
        "-> Tensor[]")
    torch.library.opcheck(torch.ops.ic.multi_linear.default, (torch.randn(2, K), _weights(ROWS[:3], torch.float32)))
    torch.library.opcheck(torch.ops.ic.multi_linear.default, (torch.randn(2, K), _weights(ROWS[:3], torch.float32),
                                                               torch.rand(K), 1e-6, torch.randn(2, K), True))
    torch.library.opcheck(torch.ops.ic.multi_linear.default,
                          (torch.randn(2, K).bfloat16(), _weights(ROWS[:2], torch.bfloat16), torch.rand(K).bfloat16(),
                           1e-6, torch.randn(2, K).bfloat16(), False, True, True, torch.float32))


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("T", [1, 4])
def test_glm_shapes_gpu(T, request):
    """GLM-4.7-Flash's sibling projections: q_a, kv_a, indexer wk and weights_proj of the normed hidden
    (K = 2048), and q_b, indexer wq_b of the normed q_a (K = 768); lone: o_proj (K = 5120) and the
    router's fp32 logits of its bf16 weight; vs F.linear (cuBLAS)."""
    seed = seed_everything(request.node.name)
    for width, rows, x_dtype in ((2048, (768, 576, 128, 32), torch.bfloat16), (768, (5120, 4096), torch.bfloat16),
                                 (5120, (2048,), torch.bfloat16), (2048, (64,), torch.float32)):
        weights = [(torch.randn(n, width, device="cuda") * width**-0.5).bfloat16() for n in rows]
        x = torch.randn(T, width, device="cuda").to(x_dtype)
        _assert_close(torch.ops.ic.multi_linear(x, weights), [F.linear(x, w.to(x_dtype)) for w in weights], x_dtype,
                      seed, f"K={width}")


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("T", [1, 4])
def test_rms_norm_prologue_glm_shapes_gpu(T, request):
    """input_layernorm (with the residual sum) -> q_a, kv_a, wk (K = 2048); q_a_layernorm -> q_b, wq_b
    (K = 768), bf16, both rounding orders; vs the reference norm then F.linear (cuBLAS). Then
    post_attention_layernorm as folded: the router's fp32 logits with the normed rows and the sum
    written for the experts and the residual stream (the sum bit-equal to torch's add)."""
    seed = seed_everything(request.node.name)
    for width, rows, residual in ((2048, (768, 576, 128), True), (768, (5120, 4096), False)):
        weights = [(torch.randn(n, width, device="cuda") * width**-0.5).bfloat16() for n in rows]
        x, r = (torch.randn(T, width, device="cuda").bfloat16() for _ in range(2))
        weight = (1 + 0.3 * torch.randn(width, device="cuda")).bfloat16()
        for scale_then_round in (False, True):
            normed = rms_norm_ref(x, weight, 1e-5, r if residual else None, scale_then_round)
            got = torch.ops.ic.multi_linear(x, weights, weight, 1e-5, r if residual else None, scale_then_round)
            _assert_close(got, [F.linear(normed, w) for w in weights], torch.bfloat16, seed, f"K={width}")
    router = (torch.randn(64, 2048, device="cuda") * 2048**-0.5).bfloat16()
    x, r = (torch.randn(T, 2048, device="cuda").bfloat16() for _ in range(2))
    weight = (1 + 0.3 * torch.randn(2048, device="cuda")).bfloat16()
    logits, normed, total = torch.ops.ic.multi_linear(x, [router], weight, 1e-5, r, False, True, True, torch.float32)
    torch.testing.assert_close(normed, rms_norm_ref(x, weight, 1e-5, r), rtol=1e-2, atol=1e-2)
    assert torch.equal(total, x + r)
    torch.testing.assert_close(logits, F.linear(normed.float(), router.float()), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_chained_launches_in_a_cuda_graph_gpu(request, monkeypatch):
    """Programmatic dependent launch switched on (it is used on Hopper and later): each launch may
    start while the one before it runs, so a chain of GEMVs each reading the last one's output, with a
    plain torch kernel between two of them, replayed from a CUDA graph for new inputs equals the same
    chain run eagerly without PDL (an input read before the grid wait would see the previous replay's
    values)."""
    seed_everything(request.node.name)
    monkeypatch.setattr(_triton_utils, "_PDL", True)
    assert _triton_utils.pdl(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    weights = [(torch.randn(2048, 2048, device="cuda") * 2048**-0.5).bfloat16() for _ in range(8)]
    x = torch.randn(1, 2048, device="cuda").bfloat16()

    def chain(h):
        for i, w in enumerate(weights):
            h = torch.ops.ic.multi_linear(h, [w])[0]
            h = h * 2.0 if i == 3 else h
        return h

    chain(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for step in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        monkeypatch.setattr(_triton_utils, "_PDL", False)
        assert torch.equal(out, chain(x)), f"replay {step}"
        monkeypatch.setattr(_triton_utils, "_PDL", True)
