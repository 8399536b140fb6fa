"""Routed MoE experts (ic::moe_experts): Triton kernels vs the torch reference vs HF's GlmMoeDsaExperts.

CPU tensors + use_triton=True run the kernels' Triton-interpreter twins; no env var needed.
"""

import pytest
import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic.*)
from ic_compile.kernels import _triton_utils
from ic_compile.kernels import moe_experts as moe_mod
from ic_compile.kernels.moe_experts import (Route, Tile, default_tiles, moe_experts, moe_experts_triton,
                                            moe_route_experts)
from ic_compile.kernels.moe_router import moe_route
from ic_compile.kernels.reference import moe_experts_ref, moe_route_ref
from ic_compile.kernels.testing import repro, seed_everything

from marks import needs_cuda, needs_triton

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
E, H, I = 6, 96, 80  # non-powers of two: row and column tails in both kernels
SCHEMA = ("ic::moe_experts(Tensor hidden, Tensor topk_index, Tensor topk_weights, Tensor gate_up, "
          "Tensor down, float? swiglu_limit=None, Tensor? shared_gate=None, Tensor? shared_up=None, "
          "Tensor? shared_down=None) -> Tensor")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel outputs (and the silu(g) * u buffer) start as NaN: a missed write fails the test."""
    monkeypatch.setattr(_triton_utils, "POISON_OUTPUTS", True)


def _weights(E, H, I, dtype, device="cpu"):
    """gate_up [E,2I,H], down [E,H,I] scaled so that every stage stays O(1)."""
    gate_up = (torch.randn(E, 2 * I, H, device=device) * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, device=device) * I**-0.5).to(dtype)
    return gate_up, down


def _routing(T, k, E, idx_dtype=torch.int64, device="cpu"):
    """[T,k] distinct experts per row, then: row 0 repeats an expert (k >= 3); row 1 ends with HF's
    sentinel E and the last row starts with -1 (T > 1), or row 0 ends with E (T = 1, k = 4)."""
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    if k >= 3:
        idx[0, 2] = idx[0, 0]
    if T > 1:
        idx[1, -1] = E
        idx[T - 1, 0] = -1
    elif k >= 4:
        idx[0, 3] = E
    return idx.to(device=device, dtype=idx_dtype)


def _topk_weights(idx, E, dtype, sentinel_value=float("nan")):
    """Router weights [T,k]; slots without an expert hold `sentinel_value` (never to be read)."""
    w = torch.rand(idx.shape, device=idx.device) + 0.1
    return w.masked_fill((idx < 0) | (idx >= E), sentinel_value).to(dtype)


def _assert_close(got, want, dtype, seed, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), f"NaN in output {what} {repro(seed)}"
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=lambda m: f"{m} {what} {repro(seed)}")


# ----------------------------------------------------------------------------- reference vs HF

def _hf_experts(E, H, I, k, dtype, impl):
    """HF's GlmMoeDsaExperts with random weights, running `impl` ("eager", "grouped_mm", ...)."""
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaExperts

    config = GlmMoeDsaConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k)
    config._experts_implementation = impl
    return _with_random_weights(GlmMoeDsaExperts(config)).to(dtype)


def _with_random_weights(experts):
    """An HF experts module (fp32) with _weights' random gate_up [E,2I,H] and down [E,H,I] copied in."""
    gate_up, down = _weights(experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2],
                             experts.down_proj.shape[2], torch.float32)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    return experts


def _hf_routing(T, k, E, impl):
    """eager: HF's sentinel E (no -1: its one_hot rejects it); grouped_mm: no sentinel (outside
    expert parallelism its histc drops E rows from the groups, leaving their output rows unset);
    grouped_mm-ep: the EP path, which masks E rows (their weights are 0 there, as EP dispatch gives)."""
    idx = _routing(T, k, E)
    if impl == "grouped_mm":
        return torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    return idx.masked_fill(idx < 0, E)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "grouped_mm-ep"])
def test_reference_matches_hf(impl, dtype, request):
    seed = seed_everything(request.node.name)
    T, k = 5, 4
    module = _hf_experts(E, H, I, k, dtype, impl.removesuffix("-ep"))
    module._is_expert_parallel = impl.endswith("-ep")
    idx = _hf_routing(T, k, E, impl)
    w = _topk_weights(idx, E, torch.float32, sentinel_value=0.0)  # fp32: the router's dtype
    x = torch.randn(T, H).to(dtype)
    with torch.no_grad():
        want = module(x, idx, w)
    got = moe_experts_ref(x, idx, w, module.gate_up_proj.detach(), module.down_proj.detach())
    _assert_close(got, want, dtype, seed, impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_matches_hf_deepseek_v4(dtype, request):
    """swiglu_limit: HF's DeepseekV4Experts (gate capped, up clamped) at activations large enough
    for the cap to bite (without the limit the reference then differs)."""
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    seed = seed_everything(request.node.name)
    T, k, limit = 5, 4, 0.5
    config = DeepseekV4Config(hidden_size=H, intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                              swiglu_limit=limit)
    config._experts_implementation = "eager"
    module = _with_random_weights(DeepseekV4Experts(config)).to(dtype)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = _topk_weights(idx, E, torch.float32)
    x = (4 * torch.randn(T, H)).to(dtype)
    with torch.no_grad():
        want = module(x, idx, w)
    weights = (module.gate_up_proj.detach(), module.down_proj.detach())
    _assert_close(moe_experts_ref(x, idx, w, *weights, swiglu_limit=limit), want, dtype, seed)
    assert not torch.allclose(moe_experts_ref(x, idx, w, *weights).float(), want.float(), **TOL[dtype])


def _shared(H, IS, dtype, device="cpu"):
    """A shared expert's nn.Linear weights: gate [IS,H], up [IS,H], down [H,IS]."""
    return tuple((torch.randn(rows, cols, device=device) * cols**-0.5).to(dtype)
                 for rows, cols in ((IS, H), (IS, H), (H, IS)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_with_shared_matches_hf_moe(dtype, request):
    """shared: HF's GlmMoeDsaMoE sum, experts(x) + shared_experts(x), with its routing given."""
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaMoE

    seed = seed_everything(request.node.name)
    T, k, n_shared = 5, 4, 2  # shared width 2I: not the routed experts' I
    config = GlmMoeDsaConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                             n_shared_experts=n_shared)
    config._experts_implementation = "eager"
    moe = GlmMoeDsaMoE(config)
    _with_random_weights(moe.experts)
    moe = moe.to(dtype)
    idx = _hf_routing(T, k, E, "eager")
    w = _topk_weights(idx, E, torch.float32, sentinel_value=0.0)
    x = torch.randn(T, H).to(dtype)
    with torch.no_grad():
        want = moe.experts(x, idx, w) + moe.shared_experts(x)
    mlp = moe.shared_experts
    shared = tuple(m.weight.detach() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert shared[0].shape == (n_shared * I, H)
    got = moe_experts_ref(x, idx, w, moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach(), shared=shared)
    if dtype == torch.float32:
        _assert_close(got, want, dtype, seed)
        return
    # bf16: HF rounds the routed sum and then the shared expert's add; the reference sums in fp32 and
    # rounds once. Where terms cancel, an element keeps their rounding error (over 200 seeds: up to
    # 0.063 at one element, an elementwise 2 % + 0.02 failed 1 seed in 300), but the mean error stays
    # <= 0.0042 while a shared weight scaled by 0.9 gives >= 0.0068: the mean is the test.
    error = (got.float() - want.float()).abs()
    assert error.mean().item() <= 5.5e-3, f"mean |difference| {error.mean().item():.4g} {repro(seed)}"
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=8e-2, msg=lambda m: f"{m} {repro(seed)}")


def test_reference_ignores_out_of_range_experts():
    gate_up, down = _weights(E, H, I, torch.float32)
    x = torch.randn(2, H)
    idx = torch.tensor([[E, -1], [-1, E + 3]])
    out = moe_experts_ref(x, idx, torch.full((2, 2), float("nan")), gate_up, down)
    assert torch.equal(out, torch.zeros(2, H))


# ----------------------------------------------------------------------------- triton (interpreter)

ROUTING_DTYPES = {"i64_fp32w": (torch.int64, torch.float32), "i32_bf16w": (torch.int32, torch.bfloat16)}


@needs_triton
@pytest.mark.parametrize("routing", list(ROUTING_DTYPES))
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(dtype, T, k, routing, request):
    """Duplicate experts in a row, sentinels E and -1 with NaN weights, int32 / int64 indices,
    fp32 / bf16 weights."""
    seed = seed_everything(request.node.name)
    idx_dtype, w_dtype = ROUTING_DTYPES[routing]
    gate_up, down = _weights(E, H, I, dtype)
    idx = _routing(T, k, E, idx_dtype)
    w = _topk_weights(idx, E, w_dtype)
    x = torch.randn(T, H).to(dtype)
    want = moe_experts_ref(x, idx, w, gate_up, down)
    _assert_close(moe_experts(x, idx, w, gate_up, down, use_triton=True), want, dtype, seed)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_small_tiles_and_strides(dtype, request):
    """Several steps per row (H = 96 in 32-column steps; I = 80 in 32-column steps, flattened over
    the k experts), row tails, no pipelining, and strided inputs (views of larger buffers)."""
    seed = seed_everything(request.node.name)
    T, k = 3, 4
    gate_up, down = _weights(E, H, I, dtype)
    gate_up = torch.cat((gate_up, gate_up[:, :7]), 1)[:, :2 * I]  # row stride 2I+7 rows: a view
    down = torch.cat((down, down[..., :5]), 2)[..., :I]  # down [E,H,I] with row stride I+5
    x = torch.randn(H, T).to(dtype).T  # [T,H], column-major
    idx = _routing(T, k + 1, E)[:, 1:]  # [T,k] with row stride k+1
    w = _topk_weights(idx, E, torch.float32)
    want = moe_experts_ref(x, idx, w, gate_up, down)
    for tiles in [(Tile(16, 32), Tile(16, 32)), (Tile(32, 64, num_stages=1), Tile(32, 32, num_stages=1))]:
        _assert_close(moe_experts_triton(x, idx, w, gate_up, down, tiles=tiles), want, dtype, seed, str(tiles))


@needs_triton
def test_triton_no_valid_expert_gives_zeros():
    gate_up, down = _weights(E, H, I, torch.bfloat16)
    idx = torch.tensor([[E, -1], [-1, E]], dtype=torch.int32)
    out = moe_experts(torch.randn(2, H).bfloat16(), idx, torch.full((2, 2), float("nan")), gate_up, down,
                      use_triton=True)
    assert torch.equal(out, torch.zeros(2, H, dtype=torch.bfloat16))


@needs_triton
def test_triton_empty_inputs():
    gate_up, down = _weights(E, H, I, torch.float32)
    assert moe_experts_triton(torch.randn(0, H), torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4),
                              gate_up, down).shape == (0, H)
    assert torch.equal(moe_experts_triton(torch.randn(2, H), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0),
                                          gate_up, down), torch.zeros(2, H))


def test_rejects_mismatched_shapes_and_dtypes():
    gate_up, down = _weights(E, H, I, torch.float32)
    x, idx, w = torch.randn(2, H), torch.zeros(2, 4, dtype=torch.long), torch.rand(2, 4)
    with pytest.raises(ValueError, match="shapes"):
        moe_experts_triton(x, idx, w, gate_up, down[..., :-1])
    with pytest.raises(ValueError, match="dtype"):
        moe_experts_triton(x, idx, w, gate_up.bfloat16(), down)


def test_default_tiles_for_hopper(monkeypatch):
    """GLM-4.7-Flash on an H100 (132 SMs): the tiles the module's comments describe."""
    monkeypatch.setattr(moe_mod, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert default_tiles(1, 4, 2048, 1536, cpu) == (Tile(16, 256), Tile(4, 1024))
    assert default_tiles(8, 4, 2048, 1536, cpu) == (Tile(16, 256), Tile(16, 256))
    assert default_tiles(1, 4, 96, 80, cpu) == (Tile(4, 128), Tile(4, 128))  # tiny: rows stay >= 4


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_swiglu_limit(dtype, request):
    """The cap inside the gate/up kernel, at activations where it bites."""
    seed = seed_everything(request.node.name)
    gate_up, down = _weights(E, H, I, dtype)
    idx = _routing(3, 4, E)
    w = _topk_weights(idx, E, torch.float32)
    x = (4 * torch.randn(3, H)).to(dtype)
    want = moe_experts_ref(x, idx, w, gate_up, down, swiglu_limit=0.5)
    _assert_close(moe_experts(x, idx, w, gate_up, down, use_triton=True, swiglu_limit=0.5), want, dtype, seed)


@needs_triton
@pytest.mark.parametrize("IS", [I, 2 * I, 40], ids=["IS=I", "IS=2I", "IS<I"])
@pytest.mark.parametrize("T,k", [(1, 4), (3, 2), (2, 0)], ids=["T1k4", "T3k2", "T2k0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_with_shared_expert(dtype, T, k, IS, request):
    """The shared expert rides in both launches: widths equal to, above and below the routed I (row
    blocks past one width and not the other), sentinels, and k = 0 (the shared expert alone)."""
    seed = seed_everything(request.node.name)
    gate_up, down = _weights(E, H, I, dtype)
    shared = _shared(H, IS, dtype)
    idx = _routing(T, k, E) if k else torch.zeros(T, 0, dtype=torch.long)
    w = _topk_weights(idx, E, torch.float32)
    x = torch.randn(T, H).to(dtype)
    want = moe_experts_ref(x, idx, w, gate_up, down, shared=shared)
    assert not torch.allclose(want, moe_experts_ref(x, idx, w, gate_up, down))  # the shared part counts
    _assert_close(moe_experts(x, idx, w, gate_up, down, use_triton=True, shared=shared), want, dtype, seed)


@needs_triton
def test_triton_shared_expert_as_row_slices_and_small_tiles(request):
    """A stacked [2IS,H] gate_up passed as its two row slices (views with an offset), a strided down
    view, several steps per row and no pipelining; with a swiglu_limit, which caps the shared expert
    too."""
    seed = seed_everything(request.node.name)
    T, k, IS = 3, 4, 48
    gate_up, down = _weights(E, H, I, torch.bfloat16)
    gate, up, s_down = _shared(H, IS, torch.bfloat16)
    stacked = torch.cat((gate, up))
    s_down = torch.cat((s_down, s_down[:, :3]), 1)[:, :IS]  # row stride IS + 3
    shared = (stacked[:IS], stacked[IS:], s_down)
    idx = _routing(T, k, E)
    w = _topk_weights(idx, E, torch.float32)
    x = torch.randn(T, H).bfloat16()
    want = moe_experts_ref(x, idx, w, gate_up, down, 0.5, shared)
    k0 = torch.zeros(T, 0, dtype=torch.long)  # the shared expert alone: its cap bites as well
    assert not torch.allclose(moe_experts_ref(x, k0, k0.float(), gate_up, down, 0.5, shared),
                              moe_experts_ref(x, k0, k0.float(), gate_up, down, shared=shared))
    for tiles in [(Tile(16, 32), Tile(16, 32)), (Tile(32, 64, num_stages=1), Tile(8, 32, num_stages=1))]:
        got = moe_experts_triton(x, idx, w, gate_up, down, tiles=tiles, swiglu_limit=0.5, shared=shared)
        _assert_close(got, want, torch.bfloat16, seed, str(tiles))


def test_rejects_bad_shared_expert():
    gate_up, down = _weights(E, H, I, torch.float32)
    x, idx, w = torch.randn(2, H), torch.zeros(2, 4, dtype=torch.long), torch.rand(2, 4)
    gate, up, s_down = _shared(H, 32, torch.float32)
    for use_triton in (False, True):
        with pytest.raises(ValueError, match="shared expert shapes"):
            moe_experts(x, idx, w, gate_up, down, use_triton=use_triton, shared=(gate, up, s_down.T))
        with pytest.raises(ValueError, match="or none"):
            moe_experts(x, idx, w, gate_up, down, use_triton=use_triton, shared=(gate, up, None))
        with pytest.raises(ValueError, match="dtype"):
            moe_experts(x, idx, w, gate_up, down, use_triton=use_triton, shared=(gate, up.bfloat16(), s_down))


# ----------------------------------------------------------------------------- the custom op

def test_schema():
    assert str(torch.ops.ic.moe_experts.default._schema) == SCHEMA


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_opcheck(idx_dtype, request):
    seed_everything(request.node.name)
    gate_up, down = _weights(E, H, I, torch.float32)
    idx = _routing(3, 4, E, idx_dtype)
    args = (torch.randn(3, H), idx, _topk_weights(idx, E, torch.float32), gate_up, down)
    torch.library.opcheck(torch.ops.ic.moe_experts.default, args)
    torch.library.opcheck(torch.ops.ic.moe_experts.default, args, {"swiglu_limit": 0.5})
    gate, up, s_down = _shared(H, 48, torch.float32)
    torch.library.opcheck(torch.ops.ic.moe_experts.default, args,
                          {"shared_gate": gate, "shared_up": up, "shared_down": s_down})


@needs_triton
def test_op_runs_triton_when_forced(request, monkeypatch):
    """IC_KERNELS_TRITON=1: the op runs the kernels (interpreter on CPU), same answer."""
    seed = seed_everything(request.node.name)
    monkeypatch.setenv("IC_KERNELS_TRITON", "1")
    calls = []
    monkeypatch.setattr(moe_mod, "launch_interpreted", lambda fn, *a, **kw: (
        calls.append(fn.__name__), _triton_utils.launch_interpreted(fn, *a, **kw)))
    gate_up, down = _weights(E, H, I, torch.bfloat16)
    idx = _routing(2, 4, E)
    w, x = _topk_weights(idx, E, torch.float32), torch.randn(2, H).bfloat16()
    _assert_close(torch.ops.ic.moe_experts(x, idx, w, gate_up, down), moe_experts_ref(x, idx, w, gate_up, down),
                  torch.bfloat16, seed)
    assert calls == ["_gate_up_kernel", "_down_kernel"]


def test_torch_compile_symbolic_tokens(request):
    """The fake impl traces a symbolic T: one graph for several token counts."""
    seed = seed_everything(request.node.name)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    gate_up, down = _weights(E, H, I, torch.float32)

    def f(x, idx, w):
        return torch.ops.ic.moe_experts(x * 2.0, idx, w, gate_up, down) + 1.0

    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for T in (2, 3, 5):
        idx = _routing(T, 4, E)
        x, w = torch.randn(T, H), _topk_weights(idx, E, torch.float32)
        _assert_close(compiled(x, idx, w), f(x, idx, w), torch.float32, seed, f"T={T}")
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- routed in the op

def _route(T, E, groups=(1, 1), k=4, device="cpu"):
    """A Route of random logits and bias (groups: n_group, topk_group), renormalised, scaled by 2.5."""
    return Route(torch.randn(T, E, device=device), 0.3 * torch.randn(E, device=device), k, *groups, True, 2.5)


@needs_triton
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "with_shared"])
@pytest.mark.parametrize("T,E_,groups", [(1, 8, (1, 1)), (3, 16, (4, 2)), (2, 6, (1, 1))],
                         ids=["T1", "T3-groups", "T2-E6"])
def test_routed_in_the_op_equals_route_then_experts(T, E_, groups, shared, request):
    """route=: the gate/up kernel's routing gives the moe_route kernel's ids and weights, so the output is
    bit-equal to moe_route + moe_experts (interpreter); the reference path equals their references."""
    seed_everything(request.node.name)
    gate_up, down = _weights(E_, H, I, torch.float32)
    x, route = torch.randn(T, H), _route(T, E_, groups)
    shared_weights = _shared(H, 48, torch.float32) if shared else None
    weights, ids = moe_route(*route, use_triton=True)
    want = moe_experts_triton(x, ids, weights, gate_up, down, shared=shared_weights)
    torch.testing.assert_close(moe_route_experts(x, route, gate_up, down, use_triton=True, shared=shared_weights), want,
                               rtol=0, atol=0)
    weights_ref, ids_ref = moe_route_ref(*route)
    torch.testing.assert_close(moe_route_experts(x, route, gate_up, down, use_triton=False, shared=shared_weights),
                               moe_experts_ref(x, ids_ref, weights_ref, gate_up, down, shared=shared_weights))


def test_routed_rejects_bad_logits():
    gate_up, down = _weights(E, H, I, torch.float32)
    x = torch.randn(2, H)
    for route, match in ((_route(3, E), r"logits must be a float \[T=2, E\]"),
                         (_route(2, E + 2), "scores 8 experts, gate_up holds 6"),
                         (_route(2, E, k=E + 1), "top_k 7 of 6 experts")):
        for use_triton in (False, True):
            with pytest.raises(ValueError, match=match):
                moe_route_experts(x, route, gate_up, down, use_triton=use_triton)


def test_routed_opcheck(request):
    seed_everything(request.node.name)
    gate_up, down = _weights(E, H, I, torch.float32)
    route = _route(3, E)
    torch.library.opcheck(torch.ops.ic.moe_route_experts.default, (torch.randn(3, H), *route, gate_up, down))


# ----------------------------------------------------------------------------- real GPU

GLM = dict(E=64, H=2048, I=1536, k=4)  # GLM-4.7-Flash's routed experts


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("T", [1, 4])
def test_glm_shape_gpu(T, request):
    """Triton vs the reference and vs HF's module (grouped_mm, its CUDA default) at GLM-4.7-Flash's shape."""
    seed = seed_everything(request.node.name)
    module = _hf_experts(GLM["E"], GLM["H"], GLM["I"], GLM["k"], torch.bfloat16, "grouped_mm").cuda()
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    x = torch.randn(T, GLM["H"], device="cuda").bfloat16()
    idx = torch.stack([torch.randperm(GLM["E"])[:GLM["k"]] for _ in range(T)]).cuda()
    w = _topk_weights(idx, GLM["E"], torch.float32)
    got = torch.ops.ic.moe_experts(x, idx, w, gate_up, down)
    _assert_close(got, moe_experts_ref(x, idx, w, gate_up, down), torch.bfloat16, seed, "vs reference")
    with torch.no_grad():
        _assert_close(got, module(x, idx, w), torch.bfloat16, seed, "vs HF grouped_mm")
    sentinel = idx.masked_fill(torch.rand(idx.shape, device="cuda") < 0.3, -1).int()  # EP-style -1 slots
    w_sentinel = _topk_weights(sentinel, GLM["E"], torch.bfloat16)
    _assert_close(torch.ops.ic.moe_experts(x, sentinel, w_sentinel, gate_up, down),
                  moe_experts_ref(x, sentinel, w_sentinel, gate_up, down), torch.bfloat16, seed, "sentinels")


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("T", [1, 4])
def test_glm_shape_with_shared_expert_gpu(T, request):
    """GLM-4.7-Flash's MoE at decode (routed + its shared expert of width I) vs the reference, the
    default tiles and every swept tile."""
    seed = seed_everything(request.node.name)
    gate_up, down = _weights(GLM["E"], GLM["H"], GLM["I"], torch.bfloat16, "cuda")
    shared = _shared(GLM["H"], GLM["I"], torch.bfloat16, "cuda")
    x = torch.randn(T, GLM["H"], device="cuda").bfloat16()
    idx = _routing(T, GLM["k"], GLM["E"], device="cuda")
    w = _topk_weights(idx, GLM["E"], torch.float32)
    want = moe_experts_ref(x, idx, w, gate_up, down, shared=shared)
    _assert_close(torch.ops.ic.moe_experts(x, idx, w, gate_up, down, None, *shared), want, torch.bfloat16, seed)
    for tile in moe_mod.sweep_tiles():
        _assert_close(moe_experts_triton(x, idx, w, gate_up, down, tiles=(tile, tile), shared=shared), want,
                      torch.bfloat16, seed, str(tile))


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("T", [1, 4])
def test_glm_shape_routed_in_the_op_gpu(T, request):
    """GLM-4.7-Flash's MoE with its router folded in (route=) == moe_route + moe_experts, bit for bit."""
    seed_everything(request.node.name)
    gate_up, down = _weights(GLM["E"], GLM["H"], GLM["I"], torch.bfloat16, "cuda")
    shared = _shared(GLM["H"], GLM["I"], torch.bfloat16, "cuda")
    x, route = torch.randn(T, GLM["H"], device="cuda").bfloat16(), _route(T, GLM["E"], device="cuda")
    weights, ids = moe_route(*route)
    want = torch.ops.ic.moe_experts(x, ids, weights, gate_up, down, None, *shared)
    got = torch.ops.ic.moe_route_experts(x, *route, gate_up, down, None, *shared)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_every_swept_tile_on_gpu(request):
    """Each tile bench/moe_experts.py sweeps gives the right answer (T = 2, GLM shape)."""
    seed = seed_everything(request.node.name)
    gate_up, down = _weights(GLM["E"], GLM["H"], GLM["I"], torch.bfloat16, "cuda")
    x = torch.randn(2, GLM["H"], device="cuda").bfloat16()
    idx = _routing(2, GLM["k"], GLM["E"], device="cuda")
    w = _topk_weights(idx, GLM["E"], torch.float32)
    want = moe_experts_ref(x, idx, w, gate_up, down)
    for tile in moe_mod.sweep_tiles():
        _assert_close(moe_experts_triton(x, idx, w, gate_up, down, tiles=(tile, tile)), want, torch.bfloat16, seed,
                      str(tile))
