"""torch.library registration of the ic:: ops: schemas, opcheck, torch.compile, no-triton import."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic.*)
from ic_compile.kernels.reference import indexer_topk_ref, sparse_attention_ref, sparse_mla_ref
from ic_compile.kernels.testing import indexer_inputs, random_indices, seed_everything

from marks import needs_cuda, needs_triton

SCHEMAS = {
    "indexer_topk": "ic::indexer_topk(Tensor q, Tensor k, Tensor w, SymInt topk, Tensor? mask=None, "
                    "bool causal=True, bool sorted=True, Tensor? key_range=None, bool check=True, "
                    "str indexer_precision=\"bf16\", Tensor? new_keys=None, Tensor? new_key_pos=None, "
                    "Tensor? k_scale=None) -> Tensor",
    "sparse_attention": "ic::sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, float scale, "
                        "bool causal=True) -> Tensor",
    "sparse_mla": "ic::sparse_mla(Tensor q, Tensor kv, Tensor indices, float scale, int dv, "
                  "bool causal=True, Tensor? rope=None, Tensor? q_rope=None) -> Tensor",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema(name):
    assert str(getattr(torch.ops.ic, name).default._schema) == SCHEMAS[name]


def _indexer_args(B=2, S=6, T=20, H=4, D=16, device="cpu"):
    q, k, w = indexer_inputs(B, S, T, H, D, device=device)
    return q, k, w


def _attention_args(B=2, S=5, T=24, Hq=4, Hk=2, D=16, Dv=8, K=10, device="cpu"):
    q = torch.randn(B, S, Hq, D, device=device)
    k, v = torch.randn(B, T, Hk, D, device=device), torch.randn(B, T, Hk, Dv, device=device)
    return q, k, v, random_indices(B, S, T, K, device=device)


def _mla_args(B=2, S=5, T=24, H=4, D=24, K=10, device="cpu"):
    q, kv = torch.randn(B, S, H, D, device=device), torch.randn(B, T, D, device=device)
    return q, kv, random_indices(B, S, T, K, device=device)


def _window_key_range(B=2, S=6, T=20, window=5):
    """int32 [B,S,3] (lo, hi, count) of a sliding causal window, the second sequence left-padded by 3."""
    last = torch.arange(S) + (T - S)  # [S]
    lo = torch.maximum(last - window + 1, torch.tensor([[0], [3]]))  # [B,S]
    hi = last.expand(B, S)
    return torch.stack((lo, hi, hi - lo + 1), -1).int()


@pytest.mark.parametrize("variant", ["plain", "mask_noncausal", "key_range", "key_range_causal"])
def test_opcheck_indexer_topk(variant, request):
    seed_everything(request.node.name)
    q, k, w = _indexer_args()
    kwargs = {"plain": {}, "mask_noncausal": {"mask": torch.rand(2, 1, 20) > 0.3, "causal": False},
              "key_range": {"key_range": _window_key_range(), "causal": False},
              "key_range_causal": {"key_range": _window_key_range()}}[variant]
    torch.library.opcheck(torch.ops.ic.indexer_topk.default, (q, k, w, 7), kwargs)


@pytest.mark.parametrize("causal", [True, False])
def test_opcheck_sparse_attention(causal, request):
    seed_everything(request.node.name)
    q, k, v, idx = _attention_args()
    torch.library.opcheck(torch.ops.ic.sparse_attention.default, (q, k, v, idx, 0.25), {"causal": causal})


def test_opcheck_sparse_mla(request):
    seed_everything(request.node.name)
    q, kv, idx = _mla_args()
    torch.library.opcheck(torch.ops.ic.sparse_mla.default, (q, kv, idx, 0.2, 16))


def test_opcheck_sparse_mla_rope_apart(request):
    """kv = the latent [B,T,16], rope [B,T,8] a strided view (a cache buffer longer than T)."""
    seed_everything(request.node.name)
    q, kv, idx = _mla_args()
    latent, rope = kv[..., :16].contiguous(), torch.randn(2, 30, 8)[:, :24]
    torch.library.opcheck(torch.ops.ic.sparse_mla.default, (q, latent, idx, 0.2, 16), {"rope": rope})
    q_rope = torch.randn(q.shape[0], q.shape[2], q.shape[1], 8).transpose(1, 2)  # [B,S,H,8], strided
    torch.library.opcheck(torch.ops.ic.sparse_mla.default, (q[..., :16], latent, idx, 0.2, 16),
                          {"rope": rope, "q_rope": q_rope})


def _pipeline(q, k, w, qa, ka, va, q_mla, kv):
    """indexer -> sparse attention (GQA and MLA) with some surrounding ops for Inductor."""
    idx = torch.ops.ic.indexer_topk(q, k, w, 8)
    o = torch.ops.ic.sparse_attention(qa * 2.0, ka, va, idx, 0.25)
    o_mla = torch.ops.ic.sparse_mla(q_mla, kv, idx, 0.2, 16)
    return idx, o.float().sum(-1) + 1.0, o_mla.relu()


def _pipeline_ref(q, k, w, qa, ka, va, q_mla, kv):
    idx = indexer_topk_ref(q, k, w, 8)
    o = sparse_attention_ref(qa * 2.0, ka, va, idx, 0.25)
    return idx, o.float().sum(-1) + 1.0, sparse_mla_ref(q_mla, kv, idx, 0.2, 16).relu()


def _pipeline_inputs(S, T, device="cpu"):
    q, k, w = _indexer_args(S=S, T=T, device=device)
    qa, ka, va, _ = _attention_args(S=S, T=T, device=device)
    q_mla, kv, _ = _mla_args(S=S, T=T, device=device)
    return q, k, w, qa, ka, va, q_mla, kv


def _check_pipeline(got, want):
    assert torch.equal(got[0].sort(-1).values, want[0].sort(-1).values)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
def test_torch_compile_inductor_cpu(dynamic, request):
    seed_everything(request.node.name)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_pipeline, backend=counter, dynamic=dynamic, fullgraph=True)
    for S, T in [(6, 20), (9, 33), (12, 40)]:
        inputs = _pipeline_inputs(S, T)
        _check_pipeline(compiled(*inputs), _pipeline_ref(*inputs))
    # symbolic B/S/T through the fake impls: one graph (default: static, then one dynamic recompile)
    assert counter.frame_count == (1 if dynamic else 2)


@needs_triton
def test_ops_force_triton_on_cpu(request, monkeypatch):
    """IC_KERNELS_TRITON=1: the ops run the Triton kernels (interpreter on CPU)."""
    seed_everything(request.node.name)
    monkeypatch.setenv("IC_KERNELS_TRITON", "1")
    from ic_compile.kernels._triton_utils import launch_interpreted

    calls = []

    def counting_launch(*args, **kwargs):
        calls.append(args[0].__name__)
        return launch_interpreted(*args, **kwargs)

    for mod in ("indexer_topk", "sparse_attention"):
        monkeypatch.setattr(f"ic_compile.kernels.{mod}.launch_interpreted", counting_launch)
    inputs = _pipeline_inputs(6, 20)
    _check_pipeline(_pipeline(*inputs), _pipeline_ref(*inputs))
    assert len(calls) == 3


def test_import_without_triton():
    """CPU-only installs: importing registers the ops and they run the references."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # make `import triton` fail
        import torch
        import ic_compile.kernels.ops
        from ic_compile.kernels import _triton_utils
        assert not _triton_utils.HAS_TRITON
        q, k, w = torch.randn(1, 3, 2, 16), torch.randn(1, 7, 16), torch.rand(1, 3, 2)
        idx = torch.ops.ic.indexer_topk(q, k, w, 4)
        assert idx.shape == (1, 3, 4) and idx.dtype == torch.int32
        kv = torch.randn(1, 7, 24)
        out = torch.ops.ic.sparse_mla(torch.randn(1, 3, 2, 24), kv, idx, 0.2, 16)
        assert out.shape == (1, 3, 2, 16)
        print("ok")
    """)
    env = {**os.environ, "IC_KERNELS_TRITON": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_torch_compile_cuda(request):
    seed_everything(request.node.name)
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, backend="inductor", dynamic=True, fullgraph=True)
    for S, T in [(64, 300), (130, 1000)]:
        inputs = _pipeline_inputs(S, T, device="cuda")
        _check_pipeline(compiled(*inputs), _pipeline_ref(*inputs))
