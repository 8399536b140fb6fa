"""kernels/head_linear.py (the Triton kernel in the interpreter) == reference.head_linear_ref == the einsum
per head: weights with unit stride along K or along N (a transpose view, and absorbed MLA's own slices of
kv_b_proj's weight), 1-4 tokens, row and width tails, one head and several, strided views of x; the
custom op's schema and fake, eager and under torch.compile; inputs the kernel does not take are refused
with the reason."""

import pytest
import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic.*)
from ic_compile.kernels import _triton_utils
from ic_compile.kernels.head_linear import MAX_TOKENS, head_linear, head_linear_triton
from ic_compile.kernels.reference import head_linear_ref
from ic_compile.kernels.testing import repro, seed_everything

from marks import needs_cuda, needs_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
H, N, K = 3, 40, 72  # neither N nor K a multiple of a block
MLA = dict(H=2, dn=24, dv=40, Dl=48)  # absorbed MLA's dims, small (GLM-4.7-Flash: 20, 192, 256, 512)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs start as NaN: an output the kernel misses fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _weight(heads, rows, width, dtype, n_unit=False, device="cpu"):
    """[heads, rows, width] with unit stride along width, or (n_unit) along rows: the transpose view of
    a real [heads, width, rows] tensor."""
    if n_unit:
        return (torch.randn(heads, width, rows, device=device) * width**-0.5).to(dtype).transpose(1, 2)
    return (torch.randn(heads, rows, width, device=device) * width**-0.5).to(dtype)


def _mla_weight(dtype, device="cpu"):
    """kv_b_proj.weight [H*(dn+dv), Dl] viewed [H, dn+dv, Dl]; and W_UK^T [H,Dl,dn] (unit stride along N),
    W_UV [H,dv,Dl] (unit stride along K): the slices _absorbed_mla multiplies by."""
    heads, dn, dv, dl = MLA["H"], MLA["dn"], MLA["dv"], MLA["Dl"]
    weight = (torch.randn(heads * (dn + dv), dl, device=device) * dl**-0.5).to(dtype).view(heads, dn + dv, dl)
    return weight[:, :dn].transpose(1, 2), weight[:, dn:]


def _assert_close(got, want, dtype, seed, what=""):
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), (got.shape, want.shape)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=lambda m: f"{m} {what} {repro(seed)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_is_a_linear_per_head(dtype, request):
    seed = seed_everything(request.node.name)
    x, weight = torch.randn(2, H, K).to(dtype), _weight(H, N, K, dtype, n_unit=True)
    want = torch.stack([x[:, h].float() @ weight[h].float().T for h in range(H)], 1).to(dtype)
    got = head_linear_ref(x, weight)
    _assert_close(got, want, dtype, seed)


@needs_triton
@pytest.mark.parametrize("n_unit", [False, True], ids=["k_unit", "n_unit"])
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_matches_reference(dtype, T, n_unit, request):
    """Default tiles (several row blocks per head at the interpreter's 4 SMs) and small ones (several K
    steps, row and width tails), one head and three."""
    seed = seed_everything(request.node.name)
    for heads in (1, H):
        x, weight = torch.randn(T, heads, K).to(dtype), _weight(heads, N, K, dtype, n_unit)
        want = head_linear_ref(x, weight)
        _assert_close(head_linear(x, weight, use_triton=True), want, dtype, seed, f"H={heads}")
        _assert_close(head_linear_triton(x, weight, tile=(16, 32)), want, dtype, seed, f"H={heads} tile (16, 32)")


@needs_triton
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_absorbed_mla_slices(dtype, T, request):
    """_absorbed_mla's operands as it passes them: q_nope = q[..., :dn] of [B,H,S,dn+dr] as [S,H,dn]
    (transposed, strided) times W_UK^T; a latent output [S,H,Dl] times W_UV."""
    seed = seed_everything(request.node.name)
    heads, dn, dl = MLA["H"], MLA["dn"], MLA["Dl"]
    w_uk_t, w_uv = _mla_weight(dtype)
    q_nope = torch.randn(1, heads, T, dn + 8).to(dtype)[..., :dn][0].transpose(0, 1)  # [T,H,dn] view
    out_latent = torch.randn(T, heads, dl).to(dtype)
    for name, x, weight in (("q_nope x W_UK", q_nope, w_uk_t), ("latent x W_UV", out_latent, w_uv)):
        got = head_linear(x, weight, use_triton=True)
        _assert_close(got, head_linear_ref(x, weight), dtype, seed, name)
    model = torch.einsum("bhsd,hdc->bshc", q_nope.transpose(0, 1)[None], w_uk_t.transpose(1, 2))[0]  # the lowering's
    _assert_close(head_linear(q_nope, w_uk_t, use_triton=True), model.contiguous(), dtype, seed, "vs the lowering")


@needs_triton
def test_strided_x_and_weight_views(request):
    """x with padded token and head strides; a weight with no unit stride at all (read through its strides)."""
    seed = seed_everything(request.node.name)
    x = torch.randn(3, H + 1, K + 8)[:, 1:, 4:K + 4]  # strides (.., K + 8, 1), offset
    weight = _weight(H, N, 2 * K, torch.float32)[:, :, ::2]  # K stride 2
    _assert_close(head_linear_triton(x, weight, tile=(8, 32)), head_linear_ref(x, weight), torch.float32, seed)


@needs_triton
def test_empty_sizes():
    """No tokens: an empty result; K == 0: zeros (the sum over nothing); no heads / outputs: empty."""
    weight = _weight(H, N, K, torch.float32)
    assert head_linear_triton(torch.randn(0, H, K), weight).shape == (0, H, N)
    zeros = head_linear_triton(torch.randn(2, H, 0), torch.randn(H, N, 0))
    assert torch.equal(zeros, torch.zeros(2, H, N))
    assert head_linear_triton(torch.randn(2, 0, K), torch.randn(0, N, K)).shape == (2, 0, N)
    assert head_linear_triton(torch.randn(2, H, K), torch.randn(H, 0, K)).shape == (2, H, 0)


def test_rejects_what_the_kernel_does_not_take():
    x, weight = torch.randn(2, H, K), _weight(H, N, K, torch.float32)
    with pytest.raises(ValueError, match="x must be \\[T,H,K\\] and weight \\[H,N,K\\]"):
        head_linear(x[0], weight, use_triton=False)
    with pytest.raises(ValueError, match="x must be \\[T,H,K\\] and weight \\[H,N,K\\]"):
        head_linear(x, weight[0], use_triton=True)
    with pytest.raises(ValueError, match="is not \\[H,N,K\\] for x .*H=3, K=72"):
        head_linear(x, weight[:, :, :-1], use_triton=False)  # K differs
    with pytest.raises(ValueError, match="is not \\[H,N,K\\]"):
        head_linear(x, weight[:2], use_triton=False)  # H differs
    with pytest.raises(ValueError, match="share one dtype"):
        head_linear(x.bfloat16(), weight, use_triton=False)
    with pytest.raises(ValueError, match="among bf16 / fp16 / fp32"):
        head_linear(x.double(), weight.double(), use_triton=False)
    with pytest.raises(ValueError, match="unit stride along K"):
        head_linear_triton(torch.randn(2, H, K, 2)[..., 0], weight)
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS}"):
        head_linear_triton(torch.randn(MAX_TOKENS + 1, H, K), weight)


def test_more_rows_than_the_kernel_takes_use_the_reference():
    """head_linear itself runs the reference above MAX_TOKENS rows (prefill)."""
    x, weight = torch.randn(MAX_TOKENS + 3, H, K), _weight(H, N, K, torch.float32, n_unit=True)
    _assert_close(head_linear(x, weight, use_triton=True), head_linear_ref(x, weight), torch.float32, 0)


def test_schema_and_opcheck(request):
    seed_everything(request.node.name)
    assert str(torch.ops.ic.head_linear.default._schema) == "ic::head_linear(Tensor x, Tensor weight) -> Tensor"
    w_uk_t, w_uv = _mla_weight(torch.float32)
    torch.library.opcheck(torch.ops.ic.head_linear.default, (torch.randn(2, MLA["H"], MLA["dn"]), w_uk_t))
    torch.library.opcheck(torch.ops.ic.head_linear.default, (torch.randn(1, MLA["H"], MLA["Dl"]), w_uv))


def _absorbed_products(q_nope, out_latent, w_uk_t, w_uv):
    """The two products as a graph would hold them, with ops around them for Inductor."""
    q_latent = torch.ops.ic.head_linear(q_nope * 2.0, w_uk_t)
    return q_latent.relu(), torch.ops.ic.head_linear(out_latent, w_uv) + 1.0


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "interpreter"])
def test_torch_compile_fullgraph_cpu(kernel, request, monkeypatch):
    """The op under torch.compile (Inductor, fullgraph) on CPU equals eager: the reference, or the kernel
    in the interpreter (IC_KERNELS_TRITON=1)."""
    launches = []
    if kernel:
        pytest.importorskip("triton")
        from ic_compile.kernels import head_linear as mod

        monkeypatch.setenv("IC_KERNELS_TRITON", "1")
        def counting_launch(*args, **kwargs):
            launches.append(args[0].__name__)
            return _triton_utils.launch_interpreted(*args, **kwargs)

        monkeypatch.setattr(mod, "launch_interpreted", counting_launch)
    seed = seed_everything(request.node.name)
    w_uk_t, w_uv = _mla_weight(torch.float32)
    q_nope = torch.randn(1, MLA["H"], 2, MLA["dn"] + 8)[..., :MLA["dn"]][0].transpose(0, 1)
    out_latent = torch.randn(2, MLA["H"], MLA["Dl"])
    compiled = torch.compile(_absorbed_products, fullgraph=True)
    want = (head_linear_ref(q_nope * 2.0, w_uk_t).relu(), head_linear_ref(out_latent, w_uv) + 1.0)
    for got, ref in zip(compiled(q_nope, out_latent, w_uk_t, w_uv), want):
        _assert_close(got, ref, torch.float32, seed)
    assert len(launches) == (2 if kernel else 0)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("T", [1, 4])
def test_glm_shapes_gpu(T, request):
    """GLM-4.7-Flash's absorbed products (H=20, dn=192, dv=256, Dl=512, bf16): q_nope [T,20,192] (a
    transposed, strided view of q) x W_UK^T, and a latent output [T,20,512] x W_UV, vs the einsum
    (cuBLAS)."""
    seed = seed_everything(request.node.name)
    heads, dn, dv, dl = 20, 192, 256, 512
    weight = (torch.randn(heads * (dn + dv), dl, device="cuda") * dl**-0.5).bfloat16().view(heads, dn + dv, dl)
    q_nope = torch.randn(1, heads, T, dn + 64, device="cuda").bfloat16()[..., :dn][0].transpose(0, 1)
    out_latent = torch.randn(T, heads, dl, device="cuda").bfloat16()
    for name, x, w in (("q_nope x W_UK", q_nope, weight[:, :dn].transpose(1, 2)),
                       ("latent x W_UV", out_latent, weight[:, dn:])):
        _assert_close(torch.ops.ic.head_linear(x, w), head_linear_ref(x, w), torch.bfloat16, seed, name)
